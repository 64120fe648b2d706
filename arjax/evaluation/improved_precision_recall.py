"""Improved precision and recall (Kynkäänniemi et al. 2019) as the ADM evaluation suite computes
them on Inception pool3 features: what MAR, xAR, DiT and ADM report beside FID.

Each set's manifold is the union of balls around its points, the radius of a point being the
distance to its k-th nearest neighbour in its own set (k = 3; the point itself, at distance 0,
is not counted). precision = share of samples inside the reference manifold; recall = share
of reference points inside the sample manifold. No size matching: ADM compares its 10,000
reference images with 50,000 samples as they are (`ManifoldEstimator.evaluate_pr`).

ADM evaluates squared distances in float16 (float32 where float16 overflows); here they are
float64, which can only flip points that sit on a ball's boundary to ~1e-3 relative. Work is
done in row blocks, so memory is block x N, never N x N.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

K = 3
_BLOCK = 1024


def _squared_distances(a: np.ndarray, b: np.ndarray, b_norms: np.ndarray) -> np.ndarray:
  a_norms = np.sum(a * a, axis=1)
  return np.maximum(a_norms[:, None] - 2.0 * (a @ b.T) + b_norms[None, :], 0.0)


def manifold_radii(features: np.ndarray, k: int = K) -> np.ndarray:
  """Squared distance of every row to its k-th nearest other row, float64 [N]."""
  features = _check("features", features, min_rows=k + 1)
  norms = np.sum(features * features, axis=1)
  radii = np.empty(len(features))
  for start in range(0, len(features), _BLOCK):
    d = _squared_distances(features[start:start + _BLOCK], features, norms)
    # Index k of the sorted row is the k-th neighbour: index 0 is the point itself (0), as in
    # ADM's partition of each row at [0..k].
    radii[start:start + len(d)] = np.partition(d, k, axis=1)[:, k]
  return radii


def share_inside(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
  """Share of `queries` within radius (squared: `radii`) of some row of `manifold`."""
  manifold = _check("manifold", manifold, min_rows=1)
  queries = _check("queries", queries, min_rows=1, dim=manifold.shape[1])
  norms = np.sum(manifold * manifold, axis=1)
  inside = np.empty(len(queries), bool)
  for start in range(0, len(queries), _BLOCK):
    d = _squared_distances(queries[start:start + _BLOCK], manifold, norms)
    inside[start:start + len(d)] = np.any(d <= radii[None, :], axis=1)
  return float(inside.mean())


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = K) -> Tuple[float, float]:
  """(precision, recall) of `samples` [M, D] against `reference` [N, D] (both > k rows)."""
  reference = _check("reference", reference, min_rows=k + 1)
  samples = _check("samples", samples, min_rows=k + 1, dim=reference.shape[1])
  precision = share_inside(reference, manifold_radii(reference, k), samples)
  recall = share_inside(samples, manifold_radii(samples, k), reference)
  return precision, recall


def _check(name: str, features, *, min_rows: int, dim: int = None) -> np.ndarray:
  features = np.asarray(features)
  if features.ndim != 2 or not np.issubdtype(features.dtype, np.number):
    raise ValueError(f"{name} must be a numeric [N, D] array, got {features.dtype} "
                     f"{features.shape}")
  if len(features) < min_rows:
    raise ValueError(f"{name} needs at least {min_rows} rows, got {len(features)}")
  if dim is not None and features.shape[1] != dim:
    raise ValueError(f"{name} are {features.shape[1]}-d, the reference {dim}-d")
  if not np.all(np.isfinite(features)):
    raise ValueError(f"{name} hold non-finite values")
  return features.astype(np.float64)
