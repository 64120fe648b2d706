"""`eval` with config.eval.metrics='inception': the papers' metrics of a samples file, streamed.

Random Inception weights (the network's arithmetic is the golden test's business): a sample
set scored against reference statistics and images of the very same images has FID ~0 and
precision = recall = 1, whatever the batching; the report prints the published row beside
the numbers; a missing piece (weights, reference file) is named in one line.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from arjax.commands import eval as evaluate_cli
from arjax.config import schema as configs
from arjax.errors import ConfigError
from arjax.evaluation import inception_extractor
from arjax.evaluation import paper_metrics
from arjax.evaluation import reference_statistics
from conftest import REPO_ROOT

import inception_testing

N = 8  # one Inception call of 8 (one image per simulated device): the CPU cost of these tests


@pytest.fixture(scope="module")
def images():
  """Digit-like grayscale images: the smoke config's 8x8x1."""
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (N, 8, 8, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, images):
  """(weights dir, a reference file of `images`: their pool3 and spatial statistics, as ADM's
  VIRTUAL_*.npz, and the images themselves)."""
  tmp = tmp_path_factory.mktemp("paper_metrics")
  weights = inception_testing.write_random_params(str(tmp / "inception"))
  extractor = inception_extractor.InceptionExtractor(inception_testing.random_params(),
                                                     batch_size=8)
  result = extractor.stream([images])
  reference = str(tmp / "VIRTUAL_tiny.npz")
  np.savez(reference, mu=result.moments.mu, sigma=result.moments.sigma,
           mu_s=result.spatial_moments.mu, sigma_s=result.spatial_moments.sigma,
           arr_0=np.repeat(images, 3, -1))
  return weights, reference, extractor


def _config(weights, reference, **eval_fields):
  config = configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))
  config.eval.metrics = "inception"
  config.eval.inception = weights
  config.eval.reference = reference
  config.eval.batch_size = 8
  for key, value in eval_fields.items():
    config.eval[key] = value
  return config


def test_a_sample_set_scored_against_itself_has_fid_zero_and_full_precision_recall(
    setup, images, tmp_path):
  weights, reference, extractor = setup
  np.savez(tmp_path / "samples.npz", images=images, labels=np.arange(N) % 10)
  report = evaluate_cli.run(_config(weights, reference, paper_row="MAR-B"), str(tmp_path))
  metrics = json.loads((tmp_path / "eval.json").read_text())
  assert metrics["num_images"] == N and metrics["num_reference_images"] == N
  assert abs(metrics["fid"]) < 1e-3  # float32 features: round-off only
  assert abs(metrics["sfid"]) < 1e-3
  assert metrics["precision"] == metrics["recall"] == 1.0
  assert metrics["inception_score"] >= 1.0
  assert "MAR-B (paper)" in report and "2.31" in report and "281.7" in report
  assert f"{N} samples against {reference} ({N} reference images" in report


def test_a_mu_sigma_only_reference_gives_fid_and_is_without_precision_recall(setup, images,
                                                                             tmp_path):
  weights, reference, _ = setup
  stats = reference_statistics.load(reference)
  only = reference_statistics.save(str(tmp_path / "adm_stats.npz"), stats.mu, stats.sigma,
                                   count=N)
  np.savez(tmp_path / "samples.npz", images=images[::-1], labels=np.zeros(N, np.int64))
  report = evaluate_cli.run(_config(weights, only), str(tmp_path))
  metrics = json.loads((tmp_path / "eval.json").read_text())
  assert abs(metrics["fid"]) < 1e-3 and "precision" not in metrics  # same set, other order
  assert "sfid" not in metrics  # MAR's adm_in256_stats.npz holds mu and sigma alone
  assert "no reference images in it, so no precision/recall" in report
  assert "no sFID: the reference file has neither spatial statistics" in report


def test_a_reference_of_images_only_gives_its_statistics_from_the_images(setup, images,
                                                                         tmp_path):
  weights, _, _ = setup
  batch = tmp_path / "ref_batch.npz"
  np.savez(batch, arr_0=np.repeat(images, 3, -1))  # ADM's reference batch without mu/sigma
  np.savez(tmp_path / "samples.npz", images=images, labels=np.zeros(N, np.int64))
  evaluate_cli.run(_config(weights, str(batch)), str(tmp_path))
  metrics = json.loads((tmp_path / "eval.json").read_text())
  assert abs(metrics["fid"]) < 1e-3 and abs(metrics["sfid"]) < 1e-3
  assert metrics["precision"] == metrics["recall"] == 1.0


def test_sfid_of_other_images_is_large_and_its_own_number(setup, tmp_path):
  """Against the same reference, other images: sFID well above the round-off of the
  self-scored set, and not the FID (another feature space)."""
  weights, reference, _ = setup
  others = np.random.default_rng(5).integers(0, 64, (N, 8, 8, 1), dtype=np.uint8)  # darker
  np.savez(tmp_path / "samples.npz", images=others, labels=np.zeros(N, np.int64))
  evaluate_cli.run(_config(weights, reference), str(tmp_path))
  metrics = json.loads((tmp_path / "eval.json").read_text())
  assert metrics["sfid"] > 1.0 and metrics["fid"] > 1.0
  assert abs(metrics["sfid"] - metrics["fid"]) > 1e-3 * metrics["fid"]


def test_missing_weights_or_reference_are_named_with_the_command_that_makes_them(setup, images,
                                                                                 tmp_path):
  weights, _, _ = setup
  np.savez(tmp_path / "samples.npz", images=images, labels=np.zeros(N, np.int64))
  with pytest.raises(ConfigError, match=r"config.eval.inception is not set: .*convert "
                                        r"--kind=inception"):
    evaluate_cli.run(_config(None, None), str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"no such reference statistics file "
                                              r"\(config.eval.reference is not set, and "
                                              r"`python -m arjax fid_stats"):
    evaluate_cli.run(_config(weights, None), str(tmp_path))
  mismatched = tmp_path / "ref64.npz"
  np.savez(mismatched, mu=np.zeros(64), sigma=np.eye(64))
  with pytest.raises(ValueError, match=rf"{mismatched}: statistics of 64-d features, but the "
                                       r"features here are 2048-d"):
    evaluate_cli.run(_config(weights, str(mismatched)), str(tmp_path))


def test_the_report_without_a_known_paper_row_says_which_are_known():
  text = paper_metrics.format_report({"fid": 3.0, "inception_score": 200.0, "num_images": 5,
                                      "reference": "r.npz"}, "XYZ")
  assert "no published numbers for 'XYZ'; known: ['MAR-B', 'MAR-H', 'MAR-L', 'xAR-B', 'xAR-H', 'xAR-L']" in text


@pytest.mark.slow
def test_eval_prints_the_papers_metrics_from_the_command_line(setup, images, tmp_path):
  weights, reference, _ = setup
  np.savez(tmp_path / "samples.npz", images=images, labels=np.zeros(N, np.int64))
  result = subprocess.run(
      [sys.executable, "-m", "arjax", "eval", "--config=configs/digits.py:smoke",
       f"--workdir={tmp_path}", "--config.eval.metrics=inception",
       f"--config.eval.inception={weights}", f"--config.eval.reference={reference}",
       "--config.eval.batch_size=8", "--config.eval.paper_row=MAR-B"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  for name in ("fid", "sfid", "inception_score", "precision", "recall"):
    assert name in result.stdout
  assert os.path.isfile(tmp_path / "eval.json")


@pytest.mark.slow
def test_two_processes_score_the_samples_as_one(setup, images, tmp_path):
  """Each process streams its half of samples.npz; the merged moments and gathered logits and
  features give the numbers of one process."""
  import socket

  weights, reference, _ = setup
  np.savez(tmp_path / "samples.npz", images=images[::-1], labels=np.zeros(N, np.int64))
  flags = ["--config=configs/digits.py:smoke", f"--workdir={tmp_path}",
           "--config.eval.metrics=inception", f"--config.eval.inception={weights}",
           f"--config.eval.reference={reference}", "--config.eval.batch_size=4"]
  evaluate_cli.run(_config(weights, reference), str(tmp_path))  # one process, 8 devices
  single = json.loads((tmp_path / "eval.json").read_text())
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen([sys.executable, "-m", "arjax", "eval", *flags,
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                             f"--process_id={i}"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    outputs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
  double = json.loads((tmp_path / "eval.json").read_text())
  assert double["num_images"] == single["num_images"] == N
  assert double["precision"] == single["precision"] and double["recall"] == single["recall"]
  assert double["fid"] == pytest.approx(single["fid"], abs=1e-3)
  assert double["sfid"] == pytest.approx(single["sfid"], abs=1e-3)
  assert double["inception_score"] == pytest.approx(single["inception_score"], rel=1e-5)
