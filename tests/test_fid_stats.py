"""`python -m arjax fid_stats`: reference statistics of a dataset split, streamed and cached.

The split is read in batches, each process its own block (the blocks cover it once); the
command writes the pool3 mean and covariance of the FID Inception (random weights here, in
the converter's file format) that `reference_statistics.load` reads, and a second run reads
the cache instead of recomputing.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from arjax.config import schema as configs
from arjax.data import pipeline
from arjax.evaluation import inception
from arjax.evaluation import reference_statistics
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


def _random_inception(directory):
  rng = np.random.default_rng(0)
  sd = {name: rng.uniform(-1, 1, shape).astype(np.float32)
        for name, shape in inception.state_dict_shapes().items()}
  for name, value in sd.items():
    if name.endswith("conv.weight"):
      value *= np.sqrt(3.0 / np.prod(value.shape[1:]))
    if name.endswith("running_var"):
      value[:] = np.abs(value) + 0.5
  os.makedirs(directory)
  inception.save_params(os.path.join(directory, "fid_inception_v3.npz"),
                        inception.params_from_state_dict(sd))
  return directory


@pytest.mark.slow
def test_fid_stats_writes_loadable_statistics_and_reuses_them(tmp_path, data_dir):
  weights = _random_inception(str(tmp_path / "inception"))
  out = tmp_path / "stats.npz"
  command = [sys.executable, "-m", "arjax", "fid_stats", "--config=configs/digits.py:smoke",
             f"--inception={weights}", "--split=test[:8]", "--batch=8", f"--out={out}"]
  env = dict(os.environ, ARJAX_DATA_DIR=data_dir)
  first = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
  assert first.returncode == 0, first.stderr
  assert f"split 'test[:8]' (8 images, 8px): {out}" in first.stdout
  stats = reference_statistics.load(str(out), dim=inception.POOL3_DIM)
  assert stats.count == 8 and stats.sigma.shape == (2048, 2048)
  written = out.stat().st_mtime_ns
  again = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0, again.stderr
  assert "recomputing" not in again.stdout and out.stat().st_mtime_ns == written
