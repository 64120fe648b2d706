"""`sample`'s images on disk while they are drawn: one part file per (batch, process), resumable.

A paper's sample set is 50,000 images (9.8 GB at 256 px), drawn for hours on many hosts; no
process should hold it all and a preempted run should not start again from image 0. So every
global batch that `sample` draws is written as soon as it is drawn, by every process for the
rows its own devices hold:

    workdir/samples_parts/manifest.json                       what is being drawn (see below)
    workdir/samples_parts/batch_000003_of_000100.proc0.npz    images, labels, ids of those rows

A part is written to a temporary name and renamed, so a part that exists is complete. A run that
finds parts of the same request (the manifest: checkpoint step, labels, seed, guidance, steps,
batch size... everything that decides an image) draws only the batches that some process has
not written yet; parts of another request are removed first, saying so, never mixed in. When every
batch is written, process 0 streams the parts into `workdir/samples.npz` (one batch in memory at
a time, rows in image order) and removes the parts. Image i comes from (seed, i) whatever the
batching (`ImageSampler`), so a resumed run writes the same file as an uninterrupted one.

The workdir must be one file system seen by every process (as the checkpoints are).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import uuid
import zipfile
from typing import Iterable, List, Sequence, Tuple

import numpy as np

PARTS_DIR = "samples_parts"
MANIFEST = "manifest.json"


def parts_dir(workdir: str) -> str:
  return os.path.join(workdir, PARTS_DIR)


def part_path(directory: str, batch: int, num_batches: int, process: int) -> str:
  return os.path.join(directory, f"batch_{batch:06d}_of_{num_batches:06d}.proc{process}.npz")


def prepare(directory: str, manifest: dict, *, announce=print) -> None:
  """Makes `directory` hold parts of `manifest`'s request only (called by process 0 alone)."""
  path = os.path.join(directory, MANIFEST)
  manifest = json.loads(json.dumps(manifest, sort_keys=True))  # as it reads back (tuples: lists)
  if os.path.isdir(directory):
    try:
      with open(path) as f:
        found = json.load(f)
    except (OSError, ValueError):
      found = None
    if found == manifest:
      return
    stale = len(glob.glob(os.path.join(directory, "batch_*.npz")))
    announce(f"sample: {directory} holds {stale} part(s) of another request "
             f"({_difference(found, manifest)}); removing them and drawing afresh")
    shutil.rmtree(directory)
  os.makedirs(directory)
  _write_atomic(path, lambda f: f.write(json.dumps(manifest, indent=1, sort_keys=True).encode()))


def _difference(found, wanted) -> str:
  if not isinstance(found, dict):
    return "no readable manifest"
  keys = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
  return ", ".join(f"{k}: {found.get(k)!r} -> {wanted.get(k)!r}" for k in keys[:4])


def written(directory: str, num_batches: int, process: int) -> np.ndarray:
  """bool [num_batches]: which batches this process has written a (complete) part of."""
  return np.asarray([os.path.exists(part_path(directory, b, num_batches, process))
                     for b in range(num_batches)], bool)


def write_part(directory: str, batch: int, num_batches: int, process: int,
               images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> str:
  """Writes this process's rows of one batch (possibly none) under a temporary name + rename."""
  path = part_path(directory, batch, num_batches, process)
  _write_atomic(path, lambda f: np.savez(f, images=images, labels=labels.astype(np.int64),
                                         ids=ids.astype(np.int64)))
  return path


def local_rows(array, num_valid: int, first_index: int) -> Tuple[np.ndarray, np.ndarray]:
  """(rows, their image ids) of a global batch array that this process's devices hold, each row
  once (the replica 0 of every shard) and without the padding rows (index >= num_valid)."""
  rows, ids = [], []
  for shard in array.addressable_shards:
    if shard.replica_id != 0:
      continue
    index = shard.index[0] if shard.index else slice(None)
    start, stop, _ = index.indices(array.shape[0])
    keep = np.arange(start, stop) < num_valid
    rows.append(np.asarray(shard.data)[keep])
    ids.append(first_index + np.arange(start, stop)[keep])
  if not rows:
    return np.zeros((0,) + array.shape[1:], array.dtype), np.zeros((0,), np.int64)
  order = np.argsort(np.concatenate(ids), kind="stable")
  return np.concatenate(rows)[order], np.concatenate(ids)[order]


def merge(directory: str, out_path: str, num_batches: int, num_images: int,
          image_shape: Sequence[int], *, per_class: int = 10) -> Tuple[np.ndarray, np.ndarray]:
  """Streams every part into `out_path` (`images` uint8 [N, ...], `labels` int64 [N]) in image
  order, checking each id is present exactly once; returns (images, labels) of up to
  `per_class` images of each class for the PNG grids. Removes the parts afterwards."""
  labels = np.full((num_images,), -1, np.int64)
  grid_images: List[np.ndarray] = []
  grid_labels: List[np.ndarray] = []
  shown = {}
  tmp = f"{out_path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
  try:
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
      with archive.open("images.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_2_0(member, {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
            "shape": (num_images,) + tuple(image_shape)})
        next_id = 0
        for batch in range(num_batches):
          images, ids, batch_labels = _read_batch(directory, batch, num_batches)
          if len(ids) and not np.array_equal(ids, np.arange(next_id, next_id + len(ids))):
            raise ValueError(f"{directory}: batch {batch} holds images {ids[:3]}..., expected "
                             f"from {next_id} on (parts of two requests?)")
          member.write(np.ascontiguousarray(images, np.uint8).tobytes())
          labels[next_id:next_id + len(ids)] = batch_labels
          next_id += len(ids)
          for image, label in zip(images, batch_labels):
            if shown.get(int(label), 0) < per_class:
              shown[int(label)] = shown.get(int(label), 0) + 1
              grid_images.append(image)
              grid_labels.append(label)
        if next_id != num_images:
          raise ValueError(f"{directory}: the parts hold {next_id} images, {num_images} expected")
      with archive.open("labels.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array(member, labels)
    os.replace(tmp, out_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  shutil.rmtree(directory)
  return np.stack(grid_images), np.asarray(grid_labels, np.int64)


def _read_batch(directory: str, batch: int, num_batches: int):
  paths = sorted(glob.glob(os.path.join(directory, f"batch_{batch:06d}_of_{num_batches:06d}.proc*.npz")))
  if not paths:
    raise ValueError(f"{directory}: batch {batch} of {num_batches} was never written")
  parts = []
  for path in paths:
    with np.load(path, allow_pickle=False) as f:
      parts.append((f["images"], f["ids"], f["labels"]))
  ids = np.concatenate([p[1] for p in parts])
  order = np.argsort(ids, kind="stable")
  return (np.concatenate([p[0] for p in parts])[order], ids[order],
          np.concatenate([p[2] for p in parts])[order])


def _write_atomic(path: str, write) -> None:
  tmp = os.path.join(os.path.dirname(path),
                     f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def all_processes(mask: np.ndarray) -> np.ndarray:
  """The batches every process has written (the AND over processes; the sampler call is
  collective, so all processes must skip the same ones)."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return mask
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(mask.astype(np.int32))).reshape(
      jax.process_count(), -1).min(0).astype(bool)


def sync(name: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def ids_in(paths: Iterable[str]) -> np.ndarray:
  """Every image id held by the given part files (for tests and checks)."""
  out = []
  for path in paths:
    with np.load(path, allow_pickle=False) as f:
      out.append(f["ids"])
  return np.concatenate(out) if out else np.zeros((0,), np.int64)
