"""The xAR family: entity layouts, block-causal decoding with a KV cache, Noisy Context Learning
training (sharded as the other families), and the entity-by-entity sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax import registry
from arjax.config import schema as configs
from arjax.errors import ConfigError
from arjax.families.xar.backbone import XarBackbone
from arjax.families.xar.entities import EntityLayout
from arjax.families.xar.model import XarModel, to_raster, to_sequence
from arjax.families.xar.sampler import entity_draws, entity_scales, sample_tokens, time_grid
from arjax.parallel import sharding
from arjax.training import loop as train
from conftest import REPO_ROOT


def xar_config(variant="smoke"):
  return configs.load(str(REPO_ROOT / f"configs/digits_xar.py:{variant}"))


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  n = config.train.global_batch_size
  return {"image": rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32),
          "label": (np.arange(n) % 10).astype(np.int32)}


def small_backbone(layout, **kw):
  return XarBackbone(layout=layout, token_dim=3, width=32, encoder_depth=2, encoder_heads=2,
                     decoder_depth=1, decoder_heads=4, mlp_ratio=2.0, num_classes=5, **kw)


def random_params(backbone, seed=0):
  """Every parameter redrawn (the zero-started AdaLN would make every block the identity)."""
  layout = backbone.layout
  params = jax.jit(backbone.init)(
      jax.random.PRNGKey(seed), jnp.zeros((1, layout.num_tokens, 3)), jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, layout.num_entities)))["params"]
  params = jax.tree.map(lambda p: p.unbox() if hasattr(p, "unbox") else p, params,
                        is_leaf=lambda p: hasattr(p, "unbox"))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  redrawn = [0.3 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)]
  return jax.tree.unflatten(tree, redrawn)


LAYOUTS = [EntityLayout("cell", 4, 4, 2), EntityLayout("token", 2, 3),
           EntityLayout("subsample", 4, 4, 2), EntityLayout("image", 4, 4)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l.kind}{l.k}")
def test_every_layout_is_a_permutation_into_equal_entities(layout):
  order = layout.seq_to_raster()
  assert sorted(order) == list(range(layout.num_tokens))
  assert layout.size * layout.num_entities == layout.num_tokens
  x = jnp.arange(layout.num_tokens, dtype=jnp.float32)[None, :, None]
  np.testing.assert_array_equal(to_raster(to_sequence(x, layout), layout), x)


def test_a_cell_is_k_by_k_neighbours_and_a_subsample_is_a_strided_grid():
  cell = EntityLayout("cell", 4, 4, 2).grid_positions()[:4]
  assert {tuple(p) for p in cell} == {(0, 0), (0, 1), (1, 0), (1, 1)}
  sub = EntityLayout("subsample", 4, 4, 2).grid_positions()[:4]
  assert {tuple(p) for p in sub} == {(0, 0), (0, 2), (2, 0), (2, 2)}


@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=lambda l: f"{l.kind}{l.k}")
def test_kv_cached_entity_decoding_equals_the_full_block_causal_forward(layout):
  """Entity s decoded from a cache of the clean entities 0..s-1 (committed at t = 0, one call
  each) gives the full forward's outputs over [clean 0..s-1 | entity s at t | anything after]."""
  backbone = small_backbone(layout)
  params = {"params": random_params(backbone)}
  rng = np.random.default_rng(0)
  b, e, size = 2, layout.num_entities, layout.size
  x = jnp.asarray(rng.normal(size=(b, layout.num_tokens, 3)), jnp.float32)
  labels = jnp.asarray([1, 5])
  t_noisy = jnp.asarray(rng.uniform(size=(b, e)), jnp.float32)
  call = jax.jit(lambda x, t, cache, index: backbone.apply(params, x, labels, t, cache=cache,
                                                           index=index))
  # Both jitted: eager and compiled sin/cos of the ~1000 rad time features differ by ~1e-5.
  forward = jax.jit(lambda x, t: backbone.apply(params, x, labels, t)[0])
  cache = backbone.init_cache(b)
  for s in range(e):
    t_full = jnp.where(jnp.arange(e) < s, 0.0, t_noisy)
    full = forward(x, t_full)
    entity = x[:, s * size:(s + 1) * size]
    cached, _ = call(entity, t_noisy[:, s:s + 1], cache, s * size)
    np.testing.assert_allclose(cached, full[:, s * size:(s + 1) * size], atol=1e-5, rtol=1e-5)
    _, cache = call(entity, jnp.zeros((b, 1)), cache, s * size)  # commit it clean


def test_perturbing_entity_e_leaves_every_output_before_it_unchanged():
  layout = EntityLayout("cell", 4, 4, 2)
  backbone = small_backbone(layout)
  params = {"params": random_params(backbone)}
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 16, 3)), jnp.float32)
  t = jnp.asarray(rng.uniform(size=(2, 4)), jnp.float32)
  labels = jnp.asarray([0, 3])
  forward = jax.jit(lambda x, t: backbone.apply(params, x, labels, t)[0])
  base = np.asarray(forward(x, t))
  for e in range(4):
    rows = slice(e * 4, (e + 1) * 4)
    moved = np.asarray(forward(x.at[:, rows].add(1.0), t.at[:, e].set(0.9 - t[0, e])))
    np.testing.assert_allclose(moved[:, :e * 4], base[:, :e * 4], atol=1e-6, rtol=0)
    assert not np.allclose(moved[:, rows], base[:, rows])


def test_sharded_xar_step_equals_single_device_step():
  """On data 2 x fsdp 2 x tensor 2, the activations sharded by the rules too."""
  config = xar_config()
  config.train.num_steps = 100
  single_mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                                  sharding.MESH_AXES)
  single = train.Experiment(config, mesh=single_mesh)
  state, shardings_1 = single.init_state()
  step_1 = single.jit_step(shardings_1)
  batch = random_batch(config)
  for _ in range(4):  # leave the all-zero AdaLN init
    state, _ = step_1(state, sharding.global_batch(batch, single.mesh))
  host_state = jax.device_get(state)

  config.mesh.shape = (2, 2, 2)
  sharded = train.Experiment(config)
  _, shardings_8 = sharded.abstract_state()
  state_8 = jax.device_put(host_state, shardings_8)
  query = state_8.params["backbone"]["encoder_blocks_0"]["attn"]["query"]["kernel"]
  assert query.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  next_8, metrics_8 = sharded.jit_step(shardings_8)(
      state_8, sharding.global_batch(batch, sharded.mesh))
  next_1, metrics_1 = step_1(state, sharding.global_batch(batch, single.mesh))
  np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics_8["grad_norm"], metrics_1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(next_8.params), jax.tree.leaves(next_1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert any(not np.allclose(a, b) for a, b in
             zip(jax.tree.leaves(next_1.params), jax.tree.leaves(host_state.params)))


def test_the_official_cfg_ramp_never_guides_the_first_entity():
  np.testing.assert_allclose(entity_scales(3.0, "linear", 4), [1, 5 / 3, 7 / 3, 3], rtol=1e-6)
  np.testing.assert_allclose(entity_scales(3.0, "constant", 4), [3, 3, 3, 3])
  np.testing.assert_allclose(time_grid("euler_maruyama", 3), [1.0, 0.52, 0.04, 0.0])
  np.testing.assert_allclose(time_grid("heun", 2), [1.0, 0.5, 0.0])


@pytest.mark.parametrize("solver,steps", [("euler", 2), ("heun", 1), ("euler_maruyama", 2)])
def test_every_solver_samples_any_step_count_and_an_image_is_independent_of_its_batch(
    solver, steps):
  """Fewer steps than the official sampler's 3, a batch of 1, a non-official layout."""
  layout = EntityLayout("subsample", 4, 4, 2)
  model = XarModel(small_backbone(layout))
  params = {"backbone": random_params(model.backbone)}
  rng = jax.random.PRNGKey(7)
  run = jax.jit(lambda labels, ids, guided: sample_tokens(
      params, labels, entity_draws(jax.vmap(jax.random.fold_in, (None, 0))(rng, ids),
                                   layout.size, 3), jnp.asarray(entity_scales(2.0, "linear", 4)),
      1.0, model=model, solver=solver, num_steps=steps, guided=guided), static_argnums=2)
  for guided in (False, True):
    together = np.asarray(run(jnp.asarray([1, 2, 3]), jnp.asarray([0, 1, 2]), guided))
    assert together.shape == (3, 16, 3) and np.isfinite(together).all()
    alone = np.asarray(run(jnp.asarray([3]), jnp.asarray([2]), guided))
    # Compiled for another batch size, XLA may sum in another order: ~3e-5 on values ~1.
    np.testing.assert_allclose(alone[0], together[2], atol=1e-4, rtol=1e-4)


def test_the_family_samples_images_through_the_common_sampler_call():
  exp = train.Experiment(xar_config())
  state, _ = exp.init_state()
  sampler = exp.sampler()
  images = sampler(state.params, np.array([0, 7, 9]), jax.random.PRNGKey(0), cfg_scale=2.0,
                   cfg_schedule_name="linear")
  assert images.shape == (3, 8, 8, 1) and np.isfinite(np.asarray(images)).all()


def test_a_per_token_head_is_a_config_error_naming_the_field():
  config = xar_config()
  config.head.name = "flow"
  config.head.t_mean, config.head.t_std = 0.0, 1.0
  with pytest.raises(ConfigError, match="config.head.name='flow'"):
    registry.validate(config)


def test_2d_rope_needs_a_head_dim_divisible_by_4():
  config = xar_config()
  config.model.width, config.model.encoder_heads, config.model.decoder_heads = 36, 2, 2
  with pytest.raises(ConfigError, match="divisible by 4"):
    registry.validate(config)


def test_resume_continues_bit_for_bit(tmp_path, data_dir):
  """With dropout: its draws, the entity times, the noise and the label drops all come from
  the step's key, which the checkpoint holds."""
  config = xar_config()
  config.data.data_dir = data_dir
  config.model.attention_dropout = config.model.dropout = 0.1
  config.train.num_steps = 4
  config.train.checkpoint_every = 2
  uninterrupted = train.train_and_evaluate(config, str(tmp_path / "straight"))
  first_half = train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_after=2)
  assert int(first_half.step) == 2
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(jax.tree.leaves(first_half.params)[0]),
                            np.asarray(jax.tree.leaves(resumed.params)[0]))


def test_scanned_remat_blocks_give_the_unrolled_numbers_and_decode_with_a_stacked_cache():
  from arjax.layers import transformer as layers
  layout = EntityLayout("cell", 4, 4, 2)
  unrolled = small_backbone(layout)
  params = random_params(unrolled)
  scanned = small_backbone(layout, scan_layers=True, remat="full")
  stacked = dict(params)
  for name, depth in (("encoder_blocks", 2), ("decoder_blocks", 1)):
    stacked = layers.stack_unrolled_blocks(stacked, name, depth, name)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 3)), jnp.float32)
  labels, t = jnp.asarray([0, 1]), jnp.full((2, 4), 0.3)
  full = jax.jit(lambda: unrolled.apply({"params": params}, x, labels, t)[0])()
  np.testing.assert_allclose(
      jax.jit(lambda: scanned.apply({"params": stacked}, x, labels, t)[0])(), full,
      atol=1e-5, rtol=1e-5)
  cache = scanned.init_cache(2)
  assert cache["encoder"]["k"].shape == (2, 2, 16, 2, 16)  # (layers, B, L, heads, head dim)
  first, _ = jax.jit(lambda c: scanned.apply({"params": stacked}, x[:, :4], labels, t[:, :1],
                                             cache=c, index=0))(cache)
  np.testing.assert_allclose(first, full[:, :4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["train", "sample"])
def test_the_analytic_flops_are_the_programs_matmuls(mode):
  """The family's own accounting against the jaxpr count of the real step / sampler call,
  within 2% (the accounting's backward is 2x forward everywhere but z_proj; the time MLP,
  whose input is data too, has no input gradient in the program)."""
  from arjax.util import jaxpr_flops
  config = xar_config()
  exp = train.Experiment(config)
  params = jax.eval_shape(lambda: exp.init_state()[0].params)
  batch = 4
  analytic = exp.family.flops(config, exp.tokenizer, exp.head_kind, mode, batch)["total"]
  if mode == "train":
    tokens = jax.ShapeDtypeStruct((batch, 16, 4), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    counted = jaxpr_flops.count(jax.grad(exp.loss_fn), params, tokens, labels,
                                jax.random.PRNGKey(0)).flops
  else:
    s = config.sample
    sampler = exp.family.sampler(exp.model, exp.head, exp.tokenizer, config)
    counted = jaxpr_flops.count(lambda p: sampler.sample_images(
        p, jnp.arange(batch) % 10, jax.random.PRNGKey(0),
        jnp.asarray(sampler.guidance_scales(s.cfg_scale, s.cfg_schedule)), jnp.float32(1.0),
        jnp.arange(batch), guided=True), params).flops
  assert abs(analytic - counted) <= 0.02 * counted, (analytic, counted)
