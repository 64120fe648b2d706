"""Reference statistics for FID: the ADM suite's .npz files, and ones arjax computes and caches.

The papers compare against published statistics of the real data:

  VIRTUAL_imagenet256_labeled.npz  (ADM evaluation suite) mu, sigma [2048] / [2048, 2048] of
                                   the pool3 features of the whole ImageNet train set, mu_s /
                                   sigma_s [2023] / [2023, 2023] (spatial features, for sFID:
                                   `inception.SPATIAL_DIM`), and arr_0: 10,000
                                   reference images uint8 [N, 256, 256, 3] for precision/recall
  adm_in256_stats.npz              (what MAR's torch-fidelity fork reads) mu and sigma only

`load` reads either (and arjax's own `save`d files, the same keys), checking that every array
is finite and of the right shape, and fails in one line naming the file and what is wrong.
`compute_and_cache` makes such a file for any stream of real images (a TFDS split), once:
a later call with the same `source` description reads the cache.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from arjax.errors import InputFileError
from arjax.evaluation import npz_files

WHAT = "reference statistics"


IMAGES_KEY = "arr_0"  # ADM's name for the reference images


@dataclasses.dataclass
class ReferenceStatistics:
  path: str
  mu: Optional[np.ndarray]               # float64 [D]; None when the file holds images only
  sigma: Optional[np.ndarray]            # float64 [D, D]
  count: Optional[int] = None            # rows the statistics were computed from, if recorded
  # Shape of the reference images (ADM's arr_0, uint8 [N, H, W, 3]) when the file has them:
  # they are streamed (`image_batches`), never loaded (10,000 at 256 px are 2 GB).
  images_shape: Optional[tuple] = None
  # sFID's statistics (ADM's mu_s / sigma_s, arjax's own files too); None when not in the file.
  mu_s: Optional[np.ndarray] = None      # float64 [2023]
  sigma_s: Optional[np.ndarray] = None   # float64 [2023, 2023]

  @property
  def dim(self) -> Optional[int]:
    return None if self.mu is None else int(self.mu.shape[0])

  def image_batches(self, batch_size: int) -> Iterator[np.ndarray]:
    if self.images_shape is None:
      raise InputFileError(f"{self.path}: no reference images {IMAGES_KEY!r}")
    return npz_files.stream_rows(self.path, IMAGES_KEY, WHAT, batch_size)


def load(path: str, *, dim: Optional[int] = None, spatial_dim: Optional[int] = None,
         need_images: bool = False) -> ReferenceStatistics:
  """The statistics (and the reference images' shape, if the file has them) of `path`.

  dim: the feature dimension they must have (2048 for Inception pool3), spatial_dim: that of
  the spatial statistics mu_s/sigma_s when the file has them (2023); need_images: the
  reference images (arr_0) are required, for precision/recall. Raises FileNotFoundError or
  InputFileError naming the file.
  """
  arrays = npz_files.read_arrays(path, WHAT, required=(),
                                 optional=("mu", "sigma", "mu_s", "sigma_s", "count"))
  images_shape = None
  if npz_files.has_array(path, IMAGES_KEY):
    shape, dtype = npz_files.array_header(path, IMAGES_KEY, WHAT)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
      raise InputFileError(f"{path}: {IMAGES_KEY!r} must be uint8 images [N, H, W, 3], got "
                           f"{dtype} {shape}")
    images_shape = tuple(shape)
  mu, sigma = _checked_statistics(path, arrays, "mu", "sigma", dim,
                                  "Inception pool3: 2048")
  if mu is None and images_shape is None:
    raise InputFileError(f"{path}: neither 'mu'/'sigma' nor reference images 'arr_0': not a "
                         f"{WHAT} file (ADM's VIRTUAL_*.npz or a fid_stats file)")
  mu_s, sigma_s = _checked_statistics(path, arrays, "mu_s", "sigma_s", spatial_dim,
                                      "Inception spatial features for sFID: 2023")
  if need_images and images_shape is None:
    raise InputFileError(f"{path}: no reference images 'arr_0' (needed for precision/recall; "
                         "ADM's VIRTUAL_*.npz has them, a mu/sigma-only file does not)")
  count = int(arrays["count"]) if "count" in arrays and arrays["count"].size == 1 else None
  return ReferenceStatistics(path, mu, sigma, count, images_shape, mu_s, sigma_s)


def _checked_statistics(path: str, arrays, mu_key: str, sigma_key: str, dim: Optional[int],
                        what_dim: str):
  """(mu, sigma) float64 of the file's `mu_key`/`sigma_key` pair, (None, None) if it has
  neither; InputFileError naming the file and the key for half a pair, a wrong dtype, shape or
  dimension, non-finite values or an asymmetric sigma."""
  if mu_key not in arrays and sigma_key not in arrays:
    return None, None
  if not (mu_key in arrays and sigma_key in arrays):
    has, lacking = (mu_key, sigma_key) if mu_key in arrays else (sigma_key, mu_key)
    raise InputFileError(f"{path}: has {has} but no {lacking!r}: not a complete {WHAT} file")
  mu, sigma = arrays[mu_key], arrays[sigma_key]
  for name, value in ((mu_key, mu), (sigma_key, sigma)):
    if not np.issubdtype(value.dtype, np.floating):
      raise InputFileError(f"{path}: {name!r} must be floating point, got {value.dtype}")
  if mu.ndim != 1:
    raise InputFileError(f"{path}: {mu_key!r} must be a vector [D], got shape {mu.shape}")
  d = mu.shape[0]
  if sigma.shape != (d, d):
    raise InputFileError(f"{path}: {sigma_key!r} must be [{d}, {d}] like {mu_key!r} [{d}], got "
                         f"{sigma.shape}")
  if dim is not None and d != dim:
    which = "" if mu_key == "mu" else f"{mu_key!r}/{sigma_key!r}: "
    raise InputFileError(f"{path}: {which}statistics of {d}-d features, but the features here "
                         f"are {dim}-d ({what_dim}): a mismatched {WHAT} file")
  for name, value in ((mu_key, mu), (sigma_key, sigma)):
    if not np.all(np.isfinite(value)):
      raise InputFileError(f"{path}: {name!r} holds non-finite values")
  if not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8 * max(1.0, np.abs(sigma).max())):
    raise InputFileError(f"{path}: {sigma_key!r} is not symmetric: not a covariance matrix")
  return mu.astype(np.float64), sigma.astype(np.float64)


def save(path: str, mu: np.ndarray, sigma: np.ndarray, *, count: int,
         source: Optional[dict] = None, mu_s: Optional[np.ndarray] = None,
         sigma_s: Optional[np.ndarray] = None) -> str:
  """Writes `path` (.npz: mu, sigma, count, mu_s / sigma_s when given, and `source` as JSON)
  atomically; `load` reads it."""
  tmp = f"{path}.tmp.npz"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  spatial = {} if mu_s is None else {"mu_s": np.asarray(mu_s, np.float64),
                                     "sigma_s": np.asarray(sigma_s, np.float64)}
  np.savez(tmp, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
           count=np.int64(count), source_json=np.asarray(json.dumps(source or {})), **spatial)
  os.replace(tmp, path)
  return path


def cached_source(path: str) -> Optional[dict]:
  """The `source` a cached statistics file was computed from (None: no file, or none recorded)."""
  if not os.path.isfile(path):
    return None
  arrays = npz_files.read_arrays(path, WHAT, required=(), optional=("source_json",))
  return json.loads(str(arrays["source_json"])) if "source_json" in arrays else None


def compute_and_cache(path: str, batches: Callable[[], Iterable[np.ndarray]], extractor, *,
                      source: dict, log: Callable[[str], None] = print,
                      merge: Callable = lambda moments: moments, write: bool = True
                      ) -> ReferenceStatistics:
  """The pool3 and spatial (sFID) statistics of the real images `batches()` yields, from the
  cache at `path` when it was computed from the same `source` (e.g. {'dataset', 'split',
  'image_size'}), else computed with `extractor` (`InceptionExtractor`: streamed, memory
  independent of the split's size) and written there. A cache of another source, or one
  written before arjax kept the spatial statistics, is recomputed, saying why.

  Multi-host: every process streams its own share, `merge` combines the processes' moments
  (`inception_extractor.merged_across_processes`) and only the process with `write` writes;
  the others get the statistics without reading the file back.
  """
  cached = cached_source(path)
  if cached == source:
    stats = load(path, dim=extractor_dim(extractor))
    if stats.mu_s is not None:
      return stats
    log(f"{path}: has no spatial statistics (mu_s/sigma_s, for sFID): recomputing")
  elif cached is not None:
    log(f"{path}: computed from {cached}, not {source}: recomputing")
  result = extractor.stream(batches())
  moments, spatial = merge(result.moments), merge(result.spatial_moments)
  if not write:
    return ReferenceStatistics(path, moments.mu, moments.sigma, count=moments.count,
                               mu_s=spatial.mu, sigma_s=spatial.sigma)
  save(path, moments.mu, moments.sigma, count=moments.count, source=source, mu_s=spatial.mu,
       sigma_s=spatial.sigma)
  return load(path, dim=moments.dim, spatial_dim=spatial.dim)


def extractor_dim(extractor) -> Optional[int]:
  return getattr(extractor, "feature_dim", None)
