"""PyTorch zip checkpoints (`torch.save` since 1.6) read without torch, and without running code.

The file is a zip archive with one top folder, `<name>/`:

    <name>/data.pkl      the saved object, a pickle whose tensors point at storages
    <name>/data/<key>    each storage's raw bytes (byte order: <name>/byteorder, else little)
    <name>/version, <name>/.data/...   bookkeeping, not read

A plain `pickle.load` of data.pkl would call whatever callable the pickle names, which is how
a malicious checkpoint runs code. `RestrictedUnpickler.find_class` hands out only the few
globals a state dict needs (`ALLOWED_GLOBALS`), each replaced by arjax's own harmless stand-in
(a tensor becomes a `LazyTensor`, a storage type a numpy dtype); any other global stops the
read with `ForbiddenGlobal` naming it, before anything it names is imported or called. The
stand-ins are made afresh for every load, and arjax's own objects refuse pickle's BUILD
(attribute setting), so a pickle cannot alter anything that outlives its own load. Tensor
data is never unpickled: `persistent_load` maps a storage record to its `data/<key>` entry,
and a `LazyTensor` reads it (only when asked: an optimizer state beside the weights costs
nothing) as a numpy array of the storage's dtype, honouring the tensor's offset and strides
after checking that they stay inside the storage.
"""
import _compat_pickle
import argparse
import collections
import dataclasses
import io
import pickle
import zipfile
from typing import Any, Dict, Tuple

import ml_dtypes
import numpy as np

# The legacy (torch < 1.6) format starts with this number, pickled.
LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}


class ForbiddenGlobal(pickle.UnpicklingError):
  """The pickle names a global outside ALLOWED_GLOBALS (it could run code): refused."""

  def __init__(self, name: str):
    self.name = name
    super().__init__(f"forbidden global {name!r}: a pickle calling it could run code, and "
                     "only tensors, storages, OrderedDict and argparse.Namespace are allowed")


class _NoBuild:
  """Refuses pickle's BUILD opcode, which would otherwise set attributes on the object."""

  def __setstate__(self, state):
    raise pickle.UnpicklingError(f"the pickle sets attributes of a {type(self).__name__}; "
                                 "refused")


@dataclasses.dataclass(frozen=True)
class StorageType(_NoBuild):
  """Stand-in for `torch.<X>Storage`: only its element type matters."""
  name: str

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(_STORAGE_DTYPES[self.name])


@dataclasses.dataclass(frozen=True)
class Storage(_NoBuild):
  """A storage record of data.pkl: entry `data/<key>` of the archive, `numel` elements."""
  key: str
  dtype: np.dtype
  numel: int


@dataclasses.dataclass(frozen=True)
class LazyTensor(_NoBuild):
  """A tensor of data.pkl, not yet read: `TorchZipReader.array` materialises it."""
  storage: Storage
  offset: int
  shape: Tuple[int, ...]
  strides: Tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """`torch._utils._rebuild_tensor_v2`'s arguments, kept (after a type check) for later."""
  del requires_grad, backward_hooks, metadata  # autograd bookkeeping: no data
  if not isinstance(storage, Storage):
    raise pickle.UnpicklingError(f"_rebuild_tensor_v2 got {type(storage).__name__}, not a storage")
  ints = lambda values: all(isinstance(v, int) and not isinstance(v, bool) for v in values)
  if not (isinstance(storage_offset, int) and ints(size) and ints(stride)
          and len(size) == len(stride)):
    raise pickle.UnpicklingError(f"_rebuild_tensor_v2: malformed offset/size/stride "
                                 f"{storage_offset!r}, {size!r}, {stride!r}")
  return LazyTensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  """`torch._utils._rebuild_parameter`: an nn.Parameter is its tensor here."""
  del requires_grad, backward_hooks
  if not isinstance(data, LazyTensor):
    raise pickle.UnpicklingError(f"_rebuild_parameter got {type(data).__name__}, not a tensor")
  return data


def _latin1_encode(text, encoding="latin1"):
  """`_codecs.encode` as protocol-2 pickles use it for bytes objects, and for nothing else."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) refused: "
                                 "only the latin1 encoding of bytes is allowed")
  return text.encode("latin1")


def _stand_ins() -> Dict[str, Any]:
  """The globals a pickle may name -> what arjax hands out instead, made anew for every load:
  BUILD on a function or a class sets its attributes, and whatever a pickle changes that way
  must not reach the next load (nor argparse.Namespace itself)."""
  def wrap(function):
    return lambda *args: function(*args)

  return {
      "collections.OrderedDict": wrap(collections.OrderedDict),
      "torch._utils._rebuild_tensor_v2": wrap(_rebuild_tensor_v2),
      "torch._utils._rebuild_parameter": wrap(_rebuild_parameter),
      # MAR keeps its argparse.Namespace under 'args': a bag of attributes, no behaviour. A
      # class (pickle's NEWOBJ needs one), subclassed so that the real one is never handed out.
      "argparse.Namespace": type("Namespace", (argparse.Namespace,), {}),
      "_codecs.encode": wrap(_latin1_encode),
      **{f"torch.{name}": StorageType(name) for name in _STORAGE_DTYPES},
  }


ALLOWED_GLOBALS = tuple(sorted(_stand_ins()))


class RestrictedUnpickler(pickle.Unpickler):
  """An Unpickler that resolves only ALLOWED_GLOBALS and storage records of a torch zip."""

  def __init__(self, file, storages: Dict[str, int]):
    super().__init__(file)
    self._storages = storages  # key -> bytes of its data/<key> entry
    self._globals = _stand_ins()

  def find_class(self, module, name):
    # Protocol-2 pickles may spell globals the Python 2 way (`__builtin__.eval`); name them
    # as Python 3 does, as the default find_class would before importing anything.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
      module = _compat_pickle.IMPORT_MAPPING[module]
    full = f"{module}.{name}"
    if full not in self._globals:
      raise ForbiddenGlobal(full)
    return self._globals[full]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
    _, storage_type, key, _, numel = pid
    if not isinstance(storage_type, StorageType):
      raise pickle.UnpicklingError(f"storage of type {storage_type!r:.80}: not a tensor storage")
    if not isinstance(key, str) or key not in self._storages:
      raise pickle.UnpicklingError(f"storage {key!r:.80} has no data/{key} entry in the archive")
    dtype = storage_type.dtype
    if not isinstance(numel, int) or numel < 0 or numel * dtype.itemsize != self._storages[key]:
      raise pickle.UnpicklingError(
          f"storage {key}: {numel!r} elements of {dtype} do not fill its "
          f"{self._storages[key]} bytes")
    return Storage(key, dtype, numel)


def restricted_load(file):
  """The next object of an open binary `file`, by RestrictedUnpickler (with no storages: a
  file that is not a zip has none to point at)."""
  return RestrictedUnpickler(file, {}).load()


class TorchZipReader:
  """Opens a torch zip checkpoint: `.obj` is data.pkl's object, tensors as LazyTensors."""

  def __init__(self, path):
    self.path = path
    self._zip = zipfile.ZipFile(path)
    try:
      pickles = [n for n in self._zip.namelist() if n.endswith("data.pkl")
                 and n.count("/") == 1]
      if len(pickles) != 1:
        raise pickle.UnpicklingError(f"expected one <name>/data.pkl in the archive, found "
                                     f"{len(pickles)}: not a torch.save zip file")
      self._prefix = pickles[0][: -len("data.pkl")]
      data_dir = self._prefix + "data/"
      storages = {info.filename[len(data_dir):]: info.file_size
                  for info in self._zip.infolist() if info.filename.startswith(data_dir)}
      byteorder = "little"
      if self._prefix + "byteorder" in self._zip.namelist():
        byteorder = self._zip.read(self._prefix + "byteorder").decode("ascii").strip()
      if byteorder not in ("little", "big"):
        raise pickle.UnpicklingError(f"byteorder {byteorder!r}: expected 'little' or 'big'")
      self._big_endian = byteorder == "big"
      self.obj = RestrictedUnpickler(io.BytesIO(self._zip.read(pickles[0])), storages).load()
    except BaseException:
      self._zip.close()
      raise
    self._cache: Dict[str, np.ndarray] = {}

  def array(self, tensor: LazyTensor) -> np.ndarray:
    """The tensor's values, a new C-contiguous array (bfloat16 becomes float32, as numpy
    has no bfloat16 of its own); offset and strides are checked against the storage."""
    storage = tensor.storage
    if any(n < 0 for n in tensor.shape) or any(s < 0 for s in tensor.strides):
      raise ValueError(f"tensor on storage {storage.key}: negative size or stride "
                       f"{tensor.shape}, {tensor.strides}")
    if 0 not in tensor.shape:
      last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.strides))
      if tensor.offset < 0 or last >= storage.numel:
        raise ValueError(f"tensor on storage {storage.key} reads elements up to {last} of "
                         f"{storage.numel} (offset {tensor.offset}, shape {tensor.shape}, "
                         f"strides {tensor.strides})")
    flat = self._cache.get(storage.key)
    if flat is None:
      flat = np.frombuffer(self._zip.read(f"{self._prefix}data/{storage.key}"), storage.dtype)
      if self._big_endian and flat.dtype.itemsize > 1:
        flat = flat.byteswap()
      self._cache[storage.key] = flat
    view = np.lib.stride_tricks.as_strided(
        flat[tensor.offset:] if 0 not in tensor.shape else flat[:0], shape=tensor.shape,
        strides=tuple(s * flat.dtype.itemsize for s in tensor.strides), writeable=False)
    out = np.array(view, order="C")
    if out.dtype == ml_dtypes.bfloat16:
      out = out.astype(np.float32)
    return out

  def close(self):
    self._zip.close()
    self._cache.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
