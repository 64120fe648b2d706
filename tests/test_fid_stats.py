"""`python -m arjax fid_stats`: reference statistics of a dataset split, streamed and cached.

The split is read in batches, each process its own block (the blocks cover it once); the
command writes the pool3 mean and covariance of the FID Inception (random weights here, in
the converter's file format) that `reference_statistics.load` reads, and a second run reads
the cache instead of recomputing.
"""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from arjax.config import schema as configs
from arjax.data import pipeline
from arjax.evaluation import inception
from arjax.evaluation import reference_statistics
import inception_testing
from conftest import REPO_ROOT


def _digits(data_dir):
  config = configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))
  config.data.data_dir = data_dir
  return config


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_the_processes_blocks_of_a_split_cover_it_once_in_order(data_dir, processes):
  d = _digits(data_dir).data
  whole, _ = pipeline.load_split(d, d.eval_split)
  blocks = [np.concatenate(list(pipeline.split_image_batches(
      d, d.eval_split, 64, process_index=p, process_count=processes)))
      for p in range(processes)]
  np.testing.assert_array_equal(np.concatenate(blocks), whole)
  assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1


def _fid_stats(weights, out, data_dir, *extra, env=None):
  command = [sys.executable, "-m", "arjax", "fid_stats", "--config=configs/digits.py:smoke",
             f"--inception={weights}", "--split=test[:8]", f"--out={out}", *extra]
  env = dict(os.environ if env is None else env, ARJAX_DATA_DIR=data_dir)
  return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finished(*procs):
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
  return outputs


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_dir):
  """(weights dir, statistics file, output) of one 8-device fid_stats run on test[:8]."""
  tmp = tmp_path_factory.mktemp("fid_stats")
  weights = inception_testing.write_random_params(str(tmp / "inception"))
  out = tmp / "stats.npz"
  output, = _finished(_fid_stats(weights, out, data_dir, "--batch=8"))
  return weights, out, output


@pytest.mark.slow
def test_fid_stats_writes_loadable_statistics_and_reuses_them(one_process, data_dir):
  weights, out, output = one_process
  assert f"split 'test[:8]' (8 images, 8px): {out}" in output
  stats = reference_statistics.load(str(out), dim=inception.POOL3_DIM)
  assert stats.count == 8 and stats.sigma.shape == (2048, 2048)
  written = out.stat().st_mtime_ns
  again, = _finished(_fid_stats(weights, out, data_dir, "--batch=8"))
  assert "recomputing" not in again and out.stat().st_mtime_ns == written


@pytest.mark.slow
def test_two_processes_write_the_statistics_of_one(one_process, data_dir, tmp_path):
  """Each process streams its half of the split through its own 4 devices; the merged
  moments are those of the whole split."""
  weights, single, _ = one_process
  out = tmp_path / "stats.npz"
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  _finished(*[_fid_stats(weights, out, data_dir, "--batch=4",
                         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                         f"--process_id={i}", env=env) for i in range(2)])
  one = reference_statistics.load(str(single))
  two = reference_statistics.load(str(out))
  assert two.count == one.count == 8
  for a, b in ((two.mu, one.mu), (two.sigma, one.sigma)):
    assert np.max(np.abs(a - b)) <= 1e-6 * np.max(np.abs(b))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
