"""`sample` writes its images batch by batch into per-process part files and resumes a killed run.

A killed `sample` leaves complete parts (written under a temporary name and renamed); started
again on the same request it draws only the missing batches, and the merged samples.npz is the
file an uninterrupted run writes: every image exactly once, in order. Parts of another request
(a changed guidance scale) are removed, never mixed in.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from arjax.commands import sample as generate
from arjax.commands import sample_parts
from arjax.training.loop import Experiment

from conftest import REPO_ROOT

# 20 batches, each slow enough (60 flow steps) that a poll sees the run part-way.
REQUEST = ["--config=configs/digits.py:smoke", "--config.sample.num_images=200",
           "--config.sample.batch_size=10", "--config.sample.num_steps=60"]


def _sample(workdir, data_dir, *extra):
  env = dict(os.environ, ARJAX_DATA_DIR=data_dir, PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.Popen([sys.executable, "-m", "arjax", "sample", *REQUEST, *extra,
                           f"--workdir={workdir}"], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _parts(workdir):
  directory = sample_parts.parts_dir(workdir)
  try:
    return sorted(f for f in os.listdir(directory) if f.endswith(".npz"))
  except FileNotFoundError:  # not written yet, or merged and removed
    return []


@pytest.mark.slow
def test_a_killed_sampling_run_resumes_and_writes_each_image_exactly_once(smoke_run, tmp_path,
                                                                          data_dir):
  _, trained, _ = smoke_run
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  shutil.copytree(trained, straight)
  shutil.copytree(trained, killed)
  out, _ = _sample(straight, data_dir).communicate(timeout=600)
  assert "drew 20 of 20 batches" in out, out

  proc = _sample(killed, data_dir)
  deadline = time.time() + 300
  while len(_parts(killed)) < 3 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  before = _parts(killed)
  assert 3 <= len(before) < 20 and not os.path.exists(os.path.join(killed, "samples.npz")), (
      f"the run was not killed part-way ({len(before)} parts): make its batches slower")
  directory = sample_parts.parts_dir(killed)
  inodes = {f: os.stat(os.path.join(directory, f)).st_ino for f in before}
  # What the killed run left holds each of its images once, in whole batches of 10.
  ids = sample_parts.ids_in(os.path.join(directory, f) for f in before)
  assert sorted(ids) == list(range(10 * len(before)))

  # A second process sees the same parts before the resumed run merges them away.
  seen = {}
  resumed = _sample(killed, data_dir)
  while resumed.poll() is None:
    for f in _parts(killed):
      try:
        seen.setdefault(f, os.stat(os.path.join(directory, f)).st_ino)
      except FileNotFoundError:  # the run merged its parts and removed them since the listing
        pass
    time.sleep(0.005)
  out, _ = resumed.communicate()
  assert resumed.returncode == 0, out
  assert f"resuming: {len(before)} of 20 batches are written already" in out, out
  assert f"drew {20 - len(before)} of 20 batches ({len(before)} written by an earlier run)" in out
  # The parts written before the kill were never rewritten.
  assert all(seen.get(f, inodes[f]) == inodes[f] for f in before)

  with np.load(os.path.join(straight, "samples.npz")) as a, np.load(
      os.path.join(killed, "samples.npz")) as b:
    np.testing.assert_array_equal(b["labels"], a["labels"])
    np.testing.assert_array_equal(b["images"], a["images"])
    assert a["images"].shape == (200, 8, 8, 1)
  assert not os.path.exists(directory)  # merged, then removed


def test_parts_of_another_request_are_removed_not_mixed_in(tmp_path, capsys):
  directory = str(tmp_path / "parts")
  sample_parts.prepare(directory, {"sample": {"cfg_scale": 3.0}})
  sample_parts.write_part(directory, 0, 2, 0, np.zeros((2, 8, 8, 1), np.uint8),
                          np.zeros(2), np.arange(2))
  sample_parts.prepare(directory, {"sample": {"cfg_scale": 3.0}})  # same request: kept
  assert sample_parts.written(directory, 2, 0).tolist() == [True, False]
  sample_parts.prepare(directory, {"sample": {"cfg_scale": 2.0}})
  assert sample_parts.written(directory, 2, 0).tolist() == [False, False]
  assert "holds 1 part(s) of another request (sample: {'cfg_scale': 3.0} -> " in (
      capsys.readouterr().out)


def test_a_merge_refuses_missing_or_repeated_images(tmp_path):
  directory = str(tmp_path / "parts")
  sample_parts.prepare(directory, {})
  image = np.zeros((2, 8, 8, 1), np.uint8)
  sample_parts.write_part(directory, 0, 2, 0, image, np.zeros(2), np.arange(2))
  with pytest.raises(ValueError, match="batch 1 of 2 was never written"):
    sample_parts.merge(directory, str(tmp_path / "s.npz"), 2, 4, (8, 8, 1))
  sample_parts.write_part(directory, 1, 2, 0, image, np.zeros(2), np.arange(2))  # ids 0, 1 again
  with pytest.raises(ValueError, match="batch 1 holds images"):
    sample_parts.merge(directory, str(tmp_path / "s.npz"), 2, 4, (8, 8, 1))
  assert not os.path.exists(tmp_path / "s.npz")


def test_on_eight_devices_every_row_is_written_once_and_equals_the_in_memory_samples(
    smoke_run, tmp_path):
  """The batch is sharded over 8 devices: each shard's rows go into the part once."""
  config, trained, _ = smoke_run
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  config = config.copy_and_resolve_references()
  config.sample.num_images, config.sample.batch_size = 24, 16  # the last batch padded
  exp = Experiment(config)
  result = generate.run(exp, workdir, progress=False)
  params, _ = generate.restore_params(exp, workdir, config.sample.use_ema)
  labels = generate.parse_labels("", 24, 10)
  in_memory = generate.sample_images(exp, params, labels, progress=False)
  with np.load(result["npz"]) as f:
    np.testing.assert_array_equal(f["labels"], labels)
    np.testing.assert_array_equal(f["images"], in_memory)
