"""The next-scale family (FlowAR, M-VAR's hybrid mixer): the scale pyramid, the block-causal
backbone and its cached scale-by-scale decoding, the sampler, config errors, and training
(sharded as the other families, resumed bit for bit)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from arjax import registry
from arjax.config import schema as configs
from arjax.errors import ConfigError
from arjax.families.scale.backbone import ScaleBackbone
from arjax.families.scale.pyramid import (ScalePyramid, area_matrix, doubling_sides,
                                          upsample_matrix)
from arjax.families.scale.sampler import sample_scales
from arjax.heads.flow import FlowHeadNet, FlowMatching
from arjax.families.scale.flow_net import ScaleFlowNet
from arjax.families.scale.model import ScaleModel
from arjax.parallel import sharding
from arjax.training import loop as train
import family_testing
from conftest import REPO_ROOT

MIXERS = ["attention", "hybrid"]


def scale_config(variant="smoke"):
  return configs.load(str(REPO_ROOT / f"configs/digits_scale.py:{variant}"))


def random_map(batch, side, dim=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, side * side, dim)),
                     jnp.float32)


# ---------------------------------------------------------------- the pyramid

def test_the_default_scales_double_up_to_the_map_side():
  assert doubling_sides(16) == (1, 2, 4, 8, 16)
  assert doubling_sides(4) == (1, 2, 4)
  assert doubling_sides(6) == (1, 2, 4, 6)
  p = ScalePyramid((1, 2, 4))
  assert p.sizes == (1, 4, 16) and p.length == 21 and p.offset(2) == 5


def test_a_coarse_scale_is_the_box_average_of_the_map():
  p = ScalePyramid((1, 2, 4))
  x = random_map(2, 4)
  pyramid = p.build(x)
  assert pyramid.shape == (2, 21, 3)
  np.testing.assert_allclose(p.scale(pyramid, 2), x)  # the finest scale is the map itself
  np.testing.assert_allclose(p.scale(pyramid, 0)[:, 0], x.mean(axis=1), atol=1e-6)
  grid = np.asarray(x).reshape(2, 2, 2, 2, 2, 3)  # [B, i, di, j, dj, D]
  np.testing.assert_allclose(p.scale(pyramid, 1).reshape(2, 2, 2, 3), grid.mean(axis=(2, 4)),
                             atol=1e-6)


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_up_then_down_sampling_round_trips_and_keeps_constants(upsample):
  """Area-averaging an up-sampled scale gives it back for integer ratios (nearest repeats
  cells; bilinear's half-pixel weights are symmetric within each cell's footprint up to the
  clamped edges, so only nearest is exact); any ratio keeps a constant map constant."""
  p = ScalePyramid((1, 2, 4), upsample=upsample)
  coarse = random_map(2, 2)
  up = p.up(coarse, 2)
  assert up.shape == (2, 16, 3)
  back = ScalePyramid((2, 4)).down(up, 0)
  if upsample == "nearest":
    np.testing.assert_allclose(back, coarse, atol=1e-6)
  for n_out, n_in in ((4, 2), (3, 2), (4, 3), (5, 3)):
    np.testing.assert_allclose(upsample_matrix(n_out, n_in, upsample).sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(area_matrix(n_in, n_out).sum(1), 1.0, atol=1e-6)
  odd = ScalePyramid((1, 3, 4), upsample=upsample)
  constant = jnp.full((1, 16, 2), 0.7)
  for k in range(3):
    np.testing.assert_allclose(odd.scale(odd.build(constant), k), 0.7, atol=1e-6)
  np.testing.assert_allclose(odd.ar_inputs(odd.build(constant)), 0.7, atol=1e-6)
  assert odd.ar_inputs(odd.build(constant)).shape == (1, 9 + 16, 2)


def test_bad_scales_are_refused():
  for sides in ((), (2, 1), (1, 1, 2), (0, 2)):
    with pytest.raises(ValueError, match="scales"):
      ScalePyramid(sides)


# ---------------------------------------------------------------- the backbone

def small_backbone(mixer, **kw):
  return ScaleBackbone(pyramid=ScalePyramid((1, 2, 4)), token_dim=3, width=32, depth=2,
                       num_heads=2, mlp_ratio=2.0, num_classes=5, mixer=mixer, chunk_size=8,
                       **kw)


def random_params(backbone, seed=0):
  """Every parameter redrawn (the zero-started AdaLN would make every block the identity)."""
  params = jax.jit(backbone.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 20, 3)),
                                  jnp.zeros((1,), jnp.int32))["params"]
  params = jax.tree.map(lambda p: p.unbox() if hasattr(p, "unbox") else p, params,
                        is_leaf=lambda p: hasattr(p, "unbox"))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, l.shape)
                                   for k, l in zip(keys, leaves)])


@pytest.mark.parametrize("mixer", MIXERS)
def test_cached_scale_by_scale_decoding_equals_the_full_block_causal_forward(mixer):
  backbone = small_backbone(mixer)
  params = random_params(backbone)
  p = backbone.pyramid
  pyramid = p.build(random_map(2, 4))
  labels = jnp.asarray([1, 4])
  full = jax.jit(lambda: backbone.apply({"params": params}, p.ar_inputs(pyramid), labels)[0])()
  assert full.shape == (2, 21, 32)
  cache = backbone.init_cache(2)
  decode = jax.jit(lambda x, c, k: backbone.apply({"params": params}, x, labels, cache=c,
                                                  scale=k), static_argnums=2)
  for k in range(p.num_scales):
    inputs = None if k == 0 else p.up(p.scale(pyramid, k - 1), k)
    z, cache = decode(inputs, cache, k)
    np.testing.assert_allclose(z, p.scale(full, k), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixer", MIXERS)
def test_scale_k_depends_on_nothing_of_the_scales_after_it(mixer):
  """Changing scale k of the pyramid leaves z of scales <= k unchanged (z of scale k is read
  from scales < k) and moves z of scale k + 1."""
  backbone = small_backbone(mixer)
  params = random_params(backbone)
  p = backbone.pyramid
  pyramid = p.build(random_map(2, 4))
  labels = jnp.asarray([0, 3])
  forward = jax.jit(lambda pyr: backbone.apply({"params": params}, p.ar_inputs(pyr), labels)[0])
  base = np.asarray(forward(pyramid))
  for k in range(p.num_scales - 1):
    rows = slice(p.offset(k), p.offset(k) + p.sizes[k])
    moved = np.asarray(forward(pyramid.at[:, rows].add(1.0)))
    through_k = p.offset(k + 1)
    np.testing.assert_array_equal(moved[:, :through_k], base[:, :through_k])
    assert not np.allclose(moved[:, through_k:], base[:, through_k:])


def test_scanned_remat_blocks_give_the_unrolled_numbers_and_decode_with_a_stacked_cache():
  from arjax.layers import transformer as layers
  unrolled = small_backbone("hybrid")
  params = random_params(unrolled)
  scanned = small_backbone("hybrid", scan_layers=True, remat="full")
  stacked = layers.stack_unrolled_blocks(params, "block", 2, "blocks")
  p = unrolled.pyramid
  inputs = p.ar_inputs(p.build(random_map(2, 4)))
  labels = jnp.asarray([0, 1])
  full = jax.jit(lambda: unrolled.apply({"params": params}, inputs, labels)[0])()
  np.testing.assert_allclose(
      jax.jit(lambda: scanned.apply({"params": stacked}, inputs, labels)[0])(), full,
      atol=1e-5, rtol=1e-5)
  z, _ = jax.jit(lambda c: scanned.apply({"params": stacked}, None, labels, cache=c, scale=0))(
      scanned.init_cache(2))
  np.testing.assert_allclose(z, full[:, :1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the sampler

@pytest.mark.parametrize("flow_net", ["token", "scale"])
def test_an_image_is_independent_of_its_batch_under_guidance(flow_net):
  """With the per-token head and with FlowAR's flow net over whole scales."""
  backbone = small_backbone("attention")
  net = (FlowHeadNet(token_dim=3, width=16, depth=1) if flow_net == "token" else
         ScaleFlowNet(token_dim=3, width=16, depth=1, num_heads=2))
  model = ScaleModel(backbone, net, flow_net=flow_net)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), random_map(1, 4),
                               jnp.zeros((1,), jnp.int32))["params"]
  params = dict(nn_unbox(params), backbone=random_params(backbone))
  head = FlowMatching(token_dim=3, solver="euler")
  rng = jax.random.PRNGKey(7)
  run = jax.jit(lambda labels, ids, guided: sample_scales(
      params, labels, rng, jnp.asarray([1.0, 1.5, 2.0]), 1.0, model=model, head=head,
      guided=guided, num_steps=2, image_ids=ids), static_argnums=2)
  together = run(jnp.asarray([1, 2, 3]), jnp.asarray([0, 1, 2]), True)
  assert [s.shape for s in together] == [(3, 1, 3), (3, 4, 3), (3, 16, 3)]
  alone = run(jnp.asarray([3]), jnp.asarray([2]), True)
  for a, b in zip(alone, together):
    np.testing.assert_allclose(a[0], b[2], atol=1e-5, rtol=1e-5)


def nn_unbox(tree):
  return jax.tree.map(lambda p: p.unbox() if hasattr(p, "unbox") else p, tree,
                      is_leaf=lambda p: hasattr(p, "unbox"))


def test_the_family_samples_images_through_the_common_sampler_call():
  """The hybrid mixer with the per-token head (the smoke default is FlowAR's scale flow net)."""
  config = scale_config("hybrid_smoke")
  config.model.flow_net = "token"
  exp = train.Experiment(config)
  state, _ = exp.init_state()
  images = exp.sampler()(state.params, np.array([0, 7, 9]), jax.random.PRNGKey(0),
                         cfg_scale=2.0, cfg_schedule_name="linear")
  assert images.shape == (3, 8, 8, 1) and np.isfinite(np.asarray(images)).all()


# ---------------------------------------------------------------- config errors

@pytest.mark.parametrize("field,value,message", [
    ("scales", (1, 2, 8), r"config.model.scales=\(1, 2, 8\).*side, 4"),
    ("scales", (2, 1, 4), "config.model.scales"),
    ("mixer", "mamba", "config.model.mixer"),
    ("upsample", "cubic", "config.model.upsample"),
    ("chunk_size", 0, "config.model.chunk_size"),
])
def test_a_bad_model_field_is_an_error_naming_it(field, value, message):
  config = scale_config()
  config.model[field] = value
  with pytest.raises(ConfigError, match=message):
    registry.validate(config)
    train.Experiment(config)


def test_the_scale_flow_net_runs_the_flow_heads_algorithm_with_heads_that_split_its_width():
  config = scale_config()
  config.model.flow_heads = 3
  with pytest.raises(ConfigError, match="config.model.flow_heads=3"):
    registry.validate(config)


def test_the_family_needs_a_per_token_head():
  config = scale_config()
  config.head = ml_collections.ConfigDict({"name": "none"})
  with pytest.raises(ConfigError, match="config.head.name='none'"):
    registry.validate(config)


# ---------------------------------------------------------------- training

def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  n = config.train.global_batch_size
  return {"image": rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32),
          "label": (np.arange(n) % 10).astype(np.int32)}


@pytest.mark.parametrize("flow_net", ["token", "scale"])
def test_sharded_scale_step_equals_single_device_step(flow_net):
  """On data 2 x fsdp 2 x tensor 2, the activations sharded by the rules too (but for the
  scale flow net's own, which the rules leave alone: with them XLA computed this mesh's
  gradients wrong, flow_net.py)."""
  config = scale_config()
  config.model.flow_net = flow_net
  config.train.num_steps = 100
  single_mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                                  sharding.MESH_AXES)
  single = train.Experiment(config, mesh=single_mesh)
  state, shardings_1 = single.init_state()
  step_1 = single.jit_step(shardings_1)
  batch = random_batch(config)
  for _ in range(6):  # leave the all-zero AdaLN init (Adam amplifies roundoff in ~0 gradients)
    state, _ = step_1(state, sharding.global_batch(batch, single.mesh))
  host_state = jax.device_get(state)

  config.mesh.shape = (2, 2, 2)
  sharded = train.Experiment(config)
  _, shardings_8 = sharded.abstract_state()
  state_8 = jax.device_put(host_state, shardings_8)
  query = state_8.params["backbone"]["block_0"]["attn"]["query"]["kernel"]
  assert query.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  next_8, metrics_8 = sharded.jit_step(shardings_8)(
      state_8, sharding.global_batch(batch, sharded.mesh))
  next_1, metrics_1 = step_1(state, sharding.global_batch(batch, single.mesh))
  np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics_8["grad_norm"], metrics_1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(next_8.params), jax.tree.leaves(next_1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_resume_continues_bit_for_bit(tmp_path, data_dir):
  """With dropout: its draws, the label drops and the flow noise all come from the step's
  key, which the checkpoint holds."""
  config = scale_config()
  config.data.data_dir = data_dir
  config.model.attention_dropout = config.model.dropout = 0.1
  family_testing.assert_resume_continues_bit_for_bit(config, tmp_path)

@pytest.mark.parametrize("size,millions", [("small", 170.2), ("base", 300.2), ("large", 586.3),
                                           ("huge", 1910)])
def test_the_imagenet_configs_validate_and_build_at_flowars_sizes(size, millions):
  """FlowAR-S/B/L/H: about 170M / 300M / 589M / 1.9B parameters in the paper."""
  config = configs.load(str(REPO_ROOT / f"configs/imagenet256_flowar_{size}.py"))
  registry.validate(config)
  assert tuple(config.model.scales) == (1, 2, 4, 8, 16)
  tokenizer = registry.make_tokenizer(config.tokenizer, config.data, abstract=True)
  model, _, _ = registry.build_model(config, tokenizer)
  family = registry.family(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             *family.example_inputs(tokenizer))["params"])
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
  assert abs(count / 1e6 - millions) < 0.01 * millions
  hybrid = configs.load(str(REPO_ROOT / f"configs/imagenet256_flowar_{size}.py:hybrid"))
  registry.validate(hybrid)
  assert hybrid.model.mixer == "hybrid"
