"""What every family must show, written once: a sharded step equals the single-device step, and
a resumed run ends bit for bit where an uninterrupted one does. Each family's test module calls
these with its own smoke config (tests/test_train.py, test_mar_train.py, test_xar.py, ...)."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np

from arjax import registry
from arjax.parallel import sharding
from arjax.training import loop as train
from conftest import REPO_ROOT

# From init, biases and the zero-initialised AdaLN layers are ~0 and get gradients near rounding
# level; Adam's g / sqrt(v) turns that noise into lr-sized updates, a property of the optimizer,
# not of sharding. A few steps first leave that regime.
WARMUP_STEPS = 4


def built_with_perturbed_params(config):
  """(tokenizer, model, head, params) of `config`, every parameter perturbed so that all of them
  count (the heads' output layers start at zero, which would hide whatever feeds them)."""
  tok = registry.make_tokenizer(config.tokenizer, config.data)
  model, head, _ = registry.build_model(config, tok)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1),
                                    *registry.family(config).example_inputs(tok))["params"])
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = treedef.unflatten([p + 0.05 * jax.random.normal(k, p.shape)
                              for p, k in zip(leaves, keys)])
  return tok, model, head, params


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  n = config.train.global_batch_size
  size, channels = config.data.image_size, config.data.channels
  return {"image": rng.uniform(-1, 1, (n, size, size, channels)).astype(np.float32),
          "label": (np.arange(n) % config.data.num_classes).astype(np.int32)}


def max_relative_error(a, b) -> float:
  errors = [float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / max(np.max(np.abs(np.asarray(y))), 1e-30))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return max(errors)


def one_step_on_two_meshes(config, mesh_shape, batch=None):
  """(sharded, single): (next state, metrics) of one step from the same warmed-up state, on
  `mesh_shape` (8 devices) and on one device, plus the state both started from (host copy) and
  the sharded input state (to check its shardings)."""
  config = config.copy_and_resolve_references()
  config.train.num_steps = max(config.train.num_steps, 100)  # a schedule past warm-up
  batch = random_batch(config) if batch is None else batch
  single_mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                                  sharding.MESH_AXES)
  single = train.Experiment(config, mesh=single_mesh)
  state, shardings_1 = single.init_state()
  step_1 = single.jit_step(shardings_1)
  for _ in range(WARMUP_STEPS):
    state, _ = step_1(state, sharding.global_batch(batch, single.mesh))
  start = jax.device_get(state)  # the steps donate their input; keep a copy

  config.mesh.shape = tuple(mesh_shape)
  sharded = train.Experiment(config)
  _, shardings_8 = sharded.abstract_state()
  state_8 = jax.device_put(start, shardings_8)
  out_8 = sharded.jit_step(shardings_8)(state_8, sharding.global_batch(batch, sharded.mesh))
  out_1 = step_1(state, sharding.global_batch(batch, single.mesh))
  return out_8, out_1, start, state_8


def assert_sharded_step_equals_single_device_step(config, mesh_shape, *, rtol=1e-4, atol=1e-6):
  """Loss and gradient norm to float32 reduction-order noise, every parameter within
  rtol/atol, and the step moved the parameters. Returns the sharded input state."""
  (next_8, metrics_8), (next_1, metrics_1), start, state_8 = one_step_on_two_meshes(
      config, mesh_shape)
  np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics_8["grad_norm"], metrics_1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(next_8.params), jax.tree.leaves(next_1.params)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
  assert any(not np.allclose(a, b) for a, b in
             zip(jax.tree.leaves(next_1.params), jax.tree.leaves(start.params)))
  return state_8


def assert_resume_continues_bit_for_bit(config, tmp_path):
  """4 steps straight vs 2 steps, stop, resume to 4 (checkpoints every 2): every leaf of the
  final state equal, and the resumed run really moved from the checkpoint."""
  config = config.copy_and_resolve_references()
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


def run_cli(*args, data_dir):
  """`python -m arjax ARGS` on one CPU device (the smoke programs then come from the shared
  compilation cache), the data in `data_dir`; its stdout, or a failure showing both streams."""
  env = dict(os.environ, ARJAX_DATA_DIR=data_dir, PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run([sys.executable, "-m", "arjax", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, f"arjax {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
  return result.stdout


def assert_cli_trains_samples_and_scores(config_arg: str, workdir: str, data_dir: str):
  """`train` (the smoke config's 4 steps), `sample` (20 images, 2 of each class) and `eval`
  through `python -m arjax --config=config_arg`, each finishing with its output written."""
  common = [f"--config={config_arg}", f"--workdir={workdir}"]
  assert "trained to step 4" in run_cli("train", *common, data_dir=data_dir)
  run_cli("sample", *common, data_dir=data_dir)
  with np.load(os.path.join(workdir, "samples.npz")) as f:
    assert f["images"].shape == (20, 8, 8, 1) and list(np.bincount(f["labels"])) == [2] * 10
  run_cli("eval", *common, data_dir=data_dir)
  with open(os.path.join(workdir, "eval.json")) as f:
    assert 0 <= json.load(f)["model"]["class_consistency"] <= 1
