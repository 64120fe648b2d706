"""FID, Inception Score and improved precision/recall: the properties the papers' numbers rest on.

The formulas themselves are checked against torch-fidelity on stored features in
tests/test_golden_inception.py; here: streaming statistics equal in-memory ones whatever the
batching or sharding, a set is at distance ~0 from itself, the IS reaches the class count for
confident, evenly spread predictions, and precision/recall follow the ADM definition.
"""
import numpy as np
import pytest

from arjax.evaluation import fid
from arjax.evaluation import improved_precision_recall as ipr
from arjax.evaluation import inception_score


def _features(n=600, d=48, seed=0):
  """Correlated, offset, post-ReLU-like features (a mean far from 0 stresses cancellation)."""
  rng = np.random.default_rng(seed)
  mixing = rng.normal(size=(d, d)) / np.sqrt(d)
  return (np.maximum(rng.normal(size=(n, d)) @ mixing + 0.3, 0) + 5.0).astype(np.float32)


def _relative(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# -----------------------------------------------------------------------------
# Streaming statistics.


@pytest.mark.parametrize("sizes", [[600], [1, 599], [7] * 85 + [5], [0, 300, 0, 300],
                                   [64] * 9 + [24], [599, 1]])
def test_streamed_statistics_equal_the_in_memory_ones_for_any_batching(sizes):
  features = _features()
  bounds = np.cumsum([0] + sizes)
  moments = fid.moments_of_batches((features[a:b] for a, b in zip(bounds[:-1], bounds[1:])),
                                   features.shape[1])
  assert moments.count == len(features)
  assert _relative(moments.mu, np.mean(features.astype(np.float64), 0)) <= 1e-6
  assert _relative(moments.sigma, np.cov(features, rowvar=False)) <= 1e-6


def test_moments_of_shards_merged_equal_those_of_one_process():
  """Two (or three, uneven) processes each stream their own slice; merged, they are one."""
  features = _features(n=500)
  whole = fid.FeatureMoments.of(features)
  for cuts in ([250], [1, 333]):
    shards = np.split(features, cuts)
    merged = fid.FeatureMoments(features.shape[1])
    for shard in shards:
      merged.merge(fid.moments_of_batches(np.array_split(shard, 3), features.shape[1]))
    assert merged.count == whole.count
    assert _relative(merged.mu, whole.mu) <= 1e-12
    assert _relative(merged.sigma, whole.sigma) <= 1e-10


def test_moments_refuse_what_they_cannot_describe():
  moments = fid.FeatureMoments(4)
  with pytest.raises(ValueError, match="no feature rows"):
    moments.mu
  with pytest.raises(ValueError, match="must be 4-d"):
    moments.update(np.zeros((3, 5)))
  with pytest.raises(ValueError, match="non-finite"):
    moments.update(np.full((3, 4), np.nan))
  moments.update(np.zeros((1, 4)))
  with pytest.raises(ValueError, match="at least 2 feature rows"):
    moments.sigma


# -----------------------------------------------------------------------------
# FID.


@pytest.mark.parametrize("method", fid.FID_METHODS)
@pytest.mark.parametrize("n", [600, 20], ids=["full-rank", "rank-deficient"])
def test_the_fid_of_a_set_against_itself_is_zero(method, n):
  features = _features(n=n)
  assert abs(fid.frechet_distance(features, features, method=method)) < 1e-6


@pytest.mark.parametrize("method", fid.FID_METHODS)
def test_fid_of_diagonal_gaussians_has_the_closed_form(method):
  """|mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 for diagonal covariances a, b."""
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  a, b = rng.uniform(0.5, 2, 16), rng.uniform(0.5, 2, 16)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid.frechet_distance_from_statistics(mu1, np.diag(a), mu2, np.diag(b), method=method)
  assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("n1, n2", [(30, 25), (400, 300)])  # rank-deficient, full rank
def test_the_fid_methods_agree(n1, n2):
  a, b = _features(n=n1, seed=2), _features(n=n2, seed=3)
  eig = fid.frechet_distance(a, b, method="eigvals")
  assert fid.frechet_distance(a, b, method="sqrtm") == pytest.approx(eig, rel=1e-6)
  # rank-deficient: eigvals of the non-symmetric product leave ~1e-8 roundoff roots
  assert fid.frechet_distance(a, b, method="symmetric") == pytest.approx(eig, rel=1e-7)


def test_fid_statistics_of_mismatched_shapes_are_refused():
  with pytest.raises(ValueError, match=r"sigma2 must have shape \(3, 3\)"):
    fid.frechet_distance_from_statistics(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
  with pytest.raises(ValueError, match="method must be one of"):
    fid.frechet_distance_from_statistics(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3),
                                         method="scipy")


# -----------------------------------------------------------------------------
# Inception Score.


@pytest.mark.parametrize("classes", [10, 1008])
def test_is_of_confident_predictions_spread_evenly_over_classes_is_the_class_count(classes):
  """p(y|x) one-hot, p(y) uniform in every split: KL = log C, IS = C."""
  labels = np.tile(np.arange(classes), inception_score.SPLITS)  # split i holds each class once
  logits = np.where(np.arange(classes)[None, :] == labels[:, None], 60.0, 0.0)
  mean, std = inception_score.inception_score(logits.astype(np.float32), shuffle=False)
  assert mean == pytest.approx(classes, rel=1e-9)
  assert std == pytest.approx(0.0, abs=1e-9 * classes)


def test_is_of_identical_predictions_is_one():
  logits = np.tile(np.random.default_rng(0).normal(size=(1, 20)), (50, 1)).astype(np.float32)
  mean, _ = inception_score.inception_score(logits)
  assert mean == pytest.approx(1.0, abs=1e-12)


def test_is_splits_are_torch_fidelitys_uneven_integer_division():
  """N = 23, 10 splits: rows [i*23//10, (i+1)*23//10), sizes 2 or 3, after the shuffle."""
  logits = np.random.default_rng(0).normal(size=(23, 5)).astype(np.float32)
  scores = inception_score.split_scores(logits, splits=10)
  order = np.random.RandomState(2020).permutation(23)
  last = logits[order[20:23]].astype(np.float64)
  p = np.exp(last) / np.exp(last).sum(1, keepdims=True)
  expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), 1)))
  assert scores[-1] == pytest.approx(expected, rel=1e-12)


# -----------------------------------------------------------------------------
# Improved precision and recall (ADM).


def _brute_force_precision_recall(reference, samples, k):
  def radii(x):
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself
  def share(manifold, r, queries):
    d = np.linalg.norm(queries[:, None] - manifold[None], axis=-1)
    return float(np.mean(np.any(d <= r[None], axis=1)))
  return share(reference, radii(reference), samples), share(samples, radii(samples), reference)


def test_precision_recall_follow_the_k_nearest_neighbour_balls_definition():
  rng = np.random.default_rng(0)
  reference = rng.normal(size=(120, 8))
  samples = rng.normal(size=(90, 8)) * 1.4 + 0.3  # unequal sizes: no matching, as ADM
  assert ipr.precision_recall(reference, samples) == pytest.approx(
      _brute_force_precision_recall(reference, samples, ipr.K), abs=1e-12)


def test_a_set_covers_itself_and_a_distant_set_nothing():
  features = _features(n=200)
  assert ipr.precision_recall(features, features) == (1.0, 1.0)
  assert ipr.precision_recall(features, features + 1e3) == (0.0, 0.0)


def test_precision_recall_need_more_than_k_rows():
  with pytest.raises(ValueError, match="samples needs at least 4 rows"):
    ipr.precision_recall(np.zeros((10, 2)), np.zeros((3, 2)))
