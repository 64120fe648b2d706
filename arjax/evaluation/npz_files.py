"""Reading the .npz files `eval` is given (samples, reference statistics) with one-line errors.

A new user's mistakes with these files are a wrong path, a file that is not an .npz at all
(random bytes, a truncated download, an HTML error page saved under the name), an array that
holds pickled Python objects, a missing key, and arrays of the wrong dtype, shape or range.
Each ends in an `InputFileError` (or FileNotFoundError) whose one line names the file and what
is wrong, never in numpy's traceback about pickled data: np.load treats any file that is
neither a zip nor a .npy as a pickle and refuses it with allow_pickle=False.
"""
from __future__ import annotations

import contextlib
import os
import zipfile
from typing import Dict, Iterable, Iterator, Optional

import numpy as np

from arjax.errors import InputFileError


def _reason(error: BaseException) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= 160 else text[:157] + "..."


def read_arrays(path: str, what: str, required: Iterable[str], optional: Iterable[str] = ()
                ) -> Dict[str, np.ndarray]:
  """The `required` (and those of `optional` present) arrays of the .npz at `path`.

  `what` says what the file should be in messages ('samples', 'reference statistics').
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such {what} file")
  if not zipfile.is_zipfile(path):
    raise InputFileError(f"{path}: not an .npz file (no zip archive inside; is it truncated or "
                         f"something else saved under this name?): cannot read the {what}")
  try:
    npz = np.load(path, allow_pickle=False)
  except Exception as e:  # a damaged archive fails in many ways
    raise InputFileError(f"{path}: not a readable .npz file ({_reason(e)})") from None
  arrays = {}
  with npz:
    names = set(npz.files)
    missing = [k for k in required if k not in names]
    if missing:
      raise InputFileError(f"{path}: no array {', '.join(repr(k) for k in missing)} in this "
                           f"{what} file (it holds {sorted(names) or 'none'})")
    for key in list(required) + [k for k in optional if k in names]:
      try:
        arrays[key] = npz[key]
      except ValueError as e:
        if "allow_pickle" in str(e) or "pickled" in str(e):
          raise InputFileError(f"{path}: array {key!r} holds pickled Python objects; refused "
                               "(save plain numeric arrays)") from None
        raise InputFileError(f"{path}: array {key!r} is not readable ({_reason(e)})") from None
      except Exception as e:  # CRC errors, truncated members, zlib errors
        raise InputFileError(f"{path}: array {key!r} is not readable ({_reason(e)})") from None
  return arrays


def has_array(path: str, key: str) -> bool:
  """Whether the .npz at `path` (already read by `read_arrays`) holds array `key`."""
  with zipfile.ZipFile(path) as archive:
    return f"{key}.npy" in archive.namelist()


def array_header(path: str, key: str, what: str):
  """(shape, dtype) of array `key` of the .npz at `path`, read from its .npy header only."""
  with _member(path, key, what) as f:
    shape, _, dtype = _read_header(path, key, f)
  return shape, dtype


def stream_rows(path: str, key: str, what: str, batch_size: int, *, start: int = 0,
                stop: Optional[int] = None) -> Iterator[np.ndarray]:
  """Rows [start, stop) of array `key` of the .npz at `path`, `batch_size` at a time, read from
  the archive as they are needed: memory holds one batch, whatever the array's length (50,000
  images at 256 px are 9.8 GB). Works for np.savez and np.savez_compressed files alike."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  with _member(path, key, what) as f:
    shape, fortran, dtype = _read_header(path, key, f)
    if not shape:
      raise InputFileError(f"{path}: array {key!r} is a scalar, not rows")
    if fortran and len(shape) > 1:
      raise InputFileError(f"{path}: array {key!r} is stored in Fortran order; re-save it with "
                           "np.savez (C order) to stream it")
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    stop = shape[0] if stop is None else min(stop, shape[0])
    if start:
      f.seek(f.tell() + start * row_bytes)  # a compressed member decompresses up to there
    for first in range(start, stop, batch_size):
      n = min(batch_size, stop - first)
      try:
        data = f.read(n * row_bytes)
      except Exception as e:  # CRC and zlib errors surface while reading
        raise InputFileError(f"{path}: array {key!r} is not readable ({_reason(e)})") from None
      if len(data) != n * row_bytes:
        rows = first + len(data) // max(row_bytes, 1)
        raise InputFileError(f"{path}: array {key!r} ends after {rows} of its {shape[0]} rows "
                             "(a truncated file?)")
      yield np.frombuffer(data, dtype).reshape((n,) + tuple(shape[1:]))


@contextlib.contextmanager
def _member(path: str, key: str, what: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such {what} file")
  if not zipfile.is_zipfile(path):
    raise InputFileError(f"{path}: not an .npz file (no zip archive inside; is it truncated or "
                         f"something else saved under this name?): cannot read the {what}")
  try:
    archive = zipfile.ZipFile(path)
  except Exception as e:
    raise InputFileError(f"{path}: not a readable .npz file ({_reason(e)})") from None
  with archive:
    names = [n[:-len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
    if key not in names:
      raise InputFileError(f"{path}: no array {key!r} in this {what} file (it holds "
                           f"{sorted(names) or 'none'})")
    with archive.open(f"{key}.npy") as f:
      yield f


def _read_header(path: str, key: str, f):
  try:
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
      raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran, dtype = read(f)
  except Exception as e:
    raise InputFileError(f"{path}: array {key!r} is not readable ({_reason(e)})") from None
  if dtype.hasobject:
    raise InputFileError(f"{path}: array {key!r} holds pickled Python objects; refused "
                         "(save plain numeric arrays)")
  return shape, fortran, dtype
