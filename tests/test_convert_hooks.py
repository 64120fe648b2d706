"""A family's converter is a plug-in: `convert` imports the toy family's files without naming it.

tests/toy_family.py gives its family a converter (`BagFamily.converters()` returns its
`BagConverter`); nothing in arjax/convert names it. The registry lists it beside MAR's and the
KL VAE's, `--kind` errors name it, detection picks it for a file of its parameter names, and
`python -m arjax convert` (the plug-in loaded from $ARJAX_PLUGINS) writes a workdir whose
weights `sample` restores exactly.
"""
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from arjax import registry
from arjax.convert import official
from arjax.weights.state_dict import CheckpointError

from test_plugin_family import CONFIG, _toy_config
from conftest import REPO_ROOT

TESTS = pathlib.Path(__file__).resolve().parent


def test_the_registry_lists_the_toy_converter_beside_the_built_in_ones():
  import toy_family  # noqa: F401  (registers the family, and with it its converter)
  assert sorted(registry.converters()) == ["mar", "toy_bag", "vae", "xar"]


def test_kinds_are_refused_naming_the_registered_ones(tmp_path):
  import toy_family  # noqa: F401
  quiet = lambda line: None
  with pytest.raises(ValueError, match=r"--kind='foo': expected one of \['inception', 'mar', "
                                       r"'toy_bag', 'vae', 'xar'\]"):
    official.convert(tmp_path / "any.npz", str(tmp_path / "out"), kind="foo", log=quiet)

  mar = tmp_path / "mar.npz"
  np.savez(mar, **{"model/z_proj.weight": np.zeros((2, 2), np.float32)})
  with pytest.raises(CheckpointError, match=r"a MAR checkpoint, not toy bag \(use --kind=mar\)"):
    official.convert(mar, str(tmp_path / "out"), kind="toy_bag", log=quiet)

  unknown = tmp_path / "unknown.npz"
  np.savez(unknown, **{"w": np.zeros(2, np.float32)})
  with pytest.raises(CheckpointError, match="none of the known kinds of checkpoint") as e:
    official.convert(unknown, str(tmp_path / "out"), log=quiet)
  assert "toy bag (no backbone.positions)" in str(e.value)
  assert "--kind=inception|mar|toy_bag|vae|xar" in str(e.value)
  assert not (tmp_path / "out").exists()


def test_cli_detects_a_toy_file_and_writes_a_workdir_sample_restores(tmp_path):
  from arjax.commands import sample as generate
  from arjax.training.experiment import Experiment

  exp = Experiment(_toy_config())
  rng = np.random.default_rng(0)
  abstract = exp.abstract_state()[0].params
  weights = {".".join(p.key for p in path): rng.normal(size=leaf.shape).astype(leaf.dtype)
             for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  source = tmp_path / "bag.npz"
  np.savez(source, **{f"bag/{name}": value for name, value in weights.items()})
  (tmp_path / "toy.py").write_text(CONFIG)
  out = tmp_path / "imported"

  env = dict(os.environ, ARJAX_PLUGINS="toy_family", PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
  result = subprocess.run(  # no --kind: detected
      [sys.executable, "-m", "arjax", "convert", f"--source={source}", f"--out={out}",
       f"--config={tmp_path / 'toy.py'}"], cwd=REPO_ROOT, env=env, capture_output=True,
      text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert f"toy bag weights (step 0) in {out}/checkpoints" in result.stdout
  assert "has no EMA: ema_params are a copy of params" in result.stderr

  for use_ema in (False, True):
    params, step = generate.restore_params(exp, str(out), use_ema=use_ema)
    assert step == 0
    restored = {".".join(p.key for p in path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert restored.keys() == weights.keys()
    for name, value in weights.items():
      np.testing.assert_array_equal(restored[name], value)
