"""The multi-host path on one box: real processes joined by JAX's distributed runtime over gloo.

Two `python -m arjax train` processes with 4 CPU devices each form one 8-device job on a
(data 2, fsdp 2, tensor 2) mesh; the same training in this test process (1 process x 8
devices) must reach the same parameters, and a checkpoint the 2-process job wrote must
resume here, in one process, and continue exactly as a 1-process run would.
"""
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from arjax.commands import sample as generate
from arjax.training import checkpoint
from arjax.config import schema as configs
from arjax.parallel import distributed
from arjax.evaluation import plots
from arjax.training import loop as train
from arjax.training.experiment import Experiment
from tests.conftest import REPO_ROOT

STEPS = 4
OVERRIDES = {
    "mesh.shape": (2, 2, 2),
    "train.schedule": "constant",  # so that training on to a later num_steps changes nothing before
    "train.num_steps": STEPS,
    "train.checkpoint_every": 2,
}


def _config(data_dir, **changes):
  config = configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))
  config.data.data_dir = data_dir
  for key, value in {**OVERRIDES, **changes}.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_process_run(data_dir, workdir, command="train", *extra):
  """`python -m arjax COMMAND` as one job of two processes with 4 CPU devices each."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  flags = [f"--config={REPO_ROOT / 'configs/digits.py:smoke'}", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}", "--config.mesh.shape=(2,2,2)",
           "--config.train.schedule=constant", f"--config.train.num_steps={STEPS}",
           "--config.train.checkpoint_every=2", *extra,
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  procs = [subprocess.Popen([sys.executable, "-m", "arjax", command, *flags, f"--process_id={i}"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=900)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
  return outputs


def _restored_params(config, workdir, step):
  exp = Experiment(config)
  ckpt = checkpoint.Checkpointer(workdir, keep=5, save_every=1, async_save=False)
  state = ckpt.restore(exp.abstract_state()[0], step=step)
  ckpt.close()
  return state


def _assert_close(a, b, atol=1e-5):
  for path, x, y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(a),
                        jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol,
                               err_msg=jax.tree_util.keystr(path[0]))


@pytest.fixture(scope="module")
def two_process_workdir(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("two_processes"))
  outputs = _two_process_run(data_dir, workdir)
  return workdir, outputs


def test_two_processes_train_like_one(two_process_workdir, data_dir, tmp_path):
  workdir, outputs = two_process_workdir
  assert f"trained to step {STEPS}" in outputs[0]
  # Only process 0 writes the config, TensorBoard and the curves; both took part in the
  # checkpoints.
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1
  records = plots.read_records(os.path.join(workdir, "train_metrics.jsonl"))
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # each step once
  assert os.path.exists(os.path.join(workdir, "train_curves.png"))
  single = train.train_and_evaluate(_config(data_dir), str(tmp_path / "one"))
  restored = _restored_params(_config(data_dir), workdir, STEPS)
  _assert_close(restored.params, single.params)
  _assert_close(restored.ema_params, single.ema_params)
  _assert_close(restored.opt_state, single.opt_state)


def test_a_two_process_checkpoint_resumes_in_one_process(two_process_workdir, data_dir,
                                                         tmp_path):
  workdir, _ = two_process_workdir
  resumed_dir = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed_dir)
  longer = _config(data_dir, **{"train.num_steps": STEPS + 2})
  resumed = train.train_and_evaluate(longer, resumed_dir)
  reference = train.train_and_evaluate(longer, str(tmp_path / "reference"))
  assert int(resumed.step) == int(reference.step) == STEPS + 2
  _assert_close(resumed.params, reference.params)
  _assert_close(resumed.opt_state, reference.opt_state)


def test_two_processes_sample_each_image_once_as_one_process_draws_it(two_process_workdir,
                                                                     data_dir, tmp_path):
  """Each process writes the rows its devices hold into its own part files; process 0 merges
  them once both are written (the barriers of arjax/commands/sample_parts.py). 24 images in
  batches of 16: the last batch is padded, and its padding is never written."""
  workdir = str(tmp_path / "sampled")
  shutil.copytree(two_process_workdir[0], workdir)
  request = ["--config.sample.num_images=24", "--config.sample.batch_size=16"]
  outputs = _two_process_run(data_dir, workdir, "sample", *request)
  assert "sample: drew 2 of 2 batches" in outputs[0]
  assert not os.path.exists(os.path.join(workdir, "samples_parts"))  # merged, then removed

  config = _config(data_dir, **{"sample.num_images": 24, "sample.batch_size": 16})
  exp = Experiment(config)
  params, _ = generate.restore_params(exp, workdir, config.sample.use_ema)
  labels = generate.parse_labels("", 24, 10)
  one_process = generate.sample_images(exp, params, labels, progress=False)
  with np.load(os.path.join(workdir, "samples.npz")) as f:
    np.testing.assert_array_equal(f["labels"], labels)
    np.testing.assert_array_equal(f["images"], one_process)


@pytest.mark.parametrize("flags, env, message", [
    (("127.0.0.1:1234", 2, None), {}, "--coordinator_address, --num_processes given without "
                                      "--process_id"),
    ((None, None, None), {"ARJAX_PROCESS_ID": "1"}, "ARJAX_PROCESS_ID given without"),
    (("localhost", 2, 0), {}, "--coordinator_address='localhost': expected HOST:PORT"),
    (("127.0.0.1:1234", 2, 2), {}, "--process_id=2: must lie in [0, 2)"),
    ((None, None, None), {"ARJAX_NUM_PROCESSES": "two"}, "ARJAX_NUM_PROCESSES='two'"),
])
def test_incomplete_or_malformed_coordinates_are_named(flags, env, message):
  with pytest.raises(distributed.SetupError) as e:
    distributed.resolve(*flags, env=env)
  assert message in str(e.value)


def test_coordinates_come_from_flags_then_environment_then_the_cluster():
  env = {"ARJAX_COORDINATOR_ADDRESS": "10.0.0.2:9999", "ARJAX_NUM_PROCESSES": "4",
         "ARJAX_PROCESS_ID": "3"}
  assert distributed.resolve("h:1", 2, 1, env=env).coordinator_address == "h:1"
  from_env = distributed.resolve(env=env)
  assert (from_env.coordinator_address, from_env.num_processes, from_env.process_id) == (
      "10.0.0.2:9999", 4, 3)
  slurm = distributed.resolve(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"})
  assert slurm.joins_a_job and slurm.process_id is None  # JAX's SlurmCluster fills them in
  pod = distributed.resolve(env={"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})
  assert pod.joins_a_job
  assert not distributed.resolve(env={"TPU_WORKER_HOSTNAMES": "w0"}).joins_a_job
  assert not distributed.resolve(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}).joins_a_job
