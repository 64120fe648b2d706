"""The command line end to end: train a few steps, resume, sample, eval, on the smoke digits config."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from arjax.evaluation import plots

from conftest import REPO_ROOT


def arjax(*args, data_dir, check=True):
  # One CPU device, as a user's laptop has (and tests/test_same_samples.py runs): the smoke
  # programs are then the ones that test compiles too, shared through the compilation cache.
  env = dict(os.environ, ARJAX_DATA_DIR=data_dir, PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run([sys.executable, "-m", "arjax", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  if check and result.returncode != 0:
    raise AssertionError(f"arjax {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
  return result


@pytest.mark.slow
def test_train_sample_eval(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  common = ["--config=configs/digits.py:smoke", f"--workdir={workdir}"]
  out = arjax("train", *common, "--config.train.sample_every=2", data_dir=data_dir)
  assert "trained to step 4" in out.stdout
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert os.path.exists(os.path.join(workdir, "samples", "step_0000002.png"))
  assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  assert "train_curves.png" in out.stdout and is_png(os.path.join(workdir, "train_curves.png"))

  # Training further on the same workdir resumes from step 4.
  out = arjax("train", *common, "--config.train.num_steps=6", data_dir=data_dir)
  assert "trained to step 6" in out.stdout
  # The curves' records continue across the restart, one per logged step.
  steps = [r["step"] for r in plots.read_records(os.path.join(workdir, "train_metrics.jsonl"))]
  assert steps == [1, 2, 3, 4, 5, 6]

  out = arjax("sample", *common, "--config.sample.cfg_scale=2.0", data_dir=data_dir)
  with np.load(os.path.join(workdir, "samples.npz")) as f:
    images, labels = f["images"], f["labels"]
  assert images.shape == (20, 8, 8, 1) and images.dtype == np.uint8
  assert labels.dtype == np.int64 and list(np.bincount(labels)) == [2] * 10
  assert os.path.exists(os.path.join(workdir, "samples.png"))
  labelled = os.path.join(workdir, "samples_labelled.png")
  assert f"labelled grid: {labelled}" in out.stdout and is_png(labelled)
  assert Image.open(labelled).text[plots.ROWS_KEY] == "0,1,2,3,4,5,6,7,8,9"

  out = arjax("eval", *common, data_dir=data_dir)
  metrics = json.load(open(os.path.join(workdir, "eval.json")))
  for candidate in ("model", "real_heldout", "gaussian"):
    assert set(metrics[candidate]) >= {"frechet_distance", "class_consistency", "precision",
                                       "recall", "memorization"}
  assert "frechet_distance" in out.stdout
  report = open(os.path.join(workdir, "eval_report.html")).read()
  assert f"<td>{metrics['model']['frechet_distance']:.4f}</td>" in report
  assert report.count("data:image/png;base64,") == 2
  assert is_png(os.path.join(workdir, "eval_samples.png"))
  assert is_png(os.path.join(workdir, "eval_neighbours.png"))
  assert "eval_report.html" in out.stdout


def is_png(path):
  with Image.open(path) as image:
    image.verify()
    return image.format == "PNG"


def test_unknown_override_fails_naming_it(tmp_path, data_dir):
  out = arjax("train", "--config=configs/digits.py:smoke", f"--workdir={tmp_path}",
              "--config.model.dept=3", data_dir=data_dir, check=False)
  assert out.returncode != 0
  assert "dept" in out.stderr
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_bad_sampling_request_fails_naming_the_field(tmp_path, data_dir):
  out = arjax("sample", "--config=configs/digits.py:smoke", f"--workdir={tmp_path}",
              "--config.sample.labels=3,12", data_dir=data_dir, check=False)
  assert out.returncode != 0
  assert "config.sample.labels" in out.stderr
