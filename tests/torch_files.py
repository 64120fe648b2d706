"""Writes PyTorch zip checkpoints without torch, byte layout as `torch.save` (protocol 2).

    <name>/data.pkl     the object; a tensor pickles as torch._utils._rebuild_tensor_v2(
                        storage, offset, size, stride, requires_grad, OrderedDict()), a
                        storage as the persistent id ('storage', torch.<X>Storage, key,
                        'cpu', numel)
    <name>/data/<key>   the storage's bytes, little-endian
    <name>/byteorder, <name>/version

`CallOnLoad` makes the malicious pickles the tests feed to arjax's loaders.

A `Tensor` here is a view (offset, shape, strides in elements) of a `Storage`, so tests can
write the non-contiguous and shared-storage tensors state dicts hold (transposes, tied
weights). The pickle is written by the standard library's own Pickler; only the globals that
name torch (importable without torch by nobody) are written as GLOBAL opcodes by hand.
"""
import collections
import dataclasses
import io
import pickle
import zipfile
from typing import Tuple

import ml_dtypes
import numpy as np

STORAGE_TYPES = {
    np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
    np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage"}


class CallOnLoad:
  """Pickles to a call of `function(argument)` on unpickling: how a malicious pickle runs code."""

  def __init__(self, function, argument):
    self.function, self.argument = function, argument

  def __reduce__(self):
    return (self.function, (self.argument,))


@dataclasses.dataclass(frozen=True)
class Global:
  """A global named by module and name, written as a GLOBAL opcode (torch need not exist)."""
  module: str
  name: str

  def __call__(self, *args):  # save_reduce insists on a callable
    raise NotImplementedError


@dataclasses.dataclass(eq=False)
class Storage:
  data: np.ndarray  # 1-D
  key: str


@dataclasses.dataclass(eq=False)
class Tensor:
  storage: Storage
  offset: int
  shape: Tuple[int, ...]
  strides: Tuple[int, ...]


def tensor(array) -> Tensor:
  """A contiguous tensor on a storage of its own."""
  array = np.array(array, order="C")  # not ascontiguousarray: it makes a 0-d array 1-d
  strides = tuple(int(np.prod(array.shape[i + 1:])) for i in range(array.ndim))
  return Tensor(Storage(array.reshape(-1), key=""), 0, array.shape, strides)


class _TorchPickler(pickle._Pickler):  # the pure-Python Pickler: its dispatch table is a dict
  dispatch = dict(pickle._Pickler.dispatch)

  def __init__(self, file):
    super().__init__(file, protocol=2)
    self.storages = {}  # id -> Storage, keys in order of first use

  def _save_global(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
    self.memoize(obj)

  dispatch[Global] = _save_global

  def persistent_id(self, obj):
    if not isinstance(obj, Storage):
      return None
    if id(obj) not in self.storages:
      obj.key = str(len(self.storages))
      self.storages[id(obj)] = obj
    return ("storage", Global("torch", STORAGE_TYPES[obj.data.dtype]), obj.key, "cpu",
            int(obj.data.size))

  def reducer_override(self, obj):
    if isinstance(obj, Tensor):
      return (Global("torch._utils", "_rebuild_tensor_v2"),
              (obj.storage, obj.offset, tuple(obj.shape), tuple(obj.strides), False,
               collections.OrderedDict()))
    return NotImplemented


def save(obj, path, archive: str = "archive", data_pickle: bytes = None):
  """Writes `obj` (Tensors anywhere inside) as torch.save would; `data_pickle` replaces the
  pickle by given bytes (for malicious files)."""
  buffer = io.BytesIO()
  pickler = _TorchPickler(buffer)
  pickler.dump(obj)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr(f"{archive}/data.pkl", buffer.getvalue() if data_pickle is None else data_pickle)
    z.writestr(f"{archive}/byteorder", "little")
    for storage in pickler.storages.values():
      z.writestr(f"{archive}/data/{storage.key}", storage.data.tobytes())  # x86/ARM: little
    z.writestr(f"{archive}/version", "3\n")
  return path
