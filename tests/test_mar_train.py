"""MAR training: MAR's mask distribution, static shapes (one program for every mask), sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.config import schema as configs
from arjax.parallel import sharding
from arjax.training import loop as train
from arjax.families.masked import model as masked_ar
from arjax.families.masked.backbone import MarBackbone
from conftest import REPO_ROOT


def mar_config(variant="smoke", **overrides):
  config = configs.load(str(REPO_ROOT / f"configs/digits_mar.py:{variant}"))
  for key, value in overrides.items():
    section, field = key.split("__")
    config[section][field] = value
  return config


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  n = config.train.global_batch_size
  return {"image": rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32),
          "label": (np.arange(n) % 10).astype(np.int32)}


def test_mask_counts_follow_mars_truncated_normal():
  """ceil(L * r), r ~ N(1, 0.25) truncated to [0.7, 1]: range, and the mean of that law."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  counts = np.asarray(jax.vmap(lambda k: masked_ar.sample_num_masked(k, 256, 0.7))(keys))
  assert counts.min() >= 180 and counts.max() <= 256  # ceil(256 * 0.7) = 180
  # E[r] for N(1, .25) on [0.7, 1] = 1 - .25 * phi(-1.2) / (Phi(0) - Phi(-1.2)) = 0.8625.
  assert abs(counts.mean() / 256 - 0.8625) < 0.01
  assert len(np.unique(counts)) > 50  # a spread, not a constant


def test_a_wider_law_reaches_the_few_masked_tokens_of_late_sampling_steps():
  """digits_mar's law (min 0, std 1): every count from 1 to L, never 0 (no loss without targets)."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  counts = np.asarray(jax.vmap(lambda k: masked_ar.sample_num_masked(k, 16, 0.0, 1.0))(keys))
  assert set(np.unique(counts)) == set(range(1, 17))
  assert (counts <= 2).mean() > 0.05  # MAR's own law: never below ceil(16 * 0.7) = 12
  assert masked_ar.max_kept(16, 0.0) == 15


def test_masks_hide_the_first_tokens_of_a_random_order_per_row():
  orders = np.asarray(masked_ar.random_orders(jax.random.PRNGKey(1), 6, 16))
  assert all(sorted(row) == list(range(16)) for row in orders)
  assert len({tuple(row) for row in orders}) == 6  # each row its own order
  mask = np.asarray(masked_ar.mask_by_order(5, orders))
  assert (mask.sum(axis=1) == 5).all()
  for row, m in zip(orders, mask):
    assert set(np.flatnonzero(m)) == set(row[:5])


def test_buckets_cover_every_possible_kept_count():
  assert masked_ar.max_kept(256, 0.7) == 76
  assert masked_ar.bucket_sizes(76, 4) == (19, 38, 57, 76)
  assert masked_ar.bucket_sizes(4, 2) == (2, 4)
  assert masked_ar.bucket_sizes(3, 8) == (1, 2, 3)  # never more buckets than counts
  assert masked_ar.bucket_sizes(0, 4) == (0,)


def test_padding_the_encoder_changes_no_number():
  """Rows past a row's kept count are padding: z is the same for any padded size."""
  model = MarBackbone(seq_len=16, token_dim=4, encoder_embed_dim=32, encoder_depth=2,
                      encoder_num_heads=2, decoder_embed_dim=24, decoder_depth=1,
                      decoder_num_heads=2, num_classes=3, buffer_size=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 4))
  mask = masked_ar.mask_by_order(12, masked_ar.random_orders(jax.random.PRNGKey(1), 3, 16))
  labels = jnp.array([0, 1, 2])
  apply = jax.jit(lambda p, kept: model.apply(p, x, mask, labels, kept), static_argnums=1)
  params = jax.jit(model.init, static_argnums=4)(jax.random.PRNGKey(2), x, mask, labels, 4)
  exact = apply(params, 4)
  for padded in (5, 9, 16):
    np.testing.assert_allclose(apply(params, padded), exact, rtol=2e-6, atol=2e-6)


def test_train_step_compiles_once_over_50_steps_of_changing_masks():
  """50 steps whose kept counts hit every bucket: one compilation, no retrace."""
  config = mar_config()
  config.train.num_steps = 60
  exp = train.Experiment(config)
  state, shardings = exp.init_state()
  step = exp.jit_step(shardings)
  batch = sharding.global_batch(random_batch(config), exp.mesh)
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if event == (
      "/jax/core/compile/backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    rng = jax.device_get(state.rng)  # the step donates the state
    losses = []
    for _ in range(50):
      state, metrics = step(state, batch)
      losses.append(metrics["loss"])
    losses = np.asarray(jax.device_get(losses))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert step._cache_size() == 1
  # The step itself compiles at most once (not at all when the persistent compilation
  # cache of tests/conftest.py already holds it); a handful of tiny helper programs (e.g.
  # the host loop's array ops) may compile too, but nothing scales with the number of steps.
  assert len(compiles) <= 3, compiles
  assert np.isfinite(losses).all()
  # The masks really changed: the drawn kept counts cover both buckets of this config.
  buckets = masked_ar.bucket_sizes(masked_ar.max_kept(16, 0.7), config.model.mask_buckets)
  kept = [16 - int(masked_ar.sample_num_masked(
      jax.random.split(jax.random.fold_in(rng, i), 4)[0], 16, 0.7)) for i in range(50)]
  used = {int(np.searchsorted(buckets, k)) for k in kept}
  assert used == set(range(len(buckets))), (kept, buckets)


def test_sharded_mar_step_equals_single_device_step():
  """On data 2 x fsdp 2 x tensor 2, with the activations sharded by the rules too. (The head
  is the flow head; MAR's DDPM head shards alike, being the same AdaLN MLP. One mask bucket:
  the buckets are branches of one program, their equality is test_the_head_on_masked_... )"""
  config = mar_config("smoke", model__mask_buckets=1)
  config.train.num_steps = 100
  single_mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                                  sharding.MESH_AXES)
  single = train.Experiment(config, mesh=single_mesh)
  state, shardings_1 = single.init_state()
  step_1 = single.jit_step(shardings_1)
  batch = random_batch(config)
  for _ in range(4):  # leave the all-zero AdaLN init (see tests/test_train.py)
    state, _ = step_1(state, sharding.global_batch(batch, single.mesh))
  host_state = jax.device_get(state)

  config.mesh.shape = (2, 2, 2)
  sharded = train.Experiment(config)
  _, shardings_8 = sharded.abstract_state()
  state_8 = jax.device_put(host_state, shardings_8)
  qkv = state_8.params["backbone"]["encoder_blocks_0"]["attn"]["query"]["kernel"]
  assert qkv.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  next_8, metrics_8 = sharded.jit_step(shardings_8)(
      state_8, sharding.global_batch(batch, sharded.mesh))
  next_1, metrics_1 = step_1(state, sharding.global_batch(batch, single.mesh))
  np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics_8["grad_norm"], metrics_1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(next_8.params), jax.tree.leaves(next_1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert any(not np.allclose(a, b) for a, b in
             zip(jax.tree.leaves(next_1.params), jax.tree.leaves(host_state.params)))


class _DeterministicHead:
  """A head algorithm whose per-token loss draws nothing: a function of (x, z) alone, so the
  loss over masked tokens can be compared number for number with MAR's all-token form."""
  batch_mul = 1

  def loss(self, net_fn, x, z, rng):
    del rng
    return jnp.mean((net_fn(x, jnp.full((x.shape[0],), 0.3), z) - x) ** 2, axis=-1)


def test_the_head_on_masked_tokens_alone_gives_mars_all_token_loss():
  """MAR runs its head on all L tokens and zero-weights the unmasked ones; masked_loss runs it
  (and the decoder's last block) on each branch's masked positions only: same loss and
  gradients, in every bucket's branch."""
  config = mar_config(model__mask_buckets=3, model__mask_ratio_min=0.0, model__mask_ratio_std=1.0)
  exp = train.Experiment(config)
  model, num_tokens = exp.model, exp.tokenizer.num_tokens
  buckets = masked_ar.bucket_sizes(masked_ar.max_kept(num_tokens, 0.0), 3)
  assert len(buckets) == 3 and masked_ar.head_rows(num_tokens, buckets) == (
      num_tokens, num_tokens - buckets[0] - 1, num_tokens - buckets[1] - 1)
  head = _DeterministicHead()
  params = exp.init_state()[0].params
  tokens = jax.random.normal(jax.random.PRNGKey(3), (4, num_tokens, exp.tokenizer.token_dim))
  labels = jnp.arange(4) % 10

  def all_tokens_loss(params, rng):  # MAR's form, with masked_loss's draws
    count_rng, order_rng, drop_rng, _ = jax.random.split(rng, 4)
    num_masked = masked_ar.sample_num_masked(count_rng, num_tokens, 0.0, 1.0)
    mask = masked_ar.mask_by_order(num_masked, masked_ar.random_orders(order_rng, 4, num_tokens))
    drop = jax.random.uniform(drop_rng, (4,)) < config.model.label_drop
    apply = lambda *a, **k: model.apply({"params": params}, *a, **k)
    z = apply(tokens, mask, labels, num_tokens, drop, method=masked_ar.MaskedARModel.condition)
    net_fn = lambda x_t, t, zz: apply(x_t, t, zz, method=masked_ar.MaskedARModel.head_net)
    per_token = head.loss(net_fn, tokens.reshape(4 * num_tokens, -1), z.reshape(4 * num_tokens, -1),
                          None)
    weights = mask.reshape(-1).astype(jnp.float32)
    return jnp.sum(per_token * weights) / jnp.sum(weights), num_tokens - num_masked

  def masked_only(params, rng):
    return masked_ar.masked_loss(params, tokens, labels, rng, model=model, head=head,
                                 label_drop=config.model.label_drop, mask_ratio_min=0.0,
                                 mask_ratio_std=1.0, buckets=buckets)

  reference = jax.jit(jax.value_and_grad(all_tokens_loss, has_aux=True))
  ours = jax.jit(jax.value_and_grad(masked_only))
  branches = set()
  for seed in range(12):
    rng = jax.random.PRNGKey(seed)
    (want, kept), want_grads = reference(params, rng)
    got, got_grads = ours(params, rng)
    branches.add(int(np.searchsorted(buckets, int(kept))))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6),
                 got_grads, want_grads)
  assert len(branches) >= 2, branches  # more than one branch was exercised
