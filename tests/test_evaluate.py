"""Sanity checks for the evaluation metrics and the feature classifier.

Each metric is checked on cases with a known answer (identical sets, shifted
Gaussians, mode collapse, noise, copies), and the full `evaluate` on the
digits dataset is checked to rank real held-out images above noise. The
classifier is trained once per module into a temporary cache.
"""

import json
import logging
import shutil
import time

import numpy as np
import pytest
from sklearn.datasets import load_digits

from arjax.evaluation import metrics as ev
from arjax.evaluation import feature_classifier as fc

NAME = "digits"


@pytest.fixture(scope="module")
def digits():
  """The fixed digits split: test = indices i with i % 4 == 0, train = rest."""
  data = load_digits()
  images = np.round(data.images * 255.0 / 16.0).astype(np.uint8)[..., None]
  labels = data.target.astype(np.int64)
  is_test = np.arange(len(labels)) % 4 == 0
  return dict(train_images=images[~is_test], train_labels=labels[~is_test],
              eval_images=images[is_test], eval_labels=labels[is_test])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("eval_cache")


@pytest.fixture(scope="module")
def classifier(digits, cache_dir):
  return fc.load_or_train(cache_dir, digits["train_images"],
                          digits["train_labels"], name=NAME)


def _evaluate(digits, cache_dir, samples, labels, seed=0):
  return ev.evaluate(samples, labels, cache_dir=str(cache_dir), name=NAME,
                     seed=seed, **digits)


def _with_exact_moments(rng, mean, cov, n):
  """n points whose sample mean and (ddof=1) covariance are exactly given."""
  z = rng.standard_normal((n, len(mean)))
  z -= z.mean(0)
  sample_cov = np.atleast_2d(np.cov(z, rowvar=False))
  z = z @ np.linalg.inv(np.linalg.cholesky(sample_cov)).T
  return mean + z @ np.linalg.cholesky(cov).T


def _sqrtm_psd(m):
  w, v = np.linalg.eigh(m)
  return (v * np.sqrt(np.maximum(w, 0))) @ v.T


# --- Fréchet distance --------------------------------------------------------


def test_frechet_distance_of_a_set_with_itself_is_zero():
  feats = np.random.default_rng(0).standard_normal((500, 16))
  assert abs(ev.frechet_distance(feats, feats)) < 1e-6


def test_frechet_distance_grows_as_the_square_of_a_mean_shift():
  feats = np.random.default_rng(0).standard_normal((500, 8))
  distances = [ev.frechet_distance(feats, feats + s) for s in (0.5, 1.0, 2.0)]
  # Same covariance, so only |mu_a - mu_b|^2 = 8 s^2 remains.
  np.testing.assert_allclose(distances, [8 * 0.25, 8 * 1.0, 8 * 4.0],
                             rtol=1e-6)


def test_frechet_distance_matches_closed_form_for_known_gaussians():
  rng = np.random.default_rng(1)
  mean_a, mean_b = np.array([0.0, 1.0, -1.0]), np.array([2.0, 0.0, 0.5])
  cov_a = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]])
  cov_b = np.array([[1.0, -0.4, 0.1], [-0.4, 3.0, 0.0], [0.1, 0.0, 0.8]])
  feats_a = _with_exact_moments(rng, mean_a, cov_a, 400)
  feats_b = _with_exact_moments(rng, mean_b, cov_b, 300)
  root_a = _sqrtm_psd(cov_a)
  expected = (np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a)
              + np.trace(cov_b) - 2 * np.trace(_sqrtm_psd(root_a @ cov_b
                                                          @ root_a)))
  assert ev.frechet_distance(feats_a, feats_b) == pytest.approx(expected,
                                                                rel=1e-6)
  # 1-D: (m_a - m_b)^2 + (s_a - s_b)^2.
  one_a = _with_exact_moments(rng, np.array([1.0]), np.array([[4.0]]), 50)
  one_b = _with_exact_moments(rng, np.array([-2.0]), np.array([[9.0]]), 70)
  assert ev.frechet_distance(one_a, one_b) == pytest.approx(9.0 + 1.0,
                                                            rel=1e-6)


def test_frechet_distance_survives_singular_covariances():
  feats = np.random.default_rng(0).standard_normal((300, 6))
  feats[:, 3:] = 0.0  # dead units, as post-ReLU features have
  value = ev.frechet_distance(feats, feats + np.eye(6)[0])
  assert value == pytest.approx(1.0, abs=1e-3)


def test_frechet_distance_rejects_mismatched_features():
  with pytest.raises(ValueError, match="feats_a and feats_b"):
    ev.frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))
  with pytest.raises(ValueError, match="feats_b"):
    ev.frechet_distance(np.zeros((10, 3)), np.zeros((10,)))


# --- Precision / recall ------------------------------------------------------


def _blobs(rng, n_per_blob, centres):
  return np.concatenate([c + 0.3 * rng.standard_normal((n_per_blob, len(c)))
                         for c in centres])


def test_precision_recall_of_identical_sets_is_one():
  feats = np.random.default_rng(0).standard_normal((200, 5))
  assert ev.precision_recall(feats, feats) == (1.0, 1.0)


def test_precision_recall_of_independent_draws_is_high():
  rng = np.random.default_rng(0)
  real, fake = rng.standard_normal((2, 500, 5))
  precision, recall = ev.precision_recall(real, fake)
  assert precision > 0.8 and recall > 0.8


def test_mode_collapse_keeps_precision_but_loses_recall():
  rng = np.random.default_rng(0)
  centres = 10.0 * np.eye(10)
  real = _blobs(rng, 50, centres)
  fair = _blobs(rng, 50, centres)
  collapsed = _blobs(rng, 500, centres[:1])  # every sample from one mode
  fair_precision, fair_recall = ev.precision_recall(real, fair)
  precision, recall = ev.precision_recall(real, collapsed)
  # k-NN precision of a fair draw is below 1 (finite-sample radii), and
  # collapsing onto one true mode must not cost more than a little of it.
  assert precision > fair_precision - 0.1
  assert fair_recall > 0.8
  assert recall < 0.15


def test_noise_has_no_precision():
  rng = np.random.default_rng(0)
  real = _blobs(rng, 50, 10.0 * np.eye(10))
  noise = rng.uniform(-30, 30, (500, 10))
  precision, _ = ev.precision_recall(real, noise)
  assert precision < 0.05


def test_precision_recall_size_mismatch_is_seeded_subsampling():
  rng = np.random.default_rng(0)
  real, fake = rng.standard_normal((100, 4)), rng.standard_normal((300, 4))
  first = ev.precision_recall(real, fake, seed=3)
  assert first == ev.precision_recall(real, fake, seed=3)
  assert first != ev.precision_recall(real, fake, seed=4)
  # Exactly the average over the same subsamples computed by hand.
  chooser = np.random.default_rng(3)
  by_hand = np.mean([ev.precision_recall(
      real, fake[np.sort(chooser.choice(300, 100, replace=False))])
                     for _ in range(10)], axis=0)
  np.testing.assert_allclose(first, by_hand)


# --- Memorization ------------------------------------------------------------


def test_copies_of_training_images_are_memorised(digits):
  train = digits["train_images"]
  copies = train[::7]
  assert ev.memorization(copies, train) == 1.0
  # A faint perturbation is still a copy, even under the strict ratio.
  noisy = np.clip(copies.astype(int) + np.random.default_rng(0).integers(
      -8, 9, copies.shape), 0, 255).astype(np.uint8)
  assert ev.memorization(noisy, train) == 1.0
  assert ev.memorization(noisy, train, ratio=0.5) == 1.0


def test_heldout_images_score_the_novel_draw_baseline(digits):
  # Two i.i.d. draws near x: about half of novel images are nearer to their
  # nearest training image than it is to its own neighbour; none are copies
  # under the strict ratio.
  share = ev.memorization(digits["eval_images"], digits["train_images"])
  assert 0.3 < share < 0.6
  assert ev.memorization(digits["eval_images"], digits["train_images"], ratio=0.5) < 0.01


def test_nearest_neighbours_are_the_brute_force_minimum_over_the_training_set():
  rng = np.random.default_rng(1)
  train = rng.integers(0, 256, (30, 4, 4, 1), np.uint8)
  queries = np.concatenate([rng.integers(0, 256, (6, 4, 4, 1), np.uint8), train[[7]]])  # a copy
  indices, distances = ev.nearest_neighbours(queries, train, k=3)
  for q, query in enumerate(queries.astype(np.float64)):
    brute = [np.sqrt(((query - t.astype(np.float64)) ** 2).sum()) for t in train]
    np.testing.assert_allclose(distances[q], np.sort(brute)[:3], rtol=1e-9)
    np.testing.assert_allclose(np.asarray(brute)[indices[q]], distances[q], rtol=1e-9)
  assert indices[-1, 0] == 7 and distances[-1, 0] == 0
  with pytest.raises(ValueError, match=r"k must lie in \[1, 30\]"):
    ev.nearest_neighbours(queries, train, k=31)


# --- Classifier --------------------------------------------------------------


def test_classifier_generalises_to_the_test_split(classifier, digits):
  accuracy = classifier.accuracy(digits["eval_images"], digits["eval_labels"])
  assert accuracy >= 0.97
  feats = classifier.features(digits["eval_images"])
  assert feats.shape == (len(digits["eval_images"]), classifier.feature_dim)
  assert np.all(np.isfinite(feats))


def test_classifier_cache_is_reused(classifier, digits, cache_dir):
  start = time.perf_counter()
  again = fc.load_or_train(cache_dir, digits["train_images"],
                           digits["train_labels"], name=NAME)
  assert time.perf_counter() - start < 5.0  # training takes ~10 s
  images = digits["eval_images"][:100]
  np.testing.assert_array_equal(again.features(images),
                                classifier.features(images))
  meta = json.loads(
      (cache_dir / "arjax_eval" / NAME / "metadata.json").read_text())
  assert meta["train_fingerprint"] == fc.train_split_fingerprint(
      digits["train_images"], digits["train_labels"])


def test_classifier_is_retrained_when_the_train_split_changes(
    classifier, digits, cache_dir, tmp_path, caplog):
  del classifier  # only to make sure the cache exists
  own_cache = tmp_path / "cache"
  shutil.copytree(cache_dir, own_cache)
  changed = digits["train_images"].copy()
  changed[0, 0, 0, 0] ^= 1
  with caplog.at_level(logging.WARNING, logger=fc.__name__):
    fc.load_or_train(own_cache, changed, digits["train_labels"], name=NAME)
  assert "fingerprint differs" in caplog.text
  meta = json.loads(
      (own_cache / "arjax_eval" / NAME / "metadata.json").read_text())
  assert meta["train_fingerprint"] == fc.train_split_fingerprint(
      changed, digits["train_labels"])


def test_load_or_train_rejects_bad_name(digits, tmp_path):
  with pytest.raises(ValueError, match="name"):
    fc.load_or_train(tmp_path, digits["train_images"], digits["train_labels"],
                     name="../escape")


# --- Reference points ---------------------------------------------------------


def test_heldout_split_is_stratified_disjoint_and_seeded(digits):
  labels = digits["eval_labels"]
  reference, real = ev.split_heldout(labels, seed=0)
  assert len(np.intersect1d(reference, real)) == 0
  assert len(reference) + len(real) == len(labels)
  assert abs(len(reference) - len(real)) <= 1
  assert np.all(np.abs(np.bincount(labels[reference])
                       - np.bincount(labels[real])) <= 1)
  np.testing.assert_array_equal(ev.split_heldout(labels, seed=0)[0], reference)
  assert not np.array_equal(ev.split_heldout(labels, seed=1)[0], reference)


def test_gaussian_baseline_matches_requested_classes(digits):
  labels = np.repeat(np.arange(10), 30)
  draws = ev.per_class_gaussian_samples(digits["train_images"],
                                        digits["train_labels"], labels, seed=0)
  assert draws.dtype == np.uint8
  assert draws.shape == (300,) + digits["train_images"].shape[1:]
  # Class means of the draws track the class means of the training data.
  for c in (0, 7):
    train_mean = digits["train_images"][digits["train_labels"] == c].mean(0)
    assert np.abs(draws[labels == c].mean(0) - train_mean).mean() < 15.0
  np.testing.assert_array_equal(draws, ev.per_class_gaussian_samples(
      digits["train_images"], digits["train_labels"], labels, seed=0))


def test_gmm_baseline_is_seeded_per_class_and_closer_to_the_data_than_one_gaussian(digits):
  labels = np.repeat(np.arange(10), 30)
  train = digits["train_images"], digits["train_labels"]
  draws = ev.per_class_gmm_samples(*train, labels, seed=0)
  assert draws.dtype == np.uint8 and draws.shape == (300,) + train[0].shape[1:]
  np.testing.assert_array_equal(draws, ev.per_class_gmm_samples(*train, labels, seed=0))
  assert not np.array_equal(draws, ev.per_class_gmm_samples(*train, labels, seed=1))
  # Each draw is nearer its own class's train images than the one Gaussian's draws are: the
  # mixture models the strokes' variety, the Gaussian blurs it.
  gaussian = ev.per_class_gaussian_samples(*train, labels, seed=0)
  def nearest_own_class(images):
    return np.mean([ev.nearest_neighbours(images[labels == c].astype(np.float64),
                                          train[0][train[1] == c].astype(np.float64))[1].mean()
                    for c in range(10)])
  assert nearest_own_class(draws) < 0.9 * nearest_own_class(gaussian)
  with pytest.raises(ValueError, match="class 3; the 5-component GMM baseline needs >= 10"):
    keep = (train[1] != 3) | (np.cumsum(train[1] == 3) <= 4)
    ev.per_class_gmm_samples(train[0][keep], train[1][keep], labels, seed=0)


# --- Full evaluation ---------------------------------------------------------


def test_evaluate_scores_real_heldout_images_as_near_perfect(
    classifier, digits, cache_dir):
  del classifier  # trained once by the fixture; evaluate loads the cache
  _, real = ev.split_heldout(digits["eval_labels"], seed=0)
  samples, labels = digits["eval_images"][real], digits["eval_labels"][real]
  result = _evaluate(digits, cache_dir, samples, labels)
  model = result["model"]
  # The real half passed as the model must score exactly as the reference
  # point that is computed from it.
  assert model == result["real_heldout"]
  assert model["class_consistency"] >= 0.97
  assert model["precision"] >= 0.85 and model["recall"] >= 0.85
  assert model["memorization"] < 0.6
  assert model["frechet_distance"] < 0.5 * result["gaussian"][
      "frechet_distance"]
  assert result["classifier_test_accuracy"] >= 0.97
  assert result == _evaluate(digits, cache_dir, samples, labels)  # seeded
  report = ev.format_report(result)
  for heading in ("model", "held-out real", "per-class Gaussian", "per-class GMM",
                  "frechet_distance", "memorization"):
    assert heading in report


def test_evaluate_scores_noise_badly(classifier, digits, cache_dir):
  del classifier
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (1000, 8, 8, 1), dtype=np.uint8)
  labels = np.repeat(np.arange(10), 100)
  result = _evaluate(digits, cache_dir, noise, labels)
  model, real = result["model"], result["real_heldout"]
  assert model["class_consistency"] < 0.3
  # Noise maps near the "8" region of the classifier's feature space, so a
  # few of its points land inside the balls of outlying real images.
  assert model["precision"] < 0.3
  assert model["recall"] < 0.1
  assert model["frechet_distance"] > 10 * real["frechet_distance"]
  assert model["frechet_distance"] > result["gaussian"]["frechet_distance"]
  assert result["gaussian"]["num_images"] == 1000


@pytest.mark.parametrize("change, argument", [
    (lambda s, l: (s.astype(np.float32), l), "samples"),
    (lambda s, l: (s[..., 0], l), "samples"),
    (lambda s, l: (s, l + 10), "sample_labels"),
    (lambda s, l: (s, l[:-1]), "sample_labels"),
    (lambda s, l: (s, l.astype(np.float32)), "sample_labels"),
])
def test_evaluate_names_the_bad_argument(digits, tmp_path, change, argument):
  samples, labels = change(digits["eval_images"][:50],
                           digits["eval_labels"][:50])
  with pytest.raises(ValueError, match=argument):
    ev.evaluate(samples, labels, cache_dir=str(tmp_path), name=NAME, **digits)
