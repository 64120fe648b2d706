"""Shared pieces of the MAR golden checks; `tests/test_golden_mar.py` runs them.

No `test_` prefix: pytest does not collect this module (nor `golden_mar_backbone.py`,
`golden_mar_head.py`, `golden_mar_sampler.py`), so each golden comparison runs once, from the
one parametrized test.

* Discovery: every `mar_*.npz` in $ARJAX_GOLDEN_DIR (default `<repo>/../shared/golden`).
* `GoldenCheck`: one file's arrays and every comparison made against them. Failures are
  collected, not raised, so one run reports all of them; every `out/*` key a comparison
  touches is recorded, so a key that no check knows is reported too (`unchecked`).
* `import_mar`: the file's `param/*` through the converters (`arjax.families.masked.weights`,
  `arjax.heads.mar_mlp_weights`), as a `MaskedARModel` parameter tree.

Tolerances, by the golden array's dtype (the README's noise-floor column): integer and bool
arrays exactly; float64 (diffusion tables, mask ratios) within ATOL_FLOAT64 absolute; float32
within RTOL of max|golden|. The relative form is what the untrained head demands: at t = 999
`sqrt_recip_alphas_cumprod` ~ 2e4 amplifies float32 differences of eps, so pred_xstart, mean
and sampled latents (up to ~1e5) carry absolute noise floors of 0.03-0.8, relative <= 8e-6.
"""
import dataclasses
import json
import pathlib
from typing import Any, Optional

import numpy as np

from arjax.families.masked.weights import backbone_from_config, backbone_params_from_state_dict
from arjax.heads.mar_mlp_weights import diffloss_params_from_state_dict, net_from_state_dict
from arjax.heads import MarDiffusion
from arjax.families.masked.model import MaskedARModel
from conftest import GOLDEN_DIR, golden_files

GOLDEN_FILES = golden_files("mar_*.npz")

RTOL = 1e-4
ATOL_FLOAT64 = 1e-6


class GoldenCheck:
  """One golden file: its arrays, the comparisons made against them, and their failures."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    with np.load(self.path, allow_pickle=False) as npz:
      self.arrays = {key: npz[key] for key in npz.files}
    self.config = json.loads(str(self.arrays["config_json"]))
    self.failures = []
    self.errors = {}      # comparison label -> its error measure (what the tolerance bounds)
    self.covered = set()  # golden keys some comparison has judged

  def __contains__(self, key):
    return key in self.arrays

  def __getitem__(self, key):
    return self.arrays[key]

  def keys(self, prefix=""):
    return sorted(k for k in self.arrays if k.startswith(prefix))

  def fail(self, key, message):
    """A comparison that could not be made still counts against `key`, never silently."""
    self.covered.add(key)
    self.failures.append(f"{key}: {message}")

  def compare(self, key, actual, *, rows: Optional[slice] = None, exact=False, per_step=False,
              label=None):
    """`actual` against golden `key` (or its `rows`), with the tolerance of the golden dtype.

    exact: demand equality of a float array too (counts stored as float32, pure gathers).
    per_step: float32 error relative to each leading-axis slice's own max|golden| (stacked
      p_mean_variance steps, whose magnitudes range from 1 to 1e5).
    """
    self.covered.add(key)
    golden = self.arrays[key] if rows is None else self.arrays[key][rows]
    if label is None:
      label = key if rows is None else f"{key}[{rows.start}:{rows.stop}]"
    actual = np.asarray(actual)
    if actual.shape != golden.shape:
      self.failures.append(f"{label}: shape {actual.shape} != golden {golden.shape}")
      return
    if exact or golden.dtype.kind in "biu":
      err = int(np.count_nonzero(actual != golden))  # by value: no cast may round it away
      self.errors[label] = err
      if err:
        self.failures.append(f"{label}: {err} of {golden.size} entries differ (exact)")
      return
    diff = np.abs(actual.astype(np.float64) - golden.astype(np.float64))
    if golden.dtype == np.float64:
      err, tol, what = diff.max(initial=0.0), ATOL_FLOAT64, "max|diff|"
    else:
      axes = tuple(range(1, golden.ndim)) if per_step else None
      scale = np.maximum(np.abs(golden).max(axis=axes, initial=0.0), 1e-30)
      err = (diff.max(axis=axes, initial=0.0) / scale).max(initial=0.0)
      tol, what = RTOL, "max|diff|/max|golden|" + (" per step" if per_step else "")
    self.errors[label] = float(err)
    if not err <= tol:  # NaN fails too.
      self.failures.append(f"{label}: {what} = {err:.3g} > {tol:g}")

  def compare_found(self, prefix, found, *, exclude=(), strip=None, **kwargs):
    """Every key under `prefix` (but not under `exclude`) against `found`, which is keyed
    by the golden key less its leading `strip` (default: `prefix`)."""
    strip = prefix if strip is None else strip
    for key in self.keys(prefix):
      if key.startswith(tuple(exclude)):
        continue
      name = key[len(strip):]
      if name in found:
        self.compare(key, found[name], **kwargs)
      else:
        self.fail(key, "no arjax counterpart known to this check")

  def unchecked(self):
    """The `out/*` keys no comparison has judged."""
    return [k for k in self.keys("out/") if k not in self.covered]

  def report(self):
    return (f"{self.path.name}: {len(self.failures)} failures ({len(self.errors)} comparisons "
            "made):\n" + "\n".join(self.failures))


@dataclasses.dataclass(frozen=True)
class ImportedMar:
  """The golden weights as arjax sees them: modules (hashable, static under jit) + params."""
  model: MaskedARModel
  head: MarDiffusion
  params: Any  # {'backbone': ..., 'head': ...}, MaskedARModel's tree

  @property
  def backbone(self):
    return self.model.backbone

  @property
  def net(self):
    return self.model.head


def import_mar(check: GoldenCheck) -> ImportedMar:
  """`param/*` -> arjax through the same converters a checkpoint import uses."""
  state_dict = {k[len("param/"):]: check[k] for k in check.keys("param/")}
  kw = check.config["MAR_kwargs"]
  net = net_from_state_dict(state_dict)
  model = MaskedARModel(backbone_from_config(check.config), net)
  head = MarDiffusion(token_dim=net.in_channels, batch_mul=kw["diffusion_batch_mul"],
                      num_sampling_steps=str(kw["num_sampling_steps"]))
  params = {"backbone": backbone_params_from_state_dict(state_dict, check.config),
            "head": diffloss_params_from_state_dict(state_dict)}
  return ImportedMar(model, head, params)
