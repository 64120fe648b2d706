"""Sample-quality metrics for class-conditional image generators.

All functions take plain numpy arrays. `evaluate` scores a candidate sample
set together with three reference points, so every number comes with the value
a perfect model (held-out real images), a naive baseline (a per-class
Gaussian in pixel space) and a strong classical one (a per-class Gaussian
mixture in pixel space) get under exactly the same protocol.

Metrics
  frechet_distance   Heusel et al. 2017, "GANs Trained by a Two Time-Scale
                     Update Rule Converge to a Local Nash Equilibrium" (FID),
                     computed in the feature space of `feature_classifier`.
  precision/recall   Kynkäänniemi et al. 2019, "Improved Precision and Recall
                     Metric for Assessing Generative Models" (k-NN manifolds).
  class_consistency  accuracy of the feature classifier on the samples with
                     their conditioning labels as targets: is a sample drawn
                     for class c recognisably a c? (The reverse direction of
                     Ravuri & Vinyals 2019's Classification Accuracy Score.)
  memorization       share of samples that are near-copies of a training
                     image, in pixel space (see `memorization`).

Protocol in `evaluate`
  The held-out (eval) split is split in two class-stratified halves with the
  seed: the *reference* half, which every candidate set is compared against,
  and the *real* half, which is itself scored as a candidate ("what a perfect
  generator would get"). Candidate sets differ in size (model samples and the
  Gaussian baseline: as many as the model has, typically 1000; real half:
  ~225), and both FD (biased by ~1/N, Chong & Forsyth 2020, "Effectively
  Unbiased FID and Inception Score and where to find them") and k-NN
  precision/recall depend on set size. So FD, precision and recall are always
  computed between sets of equal size: the larger of (candidate, reference)
  is subsampled without replacement to the smaller's size, `num_subsets`
  seeded times, and the metric is averaged. The halves are made equal in
  size (up to one image for an odd held-out count), so the real half is
  normally scored once, on whole equal-size sets. Class-consistency and
  memorization are per-sample averages and use every candidate.

  The feature classifier is fitted on the train split, so train images sit
  a little differently in its feature space than held-out ones: on digits a
  random 1000 train images score FD ~8-11 where the real half scores ~5.
  The held-out row is therefore a floor no generator of train-like images
  reaches exactly; the per-class Gaussian row is the least a generator must
  clear, the per-class GMM row the bar arjax's recipes are held to (its
  Fréchet distance, and memorization no higher than its).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterator

import numpy as np
import scipy.linalg

from arjax.evaluation import feature_classifier as feature_classifier_lib
from arjax.util import progress as progress_lib

# Rows of the report, in order.
METRICS = ("frechet_distance", "precision", "recall", "class_consistency",
           "memorization")
# Columns of the report: candidate set key -> heading.
CANDIDATES = {
    "model": "model",
    "real_heldout": "held-out real",
    "gaussian": "per-class Gaussian",
    "gmm": "per-class GMM",
}
# Pairwise-distance work is done in row chunks of this many to bound memory.
_DISTANCE_CHUNK = 1024


# ----------------------------------------------------------------------------
# Fréchet distance.


def _matrix_sqrt(m: np.ndarray) -> tuple[np.ndarray, bool]:
  """scipy's sqrtm, and whether it is finite and squares back to m."""
  with warnings.catch_warnings():
    # "Matrix is singular" is expected for rank-deficient covariances; the
    # residual check below is what decides whether the result is usable.
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    root = scipy.linalg.sqrtm(m)
  if not np.all(np.isfinite(root)):
    return root, False
  scale = max(float(np.max(np.abs(m))), np.finfo(np.float64).tiny)
  return root, float(np.max(np.abs(root @ root - m))) <= 1e-6 * scale


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, *,
                     eps: float = 1e-6) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets.

  d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), as in FID
  (Heusel et al. 2017; numerics follow the reference `pytorch-fid`): if the
  matrix square root is not finite (or does not square back to the product),
  eps*I is added to both covariances; imaginary parts from round-off are
  dropped, large ones are an error. Singular covariances are normal here
  (post-ReLU features have dead units) and are handled exactly by sqrtm.

  Args:
    feats_a: [N, F] features, N >= 2.
    feats_b: [M, F] features, M >= 2.
    eps: diagonal offset used only when the plain square root fails.
  """
  feats_a = _check_features("feats_a", feats_a, min_rows=2)
  feats_b = _check_features("feats_b", feats_b, min_rows=2)
  if feats_a.shape[1] != feats_b.shape[1]:
    raise ValueError(f"feats_a and feats_b feature dims differ: "
                     f"{feats_a.shape[1]} vs {feats_b.shape[1]}")
  mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
  cov_a = np.atleast_2d(np.cov(feats_a, rowvar=False))
  cov_b = np.atleast_2d(np.cov(feats_b, rowvar=False))

  covmean, accurate = _matrix_sqrt(cov_a @ cov_b)
  if not accurate:
    offset = np.eye(cov_a.shape[0]) * eps
    covmean, _ = _matrix_sqrt((cov_a + offset) @ (cov_b + offset))
    if not np.all(np.isfinite(covmean)):
      raise ValueError("the covariance product has no finite square root, "
                       f"even with eps={eps} added")
  if np.iscomplexobj(covmean):
    # Relative check: feature scale is arbitrary, so an absolute tolerance
    # (pytorch-fid uses 1e-3) would mean different things for different nets.
    scale = max(1.0, float(np.max(np.abs(covmean.real))))
    max_imag = float(np.max(np.abs(covmean.imag)))
    if max_imag > 1e-3 * scale:
      raise ValueError(f"sqrtm has a large imaginary component {max_imag:.3g}")
    covmean = covmean.real
  diff = mu_a - mu_b
  return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b)
               - 2.0 * np.trace(covmean))


# ----------------------------------------------------------------------------
# Improved precision and recall.


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Euclidean distances [len(a), len(b)], float64."""
  a = a.astype(np.float64, copy=False)
  b = b.astype(np.float64, copy=False)
  sq = (np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :]
        - 2.0 * (a @ b.T))
  return np.sqrt(np.maximum(sq, 0.0))


def _kth_neighbour_radii(feats: np.ndarray, k: int) -> np.ndarray:
  """Distance of every row to its k-th nearest *other* row."""
  radii = np.empty(len(feats))
  for start in range(0, len(feats), _DISTANCE_CHUNK):
    d = _pairwise_distances(feats[start:start + _DISTANCE_CHUNK], feats)
    rows = np.arange(d.shape[0])
    d[rows, start + rows] = np.inf  # a point is not its own neighbour
    radii[start:start + d.shape[0]] = np.partition(d, k - 1, axis=1)[:, k - 1]
  return radii


def _share_inside_manifold(manifold: np.ndarray, radii: np.ndarray,
                           queries: np.ndarray) -> float:
  """Share of queries inside the union of balls B(manifold_i, radii_i)."""
  inside = np.empty(len(queries), bool)
  for start in range(0, len(queries), _DISTANCE_CHUNK):
    d = _pairwise_distances(queries[start:start + _DISTANCE_CHUNK], manifold)
    inside[start:start + d.shape[0]] = np.any(d <= radii[None, :], axis=1)
  return float(inside.mean())


def _size_matched_subsets(n_a: int, n_b: int, num_subsets: int,
                          seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Index pairs (into a, into b) of equal length min(n_a, n_b).

  Equal sizes: the whole sets, once. Otherwise the larger set is subsampled
  without replacement `num_subsets` times (seeded); the smaller is whole.
  """
  if n_a == n_b:
    yield np.arange(n_a), np.arange(n_b)
    return
  rng = np.random.default_rng(seed)
  n = min(n_a, n_b)
  for _ in range(num_subsets):
    if n_a > n_b:
      yield np.sort(rng.choice(n_a, n, replace=False)), np.arange(n_b)
    else:
      yield np.arange(n_a), np.sort(rng.choice(n_b, n, replace=False))


def size_matched_mean(metric: Callable[[np.ndarray, np.ndarray], Any],
                      feats_a: np.ndarray, feats_b: np.ndarray, *,
                      num_subsets: int = 10, seed: int = 0) -> np.ndarray:
  """Mean of metric(a', b') over equal-size subsets a' of a and b' of b.

  See `_size_matched_subsets`. `metric` may return a scalar or a tuple.
  """
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
  values = [np.asarray(metric(feats_a[ia], feats_b[ib]), np.float64)
            for ia, ib in _size_matched_subsets(len(feats_a), len(feats_b),
                                                num_subsets, seed)]
  return np.mean(values, axis=0)


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray,
                     k: int = 3, *, num_subsets: int = 10,
                     seed: int = 0) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019).

  Each set's manifold is the union of balls around its points with radius
  the distance to that point's k-th nearest neighbour in the same set.
  precision = share of fake points inside the real manifold (are samples
  realistic?); recall = share of real points inside the fake manifold (is
  the real variety covered?).

  The radii shrink as a set grows, so the two sets must be the same size
  for the numbers to mean the same thing (the paper uses equal sizes). If
  they differ, the larger set is subsampled without replacement to the
  smaller's size `num_subsets` times (seeded) and both numbers are averaged.

  Args:
    real_feats: [N, F] features of real images.
    fake_feats: [M, F] features of generated images.
    k: neighbour rank defining the radii (paper: 3).
    num_subsets: subsamples to average over when N != M.
    seed: seed of the subsampling.

  Returns:
    (precision, recall), each in [0, 1].
  """
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive int, got {k!r}")
  real_feats = _check_features("real_feats", real_feats, min_rows=k + 1)
  fake_feats = _check_features("fake_feats", fake_feats, min_rows=k + 1)
  if real_feats.shape[1] != fake_feats.shape[1]:
    raise ValueError(f"real_feats and fake_feats feature dims differ: "
                     f"{real_feats.shape[1]} vs {fake_feats.shape[1]}")

  def once(real, fake):
    precision = _share_inside_manifold(real, _kth_neighbour_radii(real, k),
                                       fake)
    recall = _share_inside_manifold(fake, _kth_neighbour_radii(fake, k), real)
    return precision, recall

  precision, recall = size_matched_mean(once, real_feats, fake_feats,
                                        num_subsets=num_subsets, seed=seed)
  return float(precision), float(recall)


# ----------------------------------------------------------------------------
# Class consistency and memorization.


def class_consistency(classifier: feature_classifier_lib.FeatureClassifier,
                      images: np.ndarray, labels: np.ndarray) -> float:
  """Share of images the classifier assigns to their conditioning label."""
  images = _check_images("images", images)
  labels = _check_labels("labels", labels, len(images), classifier.num_classes)
  if len(images) == 0:
    raise ValueError("images must not be empty")
  return float(np.mean(classifier.predict(images) == labels))


def memorization(sample_images: np.ndarray, train_images: np.ndarray, *,
                 ratio: float = 1.0) -> float:
  """Share of samples that are near-copies of a training image (pixel space).

  For a sample s let x be its nearest training image (Euclidean, over the
  flattened float pixels) and r(x) the distance from x to its own nearest
  *other* training image. s counts as memorised when
      d(s, x) < ratio * r(x)   (or d(s, x) == 0),
  i.e. s sits much closer to x than the training data itself packs around x.
  This normalises by the local density of the training set, so sparse and
  dense regions get comparable thresholds (in the spirit of the relative
  distance test of Carlini et al. 2023, "Extracting Training Data from
  Diffusion Models", which normalises by the sample's other neighbours).

  The reported figure uses ratio 1, the definition arjax promises ("nearer
  to a training image than that image's nearest training neighbour"). Read
  it against the held-out real reference point that `evaluate` reports next
  to it: a genuinely novel draw qualifies often (on digits ~44% of held-out
  test images do, since the sample and x's neighbour are two i.i.d. points
  near x), so a model is suspicious when it sits clearly *above* that, and a
  copier scores 1. A stricter ratio (0.5: no held-out digit qualifies, exact
  and lightly perturbed copies all do) is available to callers.

  Args:
    sample_images: [N, H, W, C] images (any numeric dtype).
    train_images: [M, H, W, C] training images, M >= 2.
    ratio: threshold on d(s, x) / r(x).

  Returns:
    share in [0, 1].
  """
  sample_images = np.asarray(sample_images)
  train_images = np.asarray(train_images)
  if sample_images.ndim != 4 or len(sample_images) == 0:
    raise ValueError(f"sample_images must be non-empty [N, H, W, C], got "
                     f"{sample_images.shape}")
  if train_images.ndim != 4 or len(train_images) < 2:
    raise ValueError(f"train_images must be [M>=2, H, W, C], got "
                     f"{train_images.shape}")
  if sample_images.shape[1:] != train_images.shape[1:]:
    raise ValueError(f"sample_images {sample_images.shape[1:]} and "
                     f"train_images {train_images.shape[1:]} differ in shape")
  if ratio <= 0:
    raise ValueError(f"ratio must be > 0, got {ratio}")
  samples = sample_images.reshape(len(sample_images), -1).astype(np.float64)
  train = train_images.reshape(len(train_images), -1).astype(np.float64)

  train_nn = _kth_neighbour_radii(train, 1)
  nearest, nearest_distance = (a[:, 0] for a in nearest_neighbours(samples, train, 1))
  copied = ((nearest_distance < ratio * train_nn[nearest])
            | (nearest_distance == 0))
  return float(copied.mean())


def nearest_neighbours(queries: np.ndarray, references: np.ndarray,
                       k: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Each query's k nearest references by Euclidean distance, nearest first.

  Rows are flattened, so images [N, H, W, C] compare in pixel space (as
  `memorization` does) and features [N, F] in feature space.

  Returns:
    (indices int64 [N, k] into `references`, distances float64 [N, k]). For
    k = 1 a tie goes to the lowest index; for k > 1 ties at the k-th place
    are broken arbitrarily.
  """
  queries = np.asarray(queries).reshape(len(queries), -1)
  references = np.asarray(references).reshape(len(references), -1)
  if queries.shape[1] != references.shape[1]:
    raise ValueError(f"queries and references differ in size per row: "
                     f"{queries.shape[1]} vs {references.shape[1]}")
  if not 1 <= k <= len(references):
    raise ValueError(f"k must lie in [1, {len(references)}] (the number of "
                     f"references), got {k}")
  indices = np.empty((len(queries), k), np.int64)
  distances = np.empty((len(queries), k))
  for start in range(0, len(queries), _DISTANCE_CHUNK):
    d = _pairwise_distances(queries[start:start + _DISTANCE_CHUNK], references)
    rows = np.arange(len(d))[:, None]
    if k == 1:
      nearest = np.argmin(d, axis=1)[:, None]
    else:
      nearest = np.argpartition(d, k - 1, axis=1)[:, :k]
      nearest = np.take_along_axis(
          nearest, np.argsort(d[rows, nearest], axis=1, kind="stable"), axis=1)
    indices[start:start + len(d)] = nearest
    distances[start:start + len(d)] = d[rows, nearest]
  return indices, distances


# ----------------------------------------------------------------------------
# Reference points.


def split_heldout(labels: np.ndarray, *, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Class-stratified split of the held-out set into (reference, real) halves.

  Within each class the images are shuffled (seeded) and dealt alternately,
  so both halves have the class mix of the whole. Classes with an odd count
  give their extra image to the reference and the real half in turn, so the
  halves differ in size by at most one. Returns sorted index arrays.
  """
  rng = np.random.default_rng(seed)
  reference, real = [], []
  odd_classes = 0
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    halves = [members[0::2], members[1::2]]
    if len(members) % 2:
      halves = halves[::-1] if odd_classes % 2 else halves
      odd_classes += 1
    reference.append(halves[0])
    real.append(halves[1])
  return np.sort(np.concatenate(reference)), np.sort(np.concatenate(real))


def per_class_gaussian_samples(train_images: np.ndarray,
                               train_labels: np.ndarray,
                               labels: np.ndarray, *, seed: int) -> np.ndarray:
  """One draw per entry of `labels` from a per-class Gaussian in pixel space.

  For each class a full-covariance Gaussian (mean and ML covariance of that
  class's training images as float pixels) is fitted; draws are rounded and
  clipped to [0, 255] and returned as uint8 of the training images' shape.
  The baseline a generator must beat: it knows each class's first two
  moments and nothing else.
  """
  rng = np.random.default_rng(seed)
  # SVD-based sampling: the covariance is singular (border pixels are
  # always 0, and there are more pixels than images for larger sets).
  draw = lambda members, n: rng.multivariate_normal(
      members.mean(0), np.cov(members, rowvar=False), size=n, method="svd")
  return _per_class_draws(train_images, train_labels, labels, draw,
                          min_members=2, baseline="Gaussian")


def _per_class_draws(train_images: np.ndarray, train_labels: np.ndarray,
                     labels: np.ndarray, draw, *, min_members: int,
                     baseline: str) -> np.ndarray:
  """The per-class baselines' common part: for each class in `labels`,
  `draw(its train images as float pixels [M, D], n) -> [n, D]` for its n
  entries, rounded and clipped to uint8 images of the train images' shape."""
  shape = train_images.shape[1:]
  flat = train_images.reshape(len(train_images), -1).astype(np.float64)
  out = np.empty((len(labels), flat.shape[1]))
  for c in np.unique(labels):
    members = flat[train_labels == c]
    if len(members) < min_members:
      raise ValueError(f"train_labels has {len(members)} image(s) of class "
                       f"{c}; the {baseline} baseline needs >= {min_members}")
    where = np.flatnonzero(labels == c)
    out[where] = draw(members, len(where))
  return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(
      (len(labels),) + shape)


# The per-class GMM reference: its components per class and the variance (in squared pixel
# levels) added to every covariance's diagonal (the border pixels of digits are always 0, so
# without it a full covariance is singular). The count is fixed, not chosen on held-out
# likelihood: on the digits train split that choice picks 1 component for every class (the
# single-Gaussian column again) because a full 64-D covariance per component overfits ~135
# images. Measured on digits (1000 draws, docs/model.md): 5 components FD 16.1, recall 0.86,
# memorisation 0.56; 8 components FD 14.1, recall 0.84, memorisation 0.70.
GMM_COMPONENTS = 5
GMM_REG_COVAR = 10.0


def per_class_gmm_samples(train_images: np.ndarray, train_labels: np.ndarray,
                          labels: np.ndarray, *, seed: int,
                          components: int = GMM_COMPONENTS) -> np.ndarray:
  """One draw per entry of `labels` from a per-class Gaussian mixture in pixel space.

  For each class a `components`-component full-covariance mixture (scikit-learn
  `GaussianMixture`, k-means initialised, best of 2 seeded fits) is fitted to that class's
  train images as float pixels; draws are rounded and clipped to [0, 255] and returned as uint8
  of the training images' shape. A much stronger classical model than one Gaussian per class:
  a generator that does not beat it has learnt less than a few ellipsoids per digit.
  """
  from sklearn.mixture import GaussianMixture  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)

  def draw(members, n):
    mixture = GaussianMixture(components, covariance_type="full", reg_covar=GMM_REG_COVAR,
                              n_init=2, random_state=int(rng.integers(2**31))).fit(members)
    draws, _ = mixture.sample(n)
    return draws[rng.permutation(n)]  # sample() returns them grouped by component
  return _per_class_draws(train_images, train_labels, labels, draw, min_members=2 * components,
                          baseline=f"{components}-component GMM")


# ----------------------------------------------------------------------------
# Full evaluation.


def evaluate(samples: np.ndarray, sample_labels: np.ndarray, *,
             train_images: np.ndarray, train_labels: np.ndarray,
             eval_images: np.ndarray, eval_labels: np.ndarray,
             cache_dir: str, name: str, seed: int = 0, k: int = 3,
             num_subsets: int = 10, progress: bool = False) -> dict[str, Any]:
  """Scores `samples` and the three reference points; see the module docstring.

  Args:
    samples: uint8 [N, H, W, C] generated images.
    sample_labels: integer [N], the class each sample was conditioned on.
    train_images, train_labels: the train split (classifier, Gaussian
      baseline and memorization are all fitted on / compared with it).
    eval_images, eval_labels: the held-out split, split into reference and
      real halves.
    cache_dir: where the feature classifier is cached.
    name: cache name of the classifier (e.g. the dataset name).
    seed: seed of the held-out split, the Gaussian draws and the
      subsampling; the classifier's own seed is fixed separately so that it
      can be cached.
    k: precision/recall neighbour rank.
    num_subsets: subsamples averaged over for size-mismatched FD / P&R.
    progress: report the stages (classifier, then each candidate) as they finish.

  Returns:
    {"model": {...}, "real_heldout": {...}, "gaussian": {...}, "gmm": {...}, plus counts
     and "classifier_test_accuracy"}; each candidate dict holds METRICS and
    "num_images". All values are plain Python numbers.
  """
  train_images = _check_images("train_images", train_images)
  shape = train_images.shape[1:]
  if len(train_images) < 2:
    raise ValueError("train_images must hold at least 2 images")
  train_labels = _check_labels("train_labels", train_labels, len(train_images))
  num_classes = int(train_labels.max()) + 1
  samples = _check_images("samples", samples, shape)
  sample_labels = _check_labels("sample_labels", sample_labels, len(samples),
                                num_classes)
  eval_images = _check_images("eval_images", eval_images, shape)
  eval_labels = _check_labels("eval_labels", eval_labels, len(eval_images),
                              num_classes)
  if len(samples) <= k:
    raise ValueError(f"samples must hold more than k={k} images, got "
                     f"{len(samples)}")
  if len(eval_images) < 2 * (k + 1):
    raise ValueError(f"eval_images must hold at least {2 * (k + 1)} images "
                     f"(two halves of more than k={k}), got {len(eval_images)}")

  report = progress_lib.bar(1 + len(CANDIDATES), desc="eval", unit="stage", enabled=progress)
  classifier = feature_classifier_lib.load_or_train(
      cache_dir, train_images, train_labels, name=name)
  report.update(1)

  reference_idx, real_idx = split_heldout(eval_labels, seed=seed)
  reference_feats = classifier.features(eval_images[reference_idx])
  # Distinct sub-seeds so the Gaussian and GMM draws and the subsampling are not
  # correlated with the held-out split.
  seeds = np.random.SeedSequence(seed).generate_state(3)
  gmm_images = per_class_gmm_samples(train_images, train_labels, sample_labels,
                                     seed=int(seeds[2]))
  candidates = {
      "model": (samples, sample_labels),
      "real_heldout": (eval_images[real_idx], eval_labels[real_idx]),
      "gaussian": (per_class_gaussian_samples(
          train_images, train_labels, sample_labels, seed=int(seeds[0])),
                   sample_labels),
      "gmm": (gmm_images, sample_labels),
  }

  result: dict[str, Any] = {
      "num_train": len(train_images),
      "num_eval": len(eval_images),
      "num_reference": len(reference_idx),
      "classifier_test_accuracy": classifier.accuracy(eval_images, eval_labels),
      "k": k,
      "num_subsets": num_subsets,
      "seed": seed,
      "gmm_components": GMM_COMPONENTS,
      "gmm_reg_covar": GMM_REG_COVAR,
  }
  for key, (images, labels) in candidates.items():
    feats = classifier.features(images)
    fd = size_matched_mean(frechet_distance, feats, reference_feats,
                           num_subsets=num_subsets, seed=int(seeds[1]))
    precision, recall = precision_recall(reference_feats, feats, k,
                                         num_subsets=num_subsets,
                                         seed=int(seeds[1]))
    result[key] = {
        "num_images": len(images),
        "frechet_distance": float(fd),
        "precision": precision,
        "recall": recall,
        "class_consistency": class_consistency(classifier, images, labels),
        "memorization": memorization(images, train_images),
    }
    report.update(1)
  report.close()
  return result


def format_report(metrics: dict[str, Any]) -> str:
  """Renders `evaluate`'s result as a plain-text table."""
  rows = METRICS + ("num_images",)
  headings = list(CANDIDATES.values())
  first = max(len(r) for r in rows)
  widths = [max(len(h), 10) for h in headings]

  def cell(value: Any, width: int) -> str:
    text = f"{value:d}" if isinstance(value, int) else f"{value:.4f}"
    return text.rjust(width)

  lines = [
      "metric".ljust(first) + "  " + "  ".join(
          h.rjust(w) for h, w in zip(headings, widths)),
      "-" * (first + sum(w + 2 for w in widths)),
  ]
  for row in rows:
    lines.append(row.ljust(first) + "  " + "  ".join(
        cell(metrics[key][row], w) for key, w in zip(CANDIDATES, widths)))
  lines.append("")
  lines.append(
      f"FD / precision / recall vs {metrics['num_reference']} held-out "
      f"reference images (k={metrics['k']}, larger sets averaged over "
      f"{metrics['num_subsets']} size-matched subsamples); "
      f"classifier test accuracy {metrics['classifier_test_accuracy']:.4f}; "
      f"seed {metrics['seed']}.")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Argument checks.


def _check_images(arg: str, images: Any,
                  shape: tuple[int, ...] | None = None) -> np.ndarray:
  if not isinstance(images, np.ndarray):
    raise ValueError(
        f"{arg} must be a numpy array, got {type(images).__name__}")
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"{arg} must be uint8 [N, H, W, C], got {images.dtype} "
                     f"{images.shape}")
  if shape is not None and images.shape[1:] != tuple(shape):
    raise ValueError(f"{arg} images must be {tuple(shape)} like the train "
                     f"images, got {images.shape[1:]}")
  return images


def _check_labels(arg: str, labels: Any, n: int,
                  num_classes: int | None = None) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(f"{arg} must have shape ({n},), got {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{arg} must be integers, got {labels.dtype}")
  if n and labels.min() < 0:
    raise ValueError(f"{arg} must be >= 0, got {labels.min()}")
  if n and num_classes is not None and labels.max() >= num_classes:
    raise ValueError(f"{arg} must be < {num_classes} (the number of train "
                     f"classes), got {labels.max()}")
  return labels.astype(np.int64)


def _check_features(arg: str, feats: Any, *, min_rows: int) -> np.ndarray:
  feats = np.asarray(feats)
  if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.number):
    raise ValueError(f"{arg} must be a numeric [N, F] array, got "
                     f"{feats.dtype} {feats.shape}")
  if len(feats) < min_rows:
    raise ValueError(f"{arg} needs at least {min_rows} rows, got {len(feats)}")
  if not np.all(np.isfinite(feats)):
    raise ValueError(f"{arg} contains non-finite values")
  return feats.astype(np.float64)
