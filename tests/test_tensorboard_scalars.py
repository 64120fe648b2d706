"""read_scalars gives back what training logged to TensorBoard, without TensorFlow."""
import os

import numpy as np
import pytest
from tensorboardX import SummaryWriter

from arjax.training.tensorboard_scalars import read_scalars


def log(workdir, points: dict):
  writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  for step, value in points.items():
    writer.add_scalar("train/loss", value, step)
    writer.add_scalar("train/images_per_second", 10.0 * step, step)
  writer.close()
  [path] = [p for p in os.listdir(os.path.join(workdir, "tensorboard")) if not p.startswith("old")]
  return os.path.join(workdir, "tensorboard", path)


def test_reads_every_tag_in_step_order(tmp_path):
  log(tmp_path, {1: 0.5, 2: 0.25, 3: 0.125})
  scalars = read_scalars(str(tmp_path))
  assert set(scalars) == {"train/loss", "train/images_per_second"}
  steps, loss = scalars["train/loss"]
  assert steps.tolist() == [1, 2, 3] and loss.tolist() == [0.5, 0.25, 0.125]
  assert steps.dtype == np.int64 and loss.dtype == np.float64
  assert scalars["train/images_per_second"][1].tolist() == [10.0, 20.0, 30.0]


def test_a_resumed_run_s_newer_file_wins_on_repeated_steps(tmp_path):
  first = log(tmp_path, {1: 1.0, 2: 2.0, 3: 3.0})
  # As if written at an earlier start (tensorboardX names files by their start time).
  os.rename(first, os.path.join(tmp_path, "tensorboard", "old"))
  log(tmp_path, {3: 30.0, 4: 40.0})
  os.rename(os.path.join(tmp_path, "tensorboard", "old"),
            os.path.join(tmp_path, "tensorboard", "events.out.tfevents.1000000000.host"))
  steps, loss = read_scalars(str(tmp_path))["train/loss"]
  assert steps.tolist() == [1, 2, 3, 4] and loss.tolist() == [1.0, 2.0, 30.0, 40.0]


def test_a_record_cut_short_ends_the_file(tmp_path):
  path = log(tmp_path, {1: 1.0, 2: 2.0})
  with open(path, "rb+") as f:
    f.truncate(os.path.getsize(path) - 3)  # the last record (step 2's throughput) lost its tail
  scalars = read_scalars(str(tmp_path))
  assert scalars["train/loss"][0].tolist() == [1, 2]
  assert scalars["train/images_per_second"][0].tolist() == [1]


def test_a_workdir_without_logs_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="train first"):
    read_scalars(str(tmp_path))

