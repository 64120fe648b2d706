"""`python -m arjax convert --kind=inception`: the published FID Inception weights -> arjax.

    python -m arjax convert --kind=inception --source=pt_inception-2015-12-05-6726825d.pth \\
        --out=DIR

The source is the file pytorch-fid and torch-fidelity download (the 2015 TF Inception graph's
weights as a PyTorch state dict; the same file for both). It is read by the same safe loader
as MAR's weights (`arjax.weights.state_dict.load_checkpoint`: no code from the pickle runs);
every name goes through `inception.flax_path`, and a file that is not exactly this network
fails naming every missing, unexpected and mis-shaped key.

What it writes:
  DIR/fid_inception_v3.npz    the Flax params, one float32 array per '/'-joined path
                              (`inception.save_params` / `inception.load_params`), no pickle
  DIR/arjax_inception.json    where they came from (source path, its sha256)
"""
from __future__ import annotations

import hashlib
import json
import os

from arjax.evaluation import inception
from arjax.weights import converter as converter_lib
from arjax.weights.state_dict import CheckpointError

PARAMS_FILE = "fid_inception_v3.npz"


def params_path(path: str) -> str:
  """Where the params are, given the converter's output directory or the params file itself."""
  return os.path.join(path, PARAMS_FILE) if os.path.isdir(path) else path


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


class InceptionConverter(converter_lib.NetworkConverter):
  name = "inception"
  what = "FID Inception-v3 (pt_inception-2015-12-05)"
  groups = ("state_dict",)  # a bare state dict is group "", always read; some re-saves nest it
  evidence = "Mixed_7c.branch_pool.conv.weight"

  def detect(self, ckpt) -> bool:
    return self.evidence in converter_lib.parameter_names(ckpt)

  def state_dict(self, ckpt, log):
    for group in ("",) + self.groups:
      if self.evidence in ckpt.state_dicts.get(group, {}):
        return ckpt.state_dicts[group]
    found = ", ".join(repr(g) for g in sorted(ckpt.state_dicts)) or "none"
    raise CheckpointError(f"{ckpt.path}: no FID Inception state dict (no {self.evidence}); "
                          f"state-dict groups found: {found}")

  def write(self, state_dict, out: str, source: str) -> str:
    params = inception.params_from_state_dict(state_dict, what=f"{source}")
    os.makedirs(out, exist_ok=True)
    path = inception.save_params(os.path.join(out, PARAMS_FILE), params)
    with open(os.path.join(out, "arjax_inception.json"), "w") as f:
      json.dump({"source": str(source), "source_sha256": _sha256(source),
                 "params": PARAMS_FILE}, f, indent=2)
    return path
