"""Reading PyTorch checkpoints safely, and matching a state dict against a Flax module.

Every importer reads files through `load_checkpoint`, which never unpickles arbitrary code:
`.npz` (allow_pickle=False), `.safetensors`, and `.pth`/`.ckpt` zip files through arjax's own
restricted reader (`torch_zip`: no torch needed, a pickle naming anything but tensors,
storages, OrderedDict and argparse.Namespace is refused, naming the global). Only torch < 1.6's
legacy (non-zip) format goes to `torch.load(weights_only=True)`, when torch is installed.
Importers then go through `to_params`, so all of them refuse a mismatched checkpoint the same
way: one ValueError listing every missing, unexpected and mis-shaped key by name; nothing is
skipped silently.
"""
import argparse
import dataclasses
import json
import pathlib
import pickle
import zipfile
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from arjax.weights import torch_zip

# torch name -> (flax path, expected torch shape, dtype)
Expected = Mapping[str, Tuple[Sequence[str], tuple, object]]


def to_params(given: Mapping[str, np.ndarray], expected: Expected, *, what: str,
              kernel_layout: Callable[[np.ndarray], np.ndarray], key_prefix: str = "") -> dict:
  """The nested Flax params tree; `kernel_layout` turns a torch weight into a Flax kernel.

  `what` names the model in the error; `key_prefix` is prepended to key names in it.
  """
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  misshaped = sorted(
      f"{key_prefix}{k}: got {tuple(np.shape(given[k]))}, expected {tuple(expected[k][1])}"
      for k in set(given) & set(expected) if tuple(np.shape(given[k])) != tuple(expected[k][1]))
  if missing or unexpected or misshaped:
    lines = [f"{what}:"]
    lines += [f"  missing: {key_prefix}{k}" for k in missing]
    lines += [f"  unexpected: {key_prefix}{k}" for k in unexpected]
    lines += [f"  mis-shaped: {k}" for k in misshaped]
    raise ValueError("\n".join(lines))

  params = {}
  for name, (flax_path, _, dtype) in expected.items():
    value = np.asarray(given[name])
    if flax_path[-1] == "kernel":
      value = kernel_layout(value)
    node = params
    for part in flax_path[:-1]:
      node = node.setdefault(part, {})
    node[flax_path[-1]] = jnp.asarray(value, dtype=dtype)
  return params


def num_indexed(state_dict: Mapping[str, np.ndarray], prefix: str) -> Optional[int]:
  """1 + the largest <i> of keys '<prefix><i>.' (a ModuleList's length), or None if there are
  none: how converters read depths off a state dict."""
  found = {int(k[len(prefix):].split(".", 1)[0]) for k in state_dict
           if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
  return max(found) + 1 if found else None


# -----------------------------------------------------------------------------
# Reading checkpoint files.
#
# A checkpoint is a top-level dict: state dicts under group names (MAR's checkpoint-last.pth:
# 'model' and 'model_ema'; kl16.ckpt: 'model'; LDM: 'state_dict'), plus metadata ('epoch',
# 'args') and entries no importer reads ('optimizer', 'scaler'). A file holding one bare
# state dict is group "" (the empty name).
#
# Flat formats carry the same nesting in their key names (torch names never contain '/'):
#   .npz          `<group>/<torch name>` arrays; a key without '/' belongs to group "";
#                 optional scalars `epoch` (integer) and `args_json` (JSON of vars(args)).
#   .safetensors  `<group>/<torch name>` tensors likewise; `epoch` and `args_json` in the
#                 header's string metadata.
# (.pth/.ckpt files are read directly; a flat file is for weights from elsewhere, or for a
# checkpoint whose pickle holds more than the reader allows.) E.g., from a trusted checkpoint:
#   ckpt = torch.load("checkpoint-last.pth", map_location="cpu", weights_only=False)
#   np.savez("mar.npz", epoch=ckpt["epoch"], args_json=json.dumps(vars(ckpt["args"])),
#            **{f"{g}/{k}": v.float().numpy() for g in ("model", "model_ema")
#               for k, v in ckpt[g].items()})

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
FLAT_SUFFIXES = (".npz", ".safetensors")
_METADATA_KEYS = ("epoch", "args_json")

RESAVE_HINT = (
    "re-save its weights as .npz: python -c \"import numpy as np, "
    "torch; c = torch.load('IN.pth', map_location='cpu', weights_only=False); "
    "np.savez('OUT.npz', **{g + '/' + k: v.float().numpy() for g in ('model', 'model_ema') "
    "if g in c for k, v in c[g].items()})\"")


class CheckpointError(ValueError):
  """A checkpoint file that cannot be read as asked: wrong format, refused pickle, bad layout."""


@dataclasses.dataclass
class Checkpoint:
  """What `load_checkpoint` read: state dicts by group, plus the metadata importers use."""
  path: str
  state_dicts: Dict[str, Dict[str, np.ndarray]]  # group -> {torch name: array}; "" = bare
  epoch: Optional[int] = None
  args: Optional[dict] = None  # vars(args) of the training run, when the file carries them
  ignored: Tuple[str, ...] = ()  # top-level entries left unread (optimizer, scaler, ...)


def load_checkpoint(path, groups: Optional[Sequence[str]] = None) -> Checkpoint:
  """Reads a checkpoint file; never unpickles arbitrary code.

  `.npz` (allow_pickle=False) and `.safetensors` are read directly; `.pth`/`.pt`/`.ckpt`/`.bin`
  zip files (torch.save since 1.6) by `torch_zip`'s restricted unpickler, torch or not, with
  `argparse.Namespace` (MAR's `args`) the one class allowed beyond tensors and containers;
  a legacy non-zip torch file needs torch (`torch.load(weights_only=True)`). Only the `groups`
  asked for are materialised (None: all), so an optimizer state next to the weights costs
  nothing; the bare group "" is always read. Entries left unread are listed in
  `Checkpoint.ignored`.
  """
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if suffix not in FLAT_SUFFIXES + PICKLE_SUFFIXES:
    raise CheckpointError(f"{path}: unknown checkpoint format {suffix or '(no suffix)'!r}; "
                          f"expected one of {', '.join(FLAT_SUFFIXES + PICKLE_SUFFIXES)}")
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  if suffix in PICKLE_SUFFIXES:
    return _from_pickle_file(path, groups)
  return _from_flat(path, groups)


def load_flat(path) -> Dict[str, np.ndarray]:
  """Every state-dict array of a checkpoint file, keyed `<group>/<name>` (bare names as is)."""
  ckpt = load_checkpoint(path)
  return {(f"{group}/{name}" if group else name): value
          for group, sd in ckpt.state_dicts.items() for name, value in sd.items()}


def _wanted(group: str, groups) -> bool:
  return group == "" or groups is None or group in groups


def _group_of(key: str) -> Tuple[str, str]:
  group, sep, name = key.partition("/")
  return (group, name) if sep else ("", key)


def _from_flat(path: pathlib.Path, groups) -> Checkpoint:
  state_dicts: Dict[str, Dict[str, np.ndarray]] = {}
  ignored = set()
  if path.suffix.lower() == ".npz":
    try:
      data = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile/format errors come in many types
      raise CheckpointError(f"{path}: not a readable .npz file ({e})") from None
    def read(key):
      try:
        return data[key]
      except ValueError as e:
        if "allow_pickle" in str(e):  # np.load's refusal of an object array
          raise CheckpointError(f"{path}: array {key!r} holds Python objects (a pickle); "
                                "refused") from None
        raise CheckpointError(f"{path}: array {key!r} is not readable ({e})") from None

    with data:
      metadata = {k: read(k) for k in _METADATA_KEYS if k in data.files}
      for key in data.files:
        if key in metadata:
          continue
        group, name = _group_of(key)
        if _wanted(group, groups):
          state_dicts.setdefault(group, {})[name] = read(key)
        else:
          ignored.add(group)
    epoch = int(metadata["epoch"]) if "epoch" in metadata else None
    args_json = str(metadata["args_json"]) if "args_json" in metadata else None
  else:
    try:
      from safetensors import safe_open  # optional dependency
    except ImportError:
      raise CheckpointError(f"{path}: reading .safetensors needs the 'safetensors' package "
                            "(pip install safetensors), or re-save the weights as .npz") from None
    try:
      with safe_open(str(path), framework="np") as f:
        header = f.metadata() or {}
        for key in f.keys():
          group, name = _group_of(key)
          if _wanted(group, groups):
            state_dicts.setdefault(group, {})[name] = f.get_tensor(key)
          else:
            ignored.add(group)
    except Exception as e:  # safetensors raises its own error types for bad headers
      raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from None
    epoch = int(header["epoch"]) if "epoch" in header else None
    args_json = header.get("args_json")
  args = None
  if args_json is not None:
    try:
      args = json.loads(args_json)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path}: args_json is not JSON ({e})") from None
  return Checkpoint(str(path), state_dicts, epoch, args, tuple(sorted(ignored)))


def _from_pickle_file(path: pathlib.Path, groups) -> Checkpoint:
  """A torch.save file: a zip through the restricted reader; legacy format through torch."""
  if zipfile.is_zipfile(path):
    try:
      reader = torch_zip.TorchZipReader(path)
    except torch_zip.ForbiddenGlobal as e:
      raise CheckpointError(f"{path}: pickle refused: {e}. If you trust the file, "
                            f"{RESAVE_HINT}") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError,
            AttributeError, IndexError, KeyError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
    with reader:
      try:
        return _from_torch(path, reader.obj, groups,
                           is_tensor=lambda v: isinstance(v, torch_zip.LazyTensor),
                           to_numpy=reader.array)
      except (ValueError, zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
  # Not a zip: torch < 1.6's format starts with a pickled magic number; anything else is a
  # bare pickle. Either way the first object goes through the restricted unpickler, so a
  # pickle that would run code is refused here, torch or not.
  with open(path, "rb") as f:
    try:
      first = torch_zip.restricted_load(f)
    except torch_zip.ForbiddenGlobal as e:
      raise CheckpointError(f"{path}: pickle refused: {e}") from None
    except Exception as e:  # unpickling garbage raises many types
      raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip nor "
                            f"a readable pickle: {e})") from None
  if isinstance(first, int) and first == torch_zip.LEGACY_MAGIC_NUMBER:
    return _from_torch(path, _torch_load(_import_torch(path), path), groups,
                       is_tensor=_is_torch_tensor, to_numpy=_to_numpy)
  raise CheckpointError(f"{path}: a bare pickle, not a PyTorch checkpoint (torch.save writes a "
                        "zip holding <name>/data.pkl); refused")


def _import_torch(path):
  try:
    import torch
  except ImportError:
    raise CheckpointError(
        f"{path}: legacy (torch < 1.6, non-zip) PyTorch checkpoint: arjax reads those only "
        "through torch.load(weights_only=True), and torch is not installed. Install torch "
        "(the CPU build is enough), or re-save it with a recent torch (a zip) or as "
        ".npz/.safetensors (see arjax/weights/state_dict.py)") from None
  return torch


def _torch_load(torch, path: pathlib.Path):
  import contextlib

  # MAR stores its argparse.Namespace under 'args'; weights_only refuses every class it does
  # not know, and a Namespace is a plain attribute bag, so it is the one allowed.
  safe_globals = getattr(torch.serialization, "safe_globals", None)
  allow = safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext()
  try:
    with allow:
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise CheckpointError(f"{path}: refused by torch.load(weights_only=True), which will not "
                          f"run code from a pickle ({_unpickler_reason(e)}). If you trust the "
                          f"file, {RESAVE_HINT}") from None
  except (RuntimeError, EOFError, OSError) as e:
    raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from None


def _unpickler_reason(error) -> str:
  """The specific sentence of torch's long weights_only message (what it refused)."""
  text = str(error)
  marker = "WeightsUnpickler error:"
  if marker in text:
    text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
  text = " ".join(text.split())
  return text.split(". ", 1)[0].rstrip(".") or type(error).__name__


def _to_numpy(tensor):
  tensor = tensor.detach().cpu()
  if str(tensor.dtype) == "torch.bfloat16":  # numpy has no bfloat16
    tensor = tensor.float()
  return tensor.numpy()


def _is_torch_tensor(value) -> bool:
  return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _from_torch(path: pathlib.Path, obj, groups, *, is_tensor, to_numpy) -> Checkpoint:
  """The Checkpoint of a loaded torch.save object (tensors by `is_tensor`, read by `to_numpy`)."""
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: expected a dict at the top level, got {type(obj).__name__}")
  state_dicts: Dict[str, Dict[str, np.ndarray]] = {}
  ignored = []
  epoch = args = None
  for key, value in obj.items():
    if is_tensor(value):
      state_dicts.setdefault("", {})[key] = to_numpy(value)
    elif key == "epoch" and isinstance(value, int):
      epoch = value
    elif key == "args" and isinstance(value, (dict, argparse.Namespace)):
      args = dict(value) if isinstance(value, dict) else dict(vars(value))
    elif (isinstance(value, dict) and value and all(is_tensor(v) for v in value.values())
          and _wanted(key, groups)):
      state_dicts[key] = {name: to_numpy(v) for name, v in value.items()}
    else:
      ignored.append(str(key))
  return Checkpoint(str(path), state_dicts, epoch, args, tuple(ignored))
