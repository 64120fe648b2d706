"""Reading the .npz files `eval` is given (samples, reference statistics) with one-line errors.

A new user's mistakes with these files are a wrong path, a file that is not an .npz at all
(random bytes, a truncated download, an HTML error page saved under the name), an array that
holds pickled Python objects, a missing key, and arrays of the wrong dtype, shape or range.
Each ends in an `InputFileError` (or FileNotFoundError) whose one line names the file and what
is wrong, never in numpy's traceback about pickled data: np.load treats any file that is
neither a zip nor a .npy as a pickle and refuses it with allow_pickle=False.
"""
from __future__ import annotations

import os
import zipfile
from typing import Dict, Iterable

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
