"""The pjit-sharded train step: same numbers on any mesh, parameters sharded by the rules, exact resume."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from arjax.training import checkpoint
from arjax.config import schema as configs
from arjax.parallel import sharding
from arjax.training import loop as train
import family_testing
from conftest import REPO_ROOT


def smoke_config(**mesh):
  config = configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))
  config.mesh.shape = mesh.get("shape", (-1, 1, 1))
  return config


def fixed_batch(config):
  rng = np.random.default_rng(0)
  n = config.train.global_batch_size
  return {"image": rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32),
          "label": (np.arange(n) % 10).astype(np.int32)}


def _max_relative_error(a, b):
  errs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                                         / max(float(np.max(np.abs(np.asarray(y)))), 1e-12)), a, b)
  return max(jax.tree.leaves(errs))


WARMUP_STEPS = 12


def test_sharded_step_equals_single_device_step():
  """One step from the same state: (4, 2) mesh vs one device, to float32 reduction-order noise.

  The state is first warmed up by a few steps: from init, biases and the
  zero-initialised AdaLN layers are ~0 and get gradients near rounding level,
  and Adam's g / sqrt(v) turns rounding noise into lr-sized updates — a
  property of the optimizer, not of sharding, which would swamp the
  per-parameter relative error this test bounds.
  """
  config = smoke_config()
  config.train.num_steps = 100
  single_mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
  single = train.Experiment(config, mesh=single_mesh)
  state, shardings_1 = single.init_state()
  step_1 = single.jit_step(shardings_1)
  batch = fixed_batch(config)
  for _ in range(WARMUP_STEPS):
    state, _ = step_1(state, sharding.global_batch(batch, single.mesh))

  host_state = jax.device_get(state)  # the steps donate their input; keep a copy
  config.mesh.shape = (4, 2, 1)
  sharded = train.Experiment(config)
  _, shardings_8 = sharded.abstract_state()
  state_8 = jax.device_put(host_state, shardings_8)
  assert state_8.params["backbone"]["token_in"]["kernel"].sharding.mesh.devices.size == 8
  next_8, metrics_8 = sharded.jit_step(shardings_8)(state_8, sharding.global_batch(batch, sharded.mesh))
  next_1, metrics_1 = step_1(state, sharding.global_batch(batch, single.mesh))

  np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics_8["grad_norm"], metrics_1["grad_norm"], rtol=1e-5)
  assert _max_relative_error(next_8.params, next_1.params) <= 1e-5
  assert _max_relative_error(next_8.ema_params, next_1.ema_params) <= 1e-5
  assert _max_relative_error(next_8.opt_state, next_1.opt_state) <= 1e-5
  # The step did something: the comparison is not between two copies of the input.
  assert _max_relative_error(next_1.params, host_state.params) > 1e-4


@pytest.mark.parametrize("shape", [(4, 2, 1), (2, 2, 2)])
def test_parameters_and_optimizer_state_are_sharded_as_the_rules_say(shape):
  config = smoke_config(shape=shape)
  exp = train.Experiment(config)
  state, _ = exp.init_state()
  fsdp, tensor = exp.mesh.shape["fsdp"], exp.mesh.shape["tensor"]
  gate = state.params["backbone"]["block_0"]["mlp"]["gate"]["kernel"]  # (embed, mlp)
  assert gate.sharding.spec == P("fsdp", "tensor")
  assert gate.addressable_shards[0].data.shape == (gate.shape[0] // fsdp, gate.shape[1] // tensor)
  query = state.params["backbone"]["block_0"]["attn"]["query"]["kernel"]  # (embed, heads, kv)
  assert query.sharding.spec == P("fsdp", "tensor", None)
  assert query.addressable_shards[0].data.shape == (
      query.shape[0] // fsdp, query.shape[1] // tensor, query.shape[2])
  norm = state.params["backbone"]["block_0"]["attn_norm"]["scale"]
  assert norm.sharding.is_fully_replicated
  # Adam's moments follow their parameters; so does the EMA.
  mu = state.opt_state[1][0].mu["backbone"]["block_0"]["mlp"]["gate"]["kernel"]
  assert mu.sharding == gate.sharding
  assert state.ema_params["backbone"]["block_0"]["mlp"]["gate"]["kernel"].sharding == gate.sharding


def test_resume_continues_bit_for_bit(tmp_path, data_dir):
  """With dropout and translated images too: their draws come from the step's key and the
  data stream's seed, both in the checkpoint."""
  config = smoke_config()
  config.data.data_dir = data_dir
  config.model.attention_dropout = config.model.dropout = config.head.dropout = 0.1
  config.data.random_translate = 1
  family_testing.assert_resume_continues_bit_for_bit(config, tmp_path)

def test_batch_must_split_over_the_mesh():
  config = smoke_config(shape=(8, 1, 1))
  config.train.global_batch_size = 12
  with pytest.raises(configs.ConfigError, match="global_batch_size=12"):
    train.Experiment(config)



def test_bfloat16_compute_keeps_float32_master_weights():
  config = smoke_config()
  config.model.dtype = "bfloat16"
  exp = train.Experiment(config)
  state, shardings = exp.init_state()
  before = jax.device_get(state.params)
  state, metrics = exp.jit_step(shardings)(state, sharding.global_batch(fixed_batch(config), exp.mesh))
  state, metrics = exp.jit_step(shardings)(state, sharding.global_batch(fixed_batch(config), exp.mesh))
  assert np.isfinite(float(metrics["loss"]))
  for leaf in jax.tree.leaves((state.params, state.ema_params, state.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  # ...and the bfloat16 step really updated them.
  kernel = "backbone", "block_0", "mlp", "up", "kernel"
  a, b = before, jax.device_get(state.params)
  for k in kernel:
    a, b = a[k], b[k]
  assert np.any(a != b)


def test_a_non_finite_step_changes_nothing_but_is_counted():
  config = smoke_config()
  exp = train.Experiment(config)
  state, shardings = exp.init_state()
  step = exp.jit_step(shardings)
  before = jax.device_get(state)
  poisoned = fixed_batch(config)
  poisoned["image"][0, 0, 0, 0] = np.nan  # one bad pixel makes the loss NaN
  state, metrics = step(state, sharding.global_batch(poisoned, exp.mesh))
  assert not np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 1
  assert int(state.step) == 1 and int(state.nonfinite_streak) == 1
  after = jax.device_get(state)
  for name in ("params", "ema_params", "opt_state"):
    for a, b in zip(jax.tree.leaves(getattr(after, name)), jax.tree.leaves(getattr(before, name))):
      np.testing.assert_array_equal(a, b)
  # Good steps resume from there (two: optax's warmup gives its first update lr 0).
  for _ in range(2):
    state, metrics = step(state, sharding.global_batch(fixed_batch(config), exp.mesh))
    assert int(metrics["skipped"]) == 0 and int(state.nonfinite_streak) == 0
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before.params)))


def test_too_many_non_finite_steps_in_a_row_stop_training_naming_step_and_metric():
  metrics = {"loss": float("nan"), "grad_norm": 1.0}
  train.check_finite(2, metrics, done=10, limit=3)  # below the limit: carry on
  with pytest.raises(train.NonFiniteError, match=r"step 10: loss non-finite for 3 consecutive "
                     r"steps since step 8 \(config.train.max_nonfinite_steps=3\)"):
    train.check_finite(3, metrics, done=10, limit=3)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # lr=1e39
def test_a_non_finite_update_from_finite_gradients_is_skipped_and_never_checkpointed(
    tmp_path, data_dir):
  """The loss and gradients are finite, the update is not: a learning rate of 1e39 is inf in
  float32 (and the warmup's first rate inf * 0 = NaN). Those updates are skipped as well, so
  the state, and every checkpoint of it, keeps the last finite parameters."""
  config = smoke_config()
  config.data.data_dir = data_dir
  config.train.learning_rate = 1e39
  config.train.num_steps = 2
  config.train.checkpoint_every = 2
  config.train.max_nonfinite_steps = 5
  exp = train.Experiment(config)
  initial = jax.device_get(exp.init_state()[0])
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2 and int(state.nonfinite_streak) == 2
  saved = checkpoint.Checkpointer(str(tmp_path), keep=2, save_every=2).restore(
      exp.abstract_state()[0])
  assert int(saved.step) == 2
  for name in ("params", "ema_params", "opt_state"):
    for a, b in zip(jax.tree.leaves(getattr(saved, name)), jax.tree.leaves(getattr(initial, name))):
      assert np.all(np.isfinite(np.asarray(a)))
      np.testing.assert_array_equal(np.asarray(a), b)
