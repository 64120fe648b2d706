"""Golden: the FID Inception-v3 and the FID / IS formulas against torch-fidelity 0.4.0.

Every `inception_*.npz` in $ARJAX_GOLDEN_DIR (default `<repo>/../shared/golden`) is one test
id, named after the file. Its parameters are regenerated from the recipe it stores and go
through the converter's import path; every `out/*` and `act/*` key it holds must be
reproduced from its `in/*` arrays (see `golden_inception` for how, and for the tolerances):
the network's outputs and block activations at every image size, the FID statistics and
distances (torch-fidelity's formula and pytorch-fid's), the Inception Score and its splits.
Sizes, batch names, activations, FID cases and IS settings are all read from the file.
"""
import numpy as np
import pytest

from conftest import golden_cases
from golden_inception import (compare, golden_arrays, metric_outputs,
                              network_outputs)




def _actual(path):
  return {**network_outputs(path), **metric_outputs(golden_arrays(path))}


@pytest.mark.parametrize("path", golden_cases("inception_*.npz"))
def test_golden_inception(path):
  failures = compare(golden_arrays(path), _actual(path))
  assert not failures, f"{path.name}:\n" + "\n".join(failures)


# A golden check that cannot fail proves nothing: move one entry of one key of each kind by
# 1e-3 of its largest magnitude (far above every tolerance, far below a real bug's error) and
# add a key nothing computes; the check must name each of them.
_TAMPERED_KINDS = ("out/{b}/pool3", "out/{b}/logits", "act/{b}/input_299", "act/{b}/Mixed_7c",
                   "out/fid/{c}/fid", "out/fid/{c}/sigma1", "out/isc/mean", "out/isc/perm")
_UNKNOWN = "out/an_output_no_check_computes"


@pytest.mark.parametrize("path", golden_cases("inception_*.npz"))
def test_a_tampered_golden_file_fails_naming_every_tampered_key(path):
  arrays = dict(golden_arrays(path))
  batches = sorted(k.split("/")[1] for k in arrays if k.startswith("in/")
                   and k.endswith("/images_uint8"))
  cases = sorted({k.split("/")[2] for k in arrays if k.startswith("in/fid/")})
  tampered = [p.format(b=(batches or ["-"])[0], c=(cases or ["-"])[0]) for p in _TAMPERED_KINDS]
  tampered = [k for k in tampered if k in arrays]  # kinds a file lacks are not tampered with
  for key in tampered:
    value = np.array(arrays[key])
    flat = value.reshape(-1)
    if value.dtype.kind in "iu":
      flat[0], flat[-1] = flat[-1], flat[0]  # a permutation stays a permutation
    else:
      flat[flat.size // 2] += 1e-3 * np.abs(value).max()
    arrays[key] = value
  arrays[_UNKNOWN] = np.zeros(3, np.float32)
  report = "\n".join(compare(arrays, _actual(path)))
  for key in tampered + [_UNKNOWN]:
    assert any(line.startswith(f"{key}:") or line.startswith(f"{key} (")
               for line in report.splitlines()), f"tampering with {key} went unnoticed:\n{report}"
