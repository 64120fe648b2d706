"""Golden: the MAR family against the official PyTorch MAR (every `mar_*.npz` of the folder).

Every `mar_*.npz` in $ARJAX_GOLDEN_DIR (default `<repo>/../shared/golden`) is one test id,
named after the file. Its `param/*` go through the converters a checkpoint import uses, and
every `out/*` array it holds must be reproduced from its `in/*` arrays:
  * backbone (`golden_mar_backbone`): class embedding, encoder and decoder with their
    intermediates, the CFG batch (conditional and null class), the decoder z of every
    replayed sampling iteration;
  * head (`golden_mar_head`): net output and intermediates, forward_with_cfg, both diffusion
    schedules, p_mean_variance at every step (plain and CFG), q_sample and the training loss
    terms, MAR.forward_loss, every replayed DiffLoss.sample call;
  * sampler (`golden_mar_sampler`): mask_by_order, the mask-length schedules, each replayed
    iteration's mask bookkeeping and CFG scale, and the whole replayed sampling runs (with
    and without CFG) token for token, under two encoder paddings.
Tolerances by dtype (see `golden_mar`): integers and bools exactly, float64 within 1e-6,
float32 within 1e-4 of max|golden|. All failures of a file are reported together, and an
`out/*` key that no check knows fails the file by name, so a file of the same layout with
other dimensions or more entries is checked in full or not passed.
"""
import fnmatch
import re

import numpy as np
import pytest

from conftest import golden_cases
from golden_mar import GoldenCheck, import_mar
from golden_mar_backbone import check_backbone
from golden_mar_head import check_head
from golden_mar_sampler import check_sampler


def check_golden_file(path) -> GoldenCheck:
  check = GoldenCheck(path)
  imported = import_mar(check)
  check_backbone(check, imported)
  check_head(check, imported)
  check_sampler(check, imported)
  for key in check.unchecked():
    check.failures.append(f"{key}: no check covers this key")
  return check




@pytest.mark.parametrize("path", golden_cases("mar_*.npz"))
def test_golden_mar(path):
  check = check_golden_file(path)
  worst = max(((k, v) for k, v in check.errors.items() if isinstance(v, float)),
              key=lambda kv: kv[1], default=None)
  print(f"{path.name}: {len(check.errors)} comparisons, {len(check.covered)} keys, worst {worst}")
  assert not check.failures, check.report()


# A golden test that cannot fail proves nothing: perturb one key of each kind (the first key
# matching each pattern) and add a key no check knows; the file must fail naming each of them.
_PERTURBED = ("out/decoder_z", "out/cfg_decoder_z", "out/net_output", "out/gen_pmv_pred_xstart",
              "out/train_vb", "out/gen_diffusion/betas", "out/cfg_pmv_mean", "out/mask_by_order",
              "out/schedule/*/mask_len", "out/sample_*/iter*/mask_to_pred",
              "out/sample_cfg/iter*/diffloss_sample", "out/sample_*/tokens_nchw")
_UNKNOWN = "out/an_output_no_check_knows"


def _perturbed(golden):
  """One entry moved: by 1e-2 of max|golden| (floats), by one (counts), flipped (bools)."""
  golden = golden.copy()
  flat = golden.reshape(-1)
  i = flat.size // 2
  if golden.dtype == bool:
    flat[i] = ~flat[i]
  elif golden.dtype.kind in "iu" or np.array_equal(golden, np.round(golden)):
    flat[i] += 1
  else:
    flat[i] += 1e-2 * np.abs(golden).max()
  return golden


@pytest.mark.parametrize("path", golden_cases("mar_*.npz"))
def test_a_tampered_golden_file_fails_naming_every_tampered_key(path, tmp_path):
  arrays = GoldenCheck(path).arrays
  perturbed = sorted({next(iter(fnmatch.filter(sorted(arrays), pattern)), None)
                      for pattern in _PERTURBED} - {None})
  tampered = {k: _perturbed(v) if k in perturbed else v for k, v in arrays.items()}
  tampered[_UNKNOWN] = np.zeros(3, np.float32)
  np.savez(tmp_path / path.name, **tampered)
  # mar_*_cfg files borrow their sibling's batch inputs: keep it beside the copy.
  sibling = path.with_name(path.stem.removesuffix("_cfg") + ".npz")
  if sibling != path and sibling.is_file():
    (tmp_path / sibling.name).symlink_to(sibling)
  report = check_golden_file(tmp_path / path.name).report()
  for key in perturbed + [_UNKNOWN]:
    assert re.search(rf"^{re.escape(key)}[:\[ ]", report, re.M), (
        f"tampering with {key} went unnoticed:\n{report}")
