"""Bad files given to `eval` fail in one line naming the file and what is wrong.

A new user's mistakes: random bytes or a truncated download where samples.npz should be,
arrays of the wrong dtype, shape or range, labels out of range, and a missing, incomplete or
mismatched reference-statistics file. None may end in numpy's traceback about pickled data.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from arjax.commands import eval as evaluate_cli
from arjax.errors import InputFileError
from arjax.evaluation import reference_statistics
from conftest import REPO_ROOT


def _one_line(error):
  message = str(error)
  assert "\n" not in message, message
  return message


# -----------------------------------------------------------------------------
# samples.npz


def _smoke():
  from arjax.config import schema as configs
  return configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))


def _write_samples(workdir, **arrays):
  np.savez(os.path.join(workdir, "samples.npz"), **arrays)


def test_random_bytes_in_place_of_samples_npz_are_named_in_one_line(tmp_path):
  (tmp_path / "samples.npz").write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(InputFileError) as e:
    evaluate_cli.load_samples(str(tmp_path))
  message = _one_line(e.value)
  assert message.startswith(f"{tmp_path / 'samples.npz'}: not an .npz file")
  assert "pickle" not in message


def test_a_truncated_samples_npz_is_named_in_one_line(tmp_path):
  _write_samples(str(tmp_path), images=np.zeros((4, 8, 8, 1), np.uint8),
                 labels=np.zeros(4, np.int64))
  data = (tmp_path / "samples.npz").read_bytes()
  (tmp_path / "samples.npz").write_bytes(data[:len(data) // 2])
  with pytest.raises(InputFileError) as e:
    evaluate_cli.load_samples(str(tmp_path))
  assert _one_line(e.value).startswith(f"{tmp_path / 'samples.npz'}: not ")


@pytest.mark.parametrize("arrays, expected", [
    (dict(images=np.zeros((4, 8, 8, 1), np.float32), labels=np.zeros(4, np.int64)),
     "'images' must be uint8 (pixel values 0..255), got float32"),
    (dict(images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4, np.int64)),
     "'images' must be a non-empty [N, H, W, C] array, got shape (4, 8, 8)"),
    (dict(images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.zeros(3, np.int64)),
     "'labels' must be [N] with N = 4 (one per image), got shape (3,)"),
    (dict(images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.zeros(4, np.float32)),
     "'labels' must be integers, got float32"),
    (dict(images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.array([0, 1, 10, 2])),
     "label 10 is out of range [0, 10) (config.data.num_classes); 1 such labels"),
    (dict(images=np.zeros((4, 16, 16, 1), np.uint8), labels=np.zeros(4, np.int64)),
     "images are (16, 16, 1), the config's data (8, 8, 1) (config.data.image_size, "
     "config.data.channels)"),
    (dict(images=np.zeros((4, 8, 8, 1), np.uint8)),
     "no array 'labels' in this samples file (it holds ['images'])"),
    (dict(images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.array([None] * 4, object)),
     "array 'labels' holds pickled Python objects; refused (save plain numeric arrays)"),
])
def test_samples_of_the_wrong_kind_are_named_with_what_is_wrong(tmp_path, arrays, expected):
  _write_samples(str(tmp_path), **arrays)
  with pytest.raises(InputFileError) as e:
    evaluate_cli.load_samples(str(tmp_path), _smoke())
  message = _one_line(e.value)
  assert message == f"{tmp_path / 'samples.npz'}: {expected}"


@pytest.mark.slow
def test_eval_on_a_corrupt_samples_npz_prints_one_line_and_no_traceback(tmp_path):
  (tmp_path / "samples.npz").write_bytes(np.random.default_rng(0).bytes(4096))
  result = subprocess.run([sys.executable, "-m", "arjax", "eval",
                           "--config=configs/digits.py:smoke", f"--workdir={tmp_path}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert errors == [f"error: {tmp_path / 'samples.npz'}: not an .npz file (no zip archive "
                    "inside; is it truncated or something else saved under this name?): "
                    "cannot read the samples"], result.stderr


# -----------------------------------------------------------------------------
# Reference statistics (ADM's VIRTUAL_*.npz, adm_in256_stats.npz, arjax's own).


def _stats(d=6, seed=0):
  x = np.random.default_rng(seed).normal(size=(50, d))
  return x.mean(0), np.cov(x, rowvar=False)


def test_adm_style_statistics_load_and_arjax_saved_ones_round_trip(tmp_path):
  mu, sigma = _stats()
  adm = tmp_path / "VIRTUAL_tiny.npz"
  images = np.zeros((5, 4, 4, 3), np.uint8)
  mu_s, sigma_s = _stats(d=4, seed=1)
  np.savez(adm, mu=mu.astype(np.float32), sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, arr_0=images)
  loaded = reference_statistics.load(str(adm), dim=6, spatial_dim=4, need_images=True)
  np.testing.assert_array_equal(loaded.mu, mu.astype(np.float32))
  np.testing.assert_array_equal(loaded.mu_s, mu_s)
  np.testing.assert_array_equal(loaded.sigma_s, sigma_s)
  assert loaded.sigma.dtype == np.float64 and loaded.images_shape == (5, 4, 4, 3)
  np.testing.assert_array_equal(np.concatenate(list(loaded.image_batches(2))), images)
  own = reference_statistics.save(str(tmp_path / "stats.npz"), mu, sigma, count=50,
                                  mu_s=mu_s, sigma_s=sigma_s)
  again = reference_statistics.load(own, dim=6, spatial_dim=4)
  np.testing.assert_array_equal(again.mu, mu)
  np.testing.assert_array_equal(again.sigma, sigma)
  np.testing.assert_array_equal(again.sigma_s, sigma_s)
  assert again.count == 50 and again.images_shape is None
  assert reference_statistics.load(
      reference_statistics.save(str(tmp_path / "no_s.npz"), mu, sigma, count=50)).mu_s is None


def _bad(tmp_path, name="ref.npz", **arrays):
  path = tmp_path / name
  np.savez(path, **arrays)
  return str(path)


@pytest.mark.parametrize("make, kwargs, expected", [
    (lambda p: str(p / "absent.npz"), {}, "no such reference statistics file"),
    (lambda p: (p / "x.npz").write_bytes(b"<html>404</html>") and str(p / "x.npz"), {},
     "not an .npz file"),
    (lambda p: _bad(p, mu=np.zeros(6)), {}, "has mu but no 'sigma'"),
    (lambda p: _bad(p, sigma=np.eye(6)), {}, "has sigma but no 'mu'"),
    (lambda p: _bad(p, arr_1=np.zeros(3)), {}, "neither 'mu'/'sigma' nor reference images"),
    (lambda p: _bad(p, mu=np.zeros(6), sigma=np.eye(5)), {},
     "'sigma' must be [6, 6] like 'mu' [6], got (5, 5)"),
    (lambda p: _bad(p, mu=np.zeros(6), sigma=np.eye(6)), {"dim": 2048},
     "statistics of 6-d features, but the features here are 2048-d"),
    (lambda p: _bad(p, mu=np.full(6, np.nan), sigma=np.eye(6)), {}, "'mu' holds non-finite"),
    (lambda p: _bad(p, mu=np.zeros(6), sigma=np.triu(np.ones((6, 6)))), {},
     "'sigma' is not symmetric"),
    (lambda p: _bad(p, mu=np.zeros(6, np.int64), sigma=np.eye(6)), {},
     "'mu' must be floating point, got int64"),
    (lambda p: _bad(p, mu=np.zeros(6), sigma=np.eye(6)), {"need_images": True},
     "no reference images 'arr_0' (needed for precision/recall"),
    (lambda p: _bad(p, mu=np.zeros(6), sigma=np.eye(6), arr_0=np.zeros((2, 4, 4), np.uint8)),
     {"need_images": True}, "'arr_0' must be uint8 images [N, H, W, 3]"),
    (lambda p: _bad(p, mu=np.array([None] * 6, object), sigma=np.eye(6)), {},
     "array 'mu' holds pickled Python objects; refused"),
    # sFID's pair is checked as the pool3 one, and named.
    (lambda p: _bad(p, mu=np.zeros(6), sigma=np.eye(6), mu_s=np.zeros(4)), {},
     "has mu_s but no 'sigma_s'"),
    (lambda p: _bad(p, mu=np.zeros(6), sigma=np.eye(6), mu_s=np.zeros(4), sigma_s=np.eye(3)),
     {}, "'sigma_s' must be [4, 4] like 'mu_s' [4], got (3, 3)"),
    (lambda p: _bad(p, mu=np.zeros(6), sigma=np.eye(6), mu_s=np.zeros(4), sigma_s=np.eye(4)),
     {"spatial_dim": 2023}, "'mu_s'/'sigma_s': statistics of 4-d features, but the features "
     "here are 2023-d (Inception spatial features for sFID: 2023)"),
    (lambda p: _bad(p, mu=np.zeros(6), sigma=np.eye(6), mu_s=np.zeros(4),
                    sigma_s=np.full((4, 4), np.inf)), {}, "'sigma_s' holds non-finite"),
])
def test_a_bad_reference_statistics_file_is_named_with_what_is_wrong(tmp_path, make, kwargs,
                                                                     expected):
  path = make(tmp_path)
  with pytest.raises((InputFileError, FileNotFoundError)) as e:
    reference_statistics.load(path, **kwargs)
  message = _one_line(e.value)
  assert message.startswith(f"{path}: ") and expected in message, message


class _FakeExtractor:
  """Stands in for InceptionExtractor: 'features' are the mean pixel per channel, 'spatial
  features' the brightest pixel per channel."""
  feature_dim = 3

  def __init__(self):
    self.calls = 0

  def stream(self, batches):
    from arjax.evaluation import inception_extractor
    from arjax.evaluation import fid
    self.calls += 1
    moments, spatial = fid.FeatureMoments(3), fid.FeatureMoments(3)
    for batch in batches:
      moments.update(batch.reshape(len(batch), -1, 3).mean(1))
      spatial.update(batch.reshape(len(batch), -1, 3).max(1).astype(np.float64))
    return inception_extractor.StreamResult(moments, spatial,
                                            np.zeros((moments.count, 1), np.float32))


def test_reference_statistics_of_a_split_are_computed_once_then_read_from_the_cache(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
  batches = lambda: (images[i:i + 6] for i in range(0, 20, 6))
  extractor, path = _FakeExtractor(), str(tmp_path / "fid_stats" / "digits_train.npz")
  source = {"dataset": "digits", "split": "train", "image_size": 4}
  first = reference_statistics.compute_and_cache(path, batches, extractor, source=source)
  again = reference_statistics.compute_and_cache(path, batches, extractor, source=source)
  assert extractor.calls == 1 and again.count == first.count == 20
  np.testing.assert_allclose(again.mu, images.reshape(20, -1, 3).mean(1).mean(0))
  np.testing.assert_allclose(again.mu_s, images.reshape(20, -1, 3).max(1).mean(0))
  said = []
  reference_statistics.compute_and_cache(path, batches, extractor,
                                         source={**source, "split": "test"}, log=said.append)
  assert extractor.calls == 2 and "recomputing" in said[0]


def test_a_cached_file_without_spatial_statistics_is_recomputed_saying_why(tmp_path):
  """A cache written before arjax kept sFID's mu_s/sigma_s: the same source, recomputed."""
  images = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
  extractor, path = _FakeExtractor(), str(tmp_path / "old.npz")
  source = {"dataset": "digits", "split": "train", "image_size": 4}
  mu, sigma = _stats(3)
  reference_statistics.save(path, mu, sigma, count=50, source=source)
  said = []
  stats = reference_statistics.compute_and_cache(path, lambda: [images], extractor,
                                                 source=source, log=said.append)
  assert extractor.calls == 1 and stats.count == 8 and stats.mu_s is not None
  assert said == [f"{path}: has no spatial statistics (mu_s/sigma_s, for sFID): recomputing"]
  assert reference_statistics.load(path).mu_s is not None
