"""Sharding as data: the rules table decides where every parameter and optimizer moment lives,
mistakes in it fail at start-up, and checkpoints move between meshes of any shape."""
import math
import shutil

import jax
import numpy as np
import pytest
import flax.linen as nn
from jax.sharding import PartitionSpec as P

from arjax.config import schema as configs
from arjax.commands import sample as generate
from arjax.parallel import sharding
from arjax.training import loop as train
from arjax.training.experiment import Experiment
from tests.conftest import REPO_ROOT


def _config(data_dir=None, mesh=(1, 4, 2), **changes):
  config = configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))
  config.data.data_dir = data_dir
  config.mesh.shape = mesh
  config.train.schedule = "constant"
  for key, value in changes.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def _mesh(shape):
  config = _config(mesh=shape)
  return sharding.make_mesh(config.mesh, jax.devices()[:math.prod(shape)])


# -----------------------------------------------------------------------------
# Every rule is applied.


@pytest.fixture(scope="module")
def sharded_state():
  exp = Experiment(_config(mesh=(2, 2, 2)))
  state, _ = exp.init_state()
  return exp, state


def test_fsdp_and_tensor_rules_shard_parameters_and_adam_moments(sharded_state):
  _, state = sharded_state
  block = state.params["backbone"]["block_0"]
  mu = state.opt_state[1][0].mu["backbone"]["block_0"]  # (clip, adamw) -> adam's state
  nu = state.opt_state[1][0].nu["backbone"]["block_0"]
  expected = {
      ("mlp", "gate", "kernel"): P("fsdp", "tensor"),          # embed -> fsdp, mlp -> tensor
      ("mlp", "down", "kernel"): P("tensor", "fsdp"),
      ("attn", "query", "kernel"): P("fsdp", "tensor", None),  # heads -> tensor, kv replicated
      ("attn", "out", "kernel"): P("tensor", None, "fsdp"),
      ("attn", "query", "bias"): P("tensor", None),
      ("attn_norm", "scale"): P(None),                         # norm replicated
  }
  for path, spec in expected.items():
    for tree in (block, mu, nu):
      leaf = tree
      for key in path:
        leaf = leaf[key]
      assert leaf.sharding.spec == spec, (path, leaf.sharding.spec)
  assert state.params["backbone"]["class_embed"].sharding.spec == P(None, "fsdp")


def test_each_device_holds_only_its_shard_of_every_array(sharded_state):
  exp, state = sharded_state
  abstract, _ = exp.abstract_state()
  boxed = jax.eval_shape(lambda: exp.model.init(jax.random.PRNGKey(0), exp.example_tokens,
                                                exp.example_labels)["params"])
  names = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, P))
  rules = dict(exp.rules)
  for spec, leaf in zip(names, jax.tree.leaves(state.params)):
    want = []
    for dim, name in zip(leaf.shape, spec):
      axes = rules[name] if name is not None else None
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      want.append(dim // math.prod(exp.mesh.shape[a] for a in axes))
    for shard in leaf.addressable_shards:
      assert shard.data.shape == tuple(want)


def test_a_dimension_the_mesh_does_not_divide_is_a_startup_error_naming_it():
  config = _config(mesh=(2, 1, 4), **{"model.num_heads": 2})
  with pytest.raises(sharding.ShardingError) as e:
    Experiment(config).abstract_state()
  message = str(e.value)
  assert "'heads' dimension is 2" in message and "('tensor',)" in message
  assert "config.mesh.shape=(2, 1, 4)" in message


def test_a_logical_axis_without_a_rule_is_a_startup_error():
  config = _config()
  config.sharding.rules = tuple(r for r in config.sharding.rules if r[0] != "mlp")
  with pytest.raises(sharding.ShardingError, match="logical axis 'mlp'.*does not list"):
    Experiment(config).abstract_state()


@pytest.mark.parametrize("shape, message", [
    ((3, -1, 1), "cannot be filled with 8 devices"),
    ((2, 2, 1), "needs 4 devices, 8 are present"),
    ((-1, -1, 1), "at most one -1"),
])
def test_a_mesh_that_does_not_fit_the_devices_is_a_config_error(shape, message):
  with pytest.raises(configs.ConfigError, match=message.replace("(", r"\(")):
    Experiment(_config(mesh=shape))


# -----------------------------------------------------------------------------
# Checkpoints move between meshes.


@pytest.fixture(scope="module")
def saved_on_4x2(data_dir, tmp_path_factory):
  """2 steps trained and checkpointed on fsdp 4 x tensor 2 (8 devices), with a reference
  third step taken on the same mesh."""
  workdir = str(tmp_path_factory.mktemp("saved_on_4x2"))
  state = train.train_and_evaluate(_config(data_dir, **{"train.num_steps": 2}), workdir)
  params = jax.tree.map(np.asarray, state.params)
  reference_dir = str(tmp_path_factory.mktemp("reference"))
  shutil.copytree(workdir, reference_dir, dirs_exist_ok=True)
  third = train.train_and_evaluate(_config(data_dir, **{"train.num_steps": 3}), reference_dir)
  return workdir, params, jax.tree.map(np.asarray, third.params)


@pytest.mark.parametrize("shape", [(1, 2, 2), (1, 1, 1)])  # fewer devices, tensor-sharded; one
def test_a_checkpoint_restores_onto_another_mesh_and_training_continues(
    saved_on_4x2, data_dir, tmp_path, shape):
  workdir, params, reference_third = saved_on_4x2
  config = _config(data_dir, mesh=shape, **{"train.num_steps": 3})
  exp = Experiment(config, mesh=_mesh(shape))
  restored, _ = generate.restore_params(exp, workdir, use_ema=False)
  for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    assert leaf.sharding.mesh.devices.shape == shape
    np.testing.assert_array_equal(np.asarray(leaf), want)

  moved = str(tmp_path / "moved")
  shutil.copytree(workdir, moved)
  third = train.train_and_evaluate(config, moved, mesh=_mesh(shape))
  assert int(third.step) == 3
  for got, want in zip(jax.tree.leaves(third.params), jax.tree.leaves(reference_third)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_sampling_from_a_checkpoint_works_on_any_device_count(saved_on_4x2, data_dir):
  workdir, _, _ = saved_on_4x2
  images = {}
  for shape in ((1, 4, 2), (1, 1, 1)):
    exp = Experiment(_config(data_dir, mesh=shape), mesh=_mesh(shape))
    params, step = generate.restore_params(exp, workdir, use_ema=True)
    assert step == 2
    labels = np.arange(10)
    images[shape] = generate.sample_images(exp, params, labels, progress=False)
  a, b = (images[s].astype(int) for s in images)
  # Different meshes sum in different orders: pixels may differ by a rounding step, no more.
  assert np.abs(a - b).max() <= 1 and np.mean(a != b) < 0.01
