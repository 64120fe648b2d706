"""`python -m arjax convert --kind=inception`: the published FID Inception .pth -> arjax params.

The source is written without torch, byte for byte as `torch.save` writes a state dict
(tests/torch_files.py), with the network's exact names and shapes; it must come out as the
params `inception.params_from_state_dict` gives (the golden test's import path), and a file
that is not this network must fail naming every missing, unexpected and mis-shaped key.
"""
import subprocess
import sys

import numpy as np
import pytest

import torch_files
from arjax.convert import official
from arjax.evaluation import inception
from arjax.evaluation import inception_convert
from arjax.weights.state_dict import CheckpointError
from conftest import REPO_ROOT

quiet = lambda line: None


def _state_dict(with_step_counters=True):
  """Every entry the network needs, small distinct values; BatchNorm's int64 step counters
  as a torch >= 0.4.1 state dict holds them (the published file may lack them)."""
  rng = np.random.default_rng(0)
  sd = {name: rng.uniform(-1, 1, shape).astype(np.float32)
        for name, shape in inception.state_dict_shapes().items()}
  if with_step_counters:
    for name in list(sd):
      if name.endswith(".bn.running_var"):
        sd[name.replace("running_var", "num_batches_tracked")] = np.zeros((), np.int64)
  return sd


def _write_pth(path, sd):
  return torch_files.save({k: torch_files.tensor(v) for k, v in sd.items()}, path)


def _flat(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, prefix + (k,))
    else:
      yield prefix + (k,), v


@pytest.fixture(scope="module")
def state_dict():
  return _state_dict()


def test_the_state_dict_names_map_to_every_flax_parameter_once():
  paths = [inception.flax_path(name) for name in inception.state_dict_shapes()]
  abstract = dict(_flat(inception.abstract_params()))
  assert len(paths) == len(set(paths)) == len(abstract) == 472
  assert set(paths) == set(abstract)
  assert inception.flax_path("Mixed_7c.branch3x3dbl_3b.bn.running_mean") == (
      "Mixed_7c", "branch3x3dbl_3b", "bn", "mean")
  assert inception.flax_path("Mixed_5b.branch1x1.bn.num_batches_tracked") is None
  with pytest.raises(ValueError, match="Mixed_5b.branch1x1.gamma: not a parameter name"):
    inception.flax_path("Mixed_5b.branch1x1.gamma")


@pytest.mark.parametrize("with_step_counters", [True, False], ids=["torch>=0.4.1", "older"])
def test_a_published_style_pth_converts_to_the_params_the_network_uses(tmp_path, state_dict,
                                                                        with_step_counters):
  sd = state_dict if with_step_counters else {
      k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  source = _write_pth(tmp_path / "pt_inception-2015-12-05-6726825d.pth", sd)
  result = official.convert(source, str(tmp_path / "out"), log=quiet)  # detected, no --kind
  assert result["kind"] == "inception"
  assert "params in" in official.summary(result)
  loaded = dict(_flat(inception.load_params(result["params"])))
  expected = dict(_flat(inception.params_from_state_dict(sd)))
  assert set(loaded) == set(expected)
  for path, value in expected.items():
    np.testing.assert_array_equal(loaded[path], value, err_msg="/".join(path))
  # Layouts: conv OIHW -> HWIO, fc (out, in) -> (in, out).
  np.testing.assert_array_equal(loaded[("Conv2d_1a_3x3", "conv", "kernel")],
                                sd["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded[("fc", "kernel")], sd["fc.weight"].T)
  np.testing.assert_array_equal(loaded[("Mixed_6e", "branch_pool", "bn", "var")],
                                sd["Mixed_6e.branch_pool.bn.running_var"])


def test_a_file_of_another_network_fails_naming_every_missing_unexpected_and_misshaped_key(
    tmp_path, state_dict):
  sd = dict(state_dict)
  del sd["Mixed_6b.branch7x7_2.conv.weight"]
  sd["Mixed_6b.branch7x7_9.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)  # torchvision's
  sd["fc.weight"] = np.zeros((1000, 2048), np.float32)                         # 1000 classes
  source = _write_pth(tmp_path / "other.pth", sd)
  with pytest.raises(ValueError) as e:
    official.convert(source, str(tmp_path / "out"), kind="inception", log=quiet)
  message = str(e.value)
  assert "missing: Mixed_6b.branch7x7_2.conv.weight" in message
  assert "unexpected: Mixed_6b.branch7x7_9.conv.weight" in message
  assert "mis-shaped: fc.weight: got (1000, 2048), expected (1008, 2048)" in message
  assert str(source) in message
  assert not (tmp_path / "out" / inception_convert.PARAMS_FILE).exists()


def test_a_mar_checkpoint_given_as_inception_names_the_right_kind(tmp_path):
  mar = tmp_path / "mar.npz"
  np.savez(mar, **{"model/z_proj.weight": np.zeros((2, 2), np.float32)})
  with pytest.raises(CheckpointError, match=r"a MAR checkpoint, not FID Inception-v3 .*"
                                            r"\(use --kind=mar\)"):
    official.convert(mar, str(tmp_path / "out"), kind="inception", log=quiet)


def test_a_params_file_of_the_wrong_shape_is_refused_naming_the_file(tmp_path):
  path = tmp_path / "fid_inception_v3.npz"
  np.savez(path, **{"fc/kernel": np.zeros((2, 2), np.float32)})
  with pytest.raises(ValueError, match=rf"{path}: not the FID Inception params .*missing "):
    inception.load_params(str(path))


@pytest.mark.slow
def test_the_cli_converts_with_kind_inception(tmp_path, state_dict):
  source = _write_pth(tmp_path / "pt_inception.pth", state_dict)
  out = tmp_path / "out"
  result = subprocess.run([sys.executable, "-m", "arjax", "convert", "--kind=inception",
                           f"--source={source}", f"--out={out}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert f"params in {out / inception_convert.PARAMS_FILE}" in result.stdout
  assert (out / "arjax_inception.json").is_file()
