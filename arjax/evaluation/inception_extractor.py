"""Running the FID Inception over a stream of images: jitted, sharded over the batch, streaming.

    extractor = InceptionExtractor(inception.load_params(".../fid_inception_v3.npz"))
    result = extractor.stream(batches)        # batches: an iterable of uint8 [n, H, W, 3]
    result.moments.statistics()               # (mu, sigma) of pool3, for FID
    result.spatial_moments.statistics()       # of the spatial features, for sFID
    result.logits_unbiased                    # float32 [N, 1008], for the Inception Score

Memory is independent of the number of images for the statistics (running moments,
`fid.FeatureMoments`: pool3's 2048-d and sFID's 2023-d spatial features, `inception.SPATIAL_DIM`); the IS logits are kept (4 KB an image: 200 MB for 50,000), and pool3
features only when asked (`keep_pool3`, for precision/recall: 8 KB an image).

Every call runs one compiled program of a fixed batch (`batch_size`, a multiple of the
devices), split over the devices of the mesh; a short last batch is padded with black images
whose rows are dropped, so a stream of any length compiles once per image size.

Multi-host: each process streams its own images through its own devices (a process-local
mesh: no collective in the network) and the processes' moments are merged afterwards
(`merged_across_processes`), which is exact: the statistics of all rows, whatever the split.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, List, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from arjax.evaluation import fid
from arjax.evaluation import inception
from arjax.parallel import sharding

DEFAULT_BATCH_PER_DEVICE = 32


@dataclasses.dataclass
class StreamResult:
  moments: fid.FeatureMoments        # of pool3
  spatial_moments: fid.FeatureMoments  # of the spatial features (sFID)
  logits_unbiased: np.ndarray        # float32 [N, 1008]
  pool3: Optional[np.ndarray] = None  # float32 [N, 2048] when kept


class InceptionExtractor:
  """pool3 features, sFID's spatial features and logits of uint8 images, `batch_size` at a
  time over a mesh."""

  feature_dim = inception.POOL3_DIM

  def __init__(self, params, *, batch_size: Optional[int] = None, mesh: Optional[Mesh] = None):
    if mesh is None:
      devices = np.asarray(jax.local_devices()).reshape(-1, 1, 1)
      mesh = Mesh(devices, sharding.MESH_AXES)
    self.mesh = mesh
    num_devices = mesh.devices.size
    self.batch_size = batch_size or DEFAULT_BATCH_PER_DEVICE * num_devices
    if self.batch_size % num_devices:
      raise ValueError(f"batch_size={self.batch_size} must be a multiple of the {num_devices} "
                       "devices it is split over")
    self.params = jax.device_put(params, sharding.replicated(mesh))
    model = inception.FIDInceptionV3()
    batch = self._batch = sharding.batch_sharding(mesh)

    def run(params, images):
      out = model.apply({"params": params}, images)
      return {k: out[k] for k in ("pool3", "spatial", "logits_unbiased")}
    self._run = jax.jit(run, in_shardings=(sharding.replicated(mesh), batch),
                        out_shardings=batch)

  def __call__(self, images: np.ndarray) -> dict:
    """{'pool3': float32 [n, 2048], 'spatial': float32 [n, 2023], 'logits_unbiased': float32
    [n, 1008]} of uint8 [n, H, W, C]
    images (C = 3, or 1: grayscale, repeated), n <= batch_size."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"images must be uint8 [n, H, W, 1 or 3], got {images.dtype} "
                       f"{images.shape}")
    if images.shape[-1] == 1:  # grayscale: the network reads RGB; gray = three equal channels
      images = np.repeat(images, 3, axis=-1)
    n = len(images)
    if not 0 < n <= self.batch_size:
      raise ValueError(f"a batch holds 1..{self.batch_size} images, got {n}")
    if n < self.batch_size:  # pad: one compiled shape for every batch of the stream
      padding = np.zeros((self.batch_size - n,) + images.shape[1:], np.uint8)
      images = np.concatenate([images, padding])
    # Placed explicitly: in a multi-process job jit refuses numpy input for a sharded argument,
    # and this mesh is the process's own devices, so the host batch is all of the array.
    out = self._run(self.params, jax.device_put(images, self._batch))
    return {k: np.asarray(jax.device_get(v))[:n] for k, v in out.items()}

  def stream(self, batches: Iterable[np.ndarray], *, keep_pool3: bool = False) -> StreamResult:
    """The running pool3 and spatial moments (and logits, and pool3 if kept) of a stream of
    image batches of any sizes; batches larger than `batch_size` are split."""
    moments = fid.FeatureMoments(inception.POOL3_DIM)
    spatial = fid.FeatureMoments(inception.SPATIAL_DIM)
    logits: List[np.ndarray] = []
    pool3: List[np.ndarray] = []
    for batch in batches:
      batch = np.asarray(batch)
      for start in range(0, len(batch), self.batch_size):
        out = self(batch[start:start + self.batch_size])
        moments.update(out["pool3"])
        spatial.update(out["spatial"])
        logits.append(out["logits_unbiased"])
        if keep_pool3:
          pool3.append(out["pool3"])
    empty = lambda d: np.zeros((0, d), np.float32)
    return StreamResult(
        moments, spatial,
        np.concatenate(logits) if logits else empty(inception.NUM_CLASSES),
        (np.concatenate(pool3) if pool3 else empty(inception.POOL3_DIM)) if keep_pool3 else None)


def merged_across_processes(moments: fid.FeatureMoments) -> fid.FeatureMoments:
  """The moments of every process's rows, on every process (one process: `moments` itself)."""
  if jax.process_count() == 1:
    return moments
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  counts = np.asarray(multihost_utils.process_allgather(np.int64(moments.count)))
  means = np.asarray(multihost_utils.process_allgather(moments.mean))
  m2s = np.asarray(multihost_utils.process_allgather(moments.m2))
  merged = fid.FeatureMoments(moments.dim)
  for count, mean, m2 in zip(counts, means, m2s):
    merged.merge(fid.FeatureMoments(moments.dim, int(count), mean, m2))
  return merged
