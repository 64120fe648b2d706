"""Nothing arjax loads runs code from the file: torch zips, bare pickles and .npz files.

PyTorch checkpoints are read by arjax's own restricted unpickler (arjax/weights/torch_zip.py),
torch or not. The files here are written by tests/torch_files.py in torch.save's zip layout;
the malicious ones carry pickles whose `__reduce__` would run a command or `eval` that writes
a marker file, and every test checks the marker is still absent afterwards.
"""
import argparse
import collections
import importlib.util
import os
import pickle
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

import torch_files
from arjax.weights import torch_zip
from arjax.weights.state_dict import CheckpointError, load_checkpoint

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _official_like():
  """A MAR checkpoint-last.pth's shape, with the views state dicts really hold: a transposed
  weight and a bias sharing one storage (at an offset, strided), a bfloat16 and a half
  tensor, an int64 scalar, a bool mask and an empty tensor."""
  shared = torch_files.Storage(np.arange(40, dtype=np.float32) / 7, key="")
  bf16 = np.array([1.5, -2.25, 3e-3], ml_dtypes.bfloat16)
  model = collections.OrderedDict([
      ("proj.weight", torch_files.Tensor(shared, 0, (4, 6), (6, 1))),
      ("proj.weight_t", torch_files.Tensor(shared, 0, (6, 4), (1, 6))),
      ("proj.bias", torch_files.Tensor(shared, 25, (3,), (5,))),
      ("norm.weight", torch_files.tensor(bf16)),
      ("half", torch_files.tensor(np.array([[0.5, 1.0], [2.0, -4.0]], np.float16))),
      ("count", torch_files.tensor(np.array(12345678901, np.int64))),
      ("mask", torch_files.tensor(np.array([True, False, True]))),
      ("empty", torch_files.tensor(np.zeros((0, 3), np.float32))),
  ])
  model._metadata = collections.OrderedDict([("", {"version": 1})])  # as state_dict() sets it
  expected = {
      "proj.weight": np.arange(24, dtype=np.float32).reshape(4, 6) / 7,
      "proj.weight_t": (np.arange(24, dtype=np.float32).reshape(4, 6) / 7).T,
      "proj.bias": np.float32([25, 30, 35]) / 7,
      "norm.weight": bf16.astype(np.float32),
      "half": np.array([[0.5, 1.0], [2.0, -4.0]], np.float16),
      "count": np.array(12345678901, np.int64),
      "mask": np.array([True, False, True]),
      "empty": np.zeros((0, 3), np.float32),
  }
  ema = collections.OrderedDict([("proj.weight", torch_files.tensor(np.ones((4, 6), np.float32)))])
  checkpoint = {
      "model": model, "model_ema": ema,
      "optimizer": {"state": {0: {"step": torch_files.tensor(np.float32(3)),
                                  "exp_avg": torch_files.tensor(np.ones(2, np.float32))}},
                    "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": [0]}]},
      "epoch": 399, "scaler": {"scale": 65536.0, "_growth_tracker": 7},
      "args": argparse.Namespace(model="mar_base", buffer_size=64, device="cuda", blob=b"\x00\xff"),
  }
  return checkpoint, expected


def _assert_same(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_a_torch_zip_checkpoint_reads_back_exactly_without_torch(tmp_path):
  checkpoint, expected = _official_like()
  path = torch_files.save(checkpoint, tmp_path / "checkpoint-last.pth", archive="checkpoint-last")
  ckpt = load_checkpoint(path, groups=("model", "model_ema"))
  _assert_same(ckpt.state_dicts["model"], expected)
  _assert_same(ckpt.state_dicts["model_ema"], {"proj.weight": np.ones((4, 6), np.float32)})
  assert ckpt.epoch == 399
  assert ckpt.args == {"model": "mar_base", "buffer_size": 64, "device": "cuda",
                       "blob": b"\x00\xff"}
  assert ckpt.ignored == ("optimizer", "scaler")
  # A bare state dict (kl16-style files nest it, others do not) is group "".
  bare = torch_files.save(checkpoint["model"], tmp_path / "bare.ckpt")
  _assert_same(load_checkpoint(bare).state_dicts[""], expected)


def test_groups_not_asked_for_are_never_read(tmp_path):
  checkpoint, _ = _official_like()
  # A tensor that fails when read (it reaches past its storage), in a group not asked for.
  checkpoint["model_ema"]["proj.weight"] = torch_files.Tensor(
      torch_files.Storage(np.zeros(4, np.float32), key=""), 0, (8,), (1,))
  path = torch_files.save(checkpoint, tmp_path / "c.pth")
  assert sorted(load_checkpoint(path, groups=("model",)).state_dicts) == ["model"]
  with pytest.raises(CheckpointError, match="reads elements up to 7 of 4"):
    load_checkpoint(path, groups=("model", "model_ema"))


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_a_file_written_by_torch_save_reads_back_exactly(tmp_path):
  import torch

  weights = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
             "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16), "n": torch.tensor(7)}
  weights["w_t"] = weights["w"].t()
  torch.save({"model": weights, "epoch": 3, "args": argparse.Namespace(model="mar_base")},
             tmp_path / "t.pth")
  ckpt = load_checkpoint(tmp_path / "t.pth")
  _assert_same(ckpt.state_dicts["model"], {
      "w": np.arange(12, dtype=np.float32).reshape(3, 4),
      "w_t": np.arange(12, dtype=np.float32).reshape(3, 4).T,
      "b": np.float32([1.5, -2.0]), "n": np.array(7, np.int64)})
  assert (ckpt.epoch, ckpt.args) == (3, {"model": "mar_base"})


# -----------------------------------------------------------------------------
# Malicious files.


def _payloads(marker):
  return {
      f"{os.system.__module__}.system": torch_files.CallOnLoad(os.system, f"touch {marker}"),
      "builtins.eval": torch_files.CallOnLoad(eval, f"open({str(marker)!r}, 'w').write('ran')"),
  }


def test_the_payloads_are_live_when_plainly_unpickled(tmp_path):
  """The files below are real attacks: a plain pickle.load (in a child process) runs them."""
  for name, payload in _payloads(tmp_path / "marker").items():
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(payload, protocol=2))
    subprocess.run([sys.executable, "-c", "import pickle, sys; "
                    "pickle.load(open(sys.argv[1], 'rb'))", str(tmp_path / "evil.pkl")],
                   check=True, timeout=60)
    assert (tmp_path / "marker").exists(), name
    (tmp_path / "marker").unlink()


@pytest.mark.parametrize("global_name", [f"{os.system.__module__}.system", "builtins.eval"])
def test_a_pth_whose_pickle_would_run_code_is_refused_naming_the_global(tmp_path, global_name):
  marker = tmp_path / "marker"
  checkpoint, _ = _official_like()
  # Hidden in a group that is not even asked for: the whole pickle is checked.
  checkpoint["optimizer"]["hook"] = _payloads(marker)[global_name]
  path = torch_files.save(checkpoint, tmp_path / "evil.pth")
  with pytest.raises(CheckpointError, match=rf"evil.pth: pickle refused: forbidden global "
                     rf"'{global_name}'"):
    load_checkpoint(path, groups=("model",))
  assert not marker.exists()


@pytest.mark.parametrize("global_name", [f"{os.system.__module__}.system", "builtins.eval"])
def test_a_bare_pickle_that_would_run_code_is_refused_naming_the_global(tmp_path, global_name):
  marker = tmp_path / "marker"
  path = tmp_path / "evil.ckpt"
  path.write_bytes(pickle.dumps({"model": _payloads(marker)[global_name]}, protocol=2))
  with pytest.raises(CheckpointError, match=rf"evil.ckpt: pickle refused: forbidden global "
                     rf"'{global_name}'"):
    load_checkpoint(path)
  assert not marker.exists()


def test_a_global_is_refused_by_name_before_anything_is_imported(tmp_path):
  data = b"\x80\x02carjax_no_such_module\nrun\nq\x00)R."  # calls arjax_no_such_module.run()
  path = torch_files.save({}, tmp_path / "c.pth", data_pickle=data)
  with pytest.raises(CheckpointError, match="forbidden global 'arjax_no_such_module.run'"):
    load_checkpoint(path)
  assert "arjax_no_such_module" not in sys.modules


def test_a_pickle_cannot_change_anything_that_outlives_its_load(tmp_path):
  """pickle's BUILD opcode sets attributes of the object below it, a global included (a plain
  pickle.loads of the first file below sets argparse.Namespace.poisoned for the whole process).
  On arjax's stand-ins it is refused, or confined to objects made for that one load."""
  class_attribute = b"\x80\x02cargparse\nNamespace\nN}X\x08\x00\x00\x00poisoned\x88s\x86b."
  path = torch_files.save({}, tmp_path / "a.pth", data_pickle=class_attribute)
  with pytest.raises(CheckpointError, match="a.pth: expected a dict at the top level"):
    load_checkpoint(path)
  assert not hasattr(argparse.Namespace, "poisoned")
  storage_type = (b"\x80\x02ctorch\nFloatStorage\nN}X\x04\x00\x00\x00name"
                  b"X\x0d\x00\x00\x00DoubleStorages\x86b.")
  path = torch_files.save({}, tmp_path / "b.pth", data_pickle=storage_type)
  with pytest.raises(CheckpointError, match="sets attributes of a StorageType; refused"):
    load_checkpoint(path)
  good = torch_files.save({"w": torch_files.tensor(np.arange(3, dtype=np.float32))},
                          tmp_path / "c.pth")
  np.testing.assert_array_equal(load_checkpoint(good).state_dicts[""]["w"], np.arange(3.0))


def test_a_tensor_reaching_past_its_storage_is_refused_not_read(tmp_path):
  storage = torch_files.Storage(np.zeros(6, np.float32), key="")
  for offset, shape, strides in ((4, (3,), (1,)), (0, (2, 3), (4, 1)), (-1, (1,), (1,))):
    path = torch_files.save({"w": torch_files.Tensor(storage, offset, shape, strides)},
                            tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"c.pth: not a readable PyTorch checkpoint "
                       r"\(tensor on storage 0"):
      load_checkpoint(path)


def test_a_storage_record_that_does_not_match_its_bytes_is_refused(tmp_path):
  good = torch_files.save({"w": torch_files.tensor(np.zeros(6, np.float32))}, tmp_path / "a.pth")
  with zipfile.ZipFile(good) as src, zipfile.ZipFile(tmp_path / "c.pth", "w") as dst:
    for name in src.namelist():  # the same file with 8 bytes where the storage needs 24
      dst.writestr(name, b"\x00" * 8 if name == "archive/data/0" else src.read(name))
  with pytest.raises(CheckpointError, match=r"storage 0: 6 elements of float32 do not fill "
                     r"its 8 bytes"):
    load_checkpoint(tmp_path / "c.pth")


@pytest.mark.skipif(HAVE_TORCH, reason="torch is installed: legacy files are read by it")
def test_a_legacy_non_zip_torch_file_needs_torch_and_says_so(tmp_path):
  path = tmp_path / "old.pth"
  path.write_bytes(pickle.dumps(torch_zip.LEGACY_MAGIC_NUMBER, protocol=2) + b"\x80\x02}q\x00.")
  with pytest.raises(CheckpointError, match=r"old.pth: legacy \(torch < 1.6, non-zip\) PyTorch "
                     r"checkpoint: .* torch is not installed"):
    load_checkpoint(path)


def test_a_bare_pickle_of_data_is_not_taken_for_a_checkpoint(tmp_path):
  path = tmp_path / "plain.pth"
  path.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=2))
  with pytest.raises(CheckpointError, match="plain.pth: a bare pickle, not a PyTorch checkpoint"):
    load_checkpoint(path)


def test_an_npz_holding_an_object_array_is_refused(tmp_path):
  marker = tmp_path / "marker"
  path = tmp_path / "weights.npz"
  payload = np.empty((1,), object)
  payload[0] = torch_files.CallOnLoad(os.system, f"touch {marker}")
  np.savez(path, **{"model/a.weight": np.ones(2, np.float32), "model/evil": payload})
  with pytest.raises(CheckpointError, match=r"weights.npz: array 'model/evil' holds Python "
                     r"objects \(a pickle\); refused"):
    load_checkpoint(path)
  assert not marker.exists()
