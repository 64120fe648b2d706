"""`python -m arjax convert`: official MAR / KL-16 checkpoints become arjax checkpoints.

The "official" files are built here from the golden weights (real MAR state_dict names, see
the golden README): a MAR `checkpoint-last.pth` in torch.save's zip layout (tests/torch_files.py,
no torch needed) with `model`, `model_ema` (a perturbed copy), `optimizer`, `scaler`, `epoch`
and `args` (an argparse.Namespace of the golden MAR kwargs), the same as .npz with `model/*`,
`model_ema/*`, `epoch` and `args_json`, and a `kl16.ckpt` look-alike
`{'model': vae state_dict}` as .npz. The arjax config is the DDPM digits
smoke config at 16x16 pixels with 4x4 patches: 16 tokens of dim 16, mar_tiny's geometry; the
model and head sizes come from the checkpoint's args.
"""
import argparse
import collections
import importlib.util
import json
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_files
from conftest import GOLDEN_DIR, REPO_ROOT

MAR_GOLDEN = GOLDEN_DIR / "mar_tiny.npz"
VAE_GOLDEN = GOLDEN_DIR / "vae_tiny.npz"
needs_golden = pytest.mark.skipif(not (MAR_GOLDEN.is_file() and VAE_GOLDEN.is_file()),
                                  reason=f"golden mar_tiny/vae_tiny absent from {GOLDEN_DIR}")

BASE_CONFIG = "configs/digits_mar.py:ddpm_smoke"
GEOMETRY = ("--config.data.image_size=16", "--config.tokenizer.patch_size=4")
EPOCH = 7

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def arjax(*args, check=True):
  # One device: the commands behave the same on any mesh (restore re-shards onto the reader's,
  # see arjax/training/checkpoint.py), and an 8-device Orbax save alone compiles for ~10 s more.
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run([sys.executable, "-m", "arjax", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  if check and result.returncode != 0:
    raise AssertionError(f"arjax {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
  return result


def golden_state_dict(path):
  with np.load(path, allow_pickle=False) as d:
    return {k[len("param/"):]: d[k] for k in d.files if k.startswith("param/")}


def golden_mar_kwargs():
  with np.load(MAR_GOLDEN, allow_pickle=False) as d:
    return json.loads(str(d["config_json"]))["MAR_kwargs"]


def perturbed(state_dict):
  rng = np.random.default_rng(0)
  return {k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype) for k, v in state_dict.items()}


def write_official_mar(path, model=None, ema=None, args=None, epoch=EPOCH):
  """A checkpoint-last.pth as .npz, in arjax's flat convention (`<group>/<name>`)."""
  arrays = {}
  for group, sd in (("model", model), ("model_ema", ema)):
    arrays.update({f"{group}/{k}": v for k, v in (sd or {}).items()})
  if args is not None:
    arrays["args_json"] = json.dumps(args)
  if epoch is not None:
    arrays["epoch"] = np.int64(epoch)
  np.savez(path, **arrays)
  return str(path)


def write_official_mar_pth(path, model, ema, args, epoch=EPOCH):
  """checkpoint-last.pth as MAR's main_mar.py saves it (misc.save_model), torch-free."""

  tensors = lambda sd: collections.OrderedDict((k, torch_files.tensor(v)) for k, v in sd.items())
  first = next(iter(model.values()))
  torch_files.save({
      "model": tensors(model), "model_ema": tensors(ema), "epoch": epoch,
      "optimizer": {"state": {0: {"step": torch_files.tensor(np.float32(epoch)),
                                  "exp_avg": torch_files.tensor(np.zeros_like(first))}},
                    "param_groups": [{"lr": 8e-4, "betas": (0.9, 0.95), "params": [0]}]},
      "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
      "args": argparse.Namespace(**args)}, path, archive=pathlib.Path(path).stem)
  return str(path)


def tiny_config(**fields):
  """The base config at mar_tiny's token geometry (and its sizes, when given as fields)."""
  from arjax.config import schema as configs
  config = configs.load(os.path.join(REPO_ROOT, BASE_CONFIG))
  config.data.image_size, config.tokenizer.patch_size = 16, 4
  for field, value in fields.items():
    section, name = field.split("__")
    config[section][name] = value
  return config


TINY_SIZES = dict(model__encoder_width=64, model__encoder_depth=2, model__encoder_heads=4,
                  model__decoder_width=64, model__decoder_depth=2, model__decoder_heads=4,
                  model__buffer_size=4, head__width=96, head__depth=2)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The CLI run once on the official-looking MAR file: (out dir, model sd, ema sd, result)."""
  if not MAR_GOLDEN.is_file():
    pytest.skip(f"golden {MAR_GOLDEN} absent")
  tmp = tmp_path_factory.mktemp("convert")
  model = golden_state_dict(MAR_GOLDEN)
  ema = perturbed(model)
  source = write_official_mar_pth(tmp / "checkpoint-last.pth", model, ema, golden_mar_kwargs())
  out = tmp / "mar_tiny"
  result = arjax("convert", f"--source={source}", f"--out={out}", f"--config={BASE_CONFIG}",
                 *GEOMETRY)
  return out, model, ema, result


@pytest.fixture(scope="module")
def restored(converted):
  """The converted dir read back as `sample` reads it, on this process's 8-device mesh."""
  from arjax.config import schema as configs
  from arjax.commands import sample as generate
  from arjax.training.experiment import Experiment

  out = converted[0]
  exp = Experiment(configs.load(str(out / "config.py")))
  params, step = generate.restore_params(exp, str(out), use_ema=False)
  ema_params, _ = generate.restore_params(exp, str(out), use_ema=True)
  return exp, params, ema_params, step


# -----------------------------------------------------------------------------
# MAR: the happy path.


@needs_golden
def test_convert_writes_a_workdir_and_says_how_to_sample_from_it(converted):
  out, _, _, result = converted
  assert sorted(os.listdir(out / "checkpoints")) == [str(EPOCH)]  # step = the file's epoch
  assert (out / "config.json").is_file() and (out / "config.py").is_file()
  assert f"sample: python -m arjax sample --config={out}/config.py --workdir={out}" in result.stdout
  # Fields taken from the checkpoint's args are reported, each with its source.
  assert "config.model.encoder_width=64 (args.encoder_embed_dim)" in result.stderr
  assert "config.head.width=96 (args.diffloss_w)" in result.stderr


@needs_golden
def test_restored_params_and_ema_are_exactly_the_converters_mapping(converted, restored):
  from arjax.convert import official
  from arjax.families.masked.convert import MarConverter

  _, model, ema, _ = converted
  exp, params, ema_params, step = restored
  assert step == EPOCH
  for restored, sd in ((params, model), (ema_params, ema)):
    expected = official.fitted_params(MarConverter(), sd, exp)
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(np.asarray(got), want)
  # model_ema is not model: each went to its own place.
  assert not np.array_equal(params["head"]["input_proj"]["kernel"],
                            ema_params["head"]["input_proj"]["kernel"])


@needs_golden
def test_restored_model_reproduces_the_official_decoder_z(restored):
  from arjax.families.masked.model import MaskedARModel

  exp, params, _, _ = restored
  with np.load(MAR_GOLDEN, allow_pickle=False) as d:
    x, mask, labels, golden = d["in/x"], d["in/mask"], d["in/labels"], d["out/decoder_z"]
  num_kept = int((~mask.astype(bool)).sum(axis=1)[0])
  condition = jax.jit(lambda p, x, m, y: exp.model.apply(
      {"params": p}, x, m, y, num_kept, method=MaskedARModel.condition))
  z = condition(params, jnp.asarray(x), jnp.asarray(mask, bool), jnp.asarray(labels, jnp.int32))
  err = np.abs(np.asarray(z) - golden).max() / np.abs(golden).max()
  assert err < 1e-4, err


@needs_golden
def test_official_weights_load_into_scanned_blocks_and_reproduce_the_decoder_z(converted):
  """With model.scan_layers the converter stacks MAR's per-block weights on the 'layers' axis;
  the scanned encoder/decoder then give the official decoder z as the unrolled ones do."""
  from arjax.config import schema as configs
  from arjax.convert import official
  from arjax.families.masked.convert import MarConverter
  from arjax.training.experiment import Experiment
  from arjax.families.masked.model import MaskedARModel

  config = configs.load(str(converted[0] / "config.py"))
  config.model.scan_layers = True
  config.model.remat = "full"
  exp = Experiment(config)
  params = official.fitted_params(MarConverter(), golden_state_dict(MAR_GOLDEN), exp)
  qkv = params["backbone"]["encoder_blocks"]["attn"]["query"]["kernel"]
  assert qkv.shape[0] == config.model.encoder_depth
  with np.load(MAR_GOLDEN, allow_pickle=False) as d:
    x, mask, labels, golden = d["in/x"], d["in/mask"], d["in/labels"], d["out/decoder_z"]
  num_kept = int((~mask.astype(bool)).sum(axis=1)[0])
  z = exp.model.apply({"params": params}, jnp.asarray(x), jnp.asarray(mask, bool),
                      jnp.asarray(labels, jnp.int32), num_kept, method=MaskedARModel.condition)
  err = np.abs(np.asarray(z) - golden).max() / np.abs(golden).max()
  assert err < 1e-4, err


@needs_golden
def test_sample_command_runs_unchanged_on_the_converted_dir(converted):
  out = converted[0]
  # One encoder padding (kept_buckets=1): one scan to compile instead of four.
  result = arjax("sample", f"--config={out}/config.py", f"--workdir={out}",
                 "--config.sample.kept_buckets=1")
  assert f"from step {EPOCH}" in result.stdout
  with np.load(out / "samples.npz") as f:
    assert f["images"].shape == (20, 16, 16, 1) and f["images"].dtype == np.uint8


# -----------------------------------------------------------------------------
# MAR: what is refused, and how.


@needs_golden
def test_config_whose_dims_differ_fails_naming_the_fields_and_keys(tmp_path):
  from arjax.convert import official

  # No args in the file: the digits smoke sizes (32 wide, 1 block, buffer 2) stand.
  source = write_official_mar(tmp_path / "ckpt.npz", golden_state_dict(MAR_GOLDEN))
  with pytest.raises(ValueError) as e:
    official.convert(source, str(tmp_path / "out"), config=tiny_config(), kind="mar",
                     log=lambda s: None)
  message = str(e.value)
  assert message.startswith("the checkpoint does not fit the config")
  assert "config.model.encoder_width=32, the checkpoint has 64 (z_proj.weight (64, 16))" in message
  assert "config.model.encoder_depth=1, the checkpoint has 2 (encoder_blocks.<i>.* keys)" in message
  assert "config.model.buffer_size=2, the checkpoint has 4 (encoder_pos_embed_learned" in message
  assert "config.head.width=32, the checkpoint has 96 (diffloss.net.input_proj.weight" in message
  assert not (tmp_path / "out").exists()


@needs_golden
def test_token_geometry_mismatch_names_the_tokenizer_fields(tmp_path):
  from arjax.convert import official

  source = write_official_mar(tmp_path / "ckpt.npz", golden_state_dict(MAR_GOLDEN))
  config = tiny_config(**TINY_SIZES)
  config.tokenizer.patch_size = 2  # 64 tokens of dim 4
  with pytest.raises(ValueError, match=r"config.data.image_size, config.tokenizer.patch_size, "
                     r"config.data.channels\) gives 64 tokens of dim 4, the checkpoint 16 of "
                     r"dim 16"):
    official.convert(source, str(tmp_path / "out"), config=config, kind="mar",
                     log=lambda s: None)


@needs_golden
def test_vae_tokenizer_config_without_vae_weights_says_to_convert_them_first(tmp_path):
  from arjax.config import schema as configs
  from arjax.convert import official

  source = write_official_mar(tmp_path / "ckpt.npz", golden_state_dict(MAR_GOLDEN))
  config = configs.load(os.path.join(REPO_ROOT, "configs", "imagenet256_mar_base.py"))
  with pytest.raises(configs.ConfigError, match=r"config.tokenizer.checkpoint is None: convert "
                     r"kl16.ckpt first"):
    official.convert(source, str(tmp_path / "out"), config=config, kind="mar",
                     log=lambda s: None)


@needs_golden
def test_corrupted_key_set_fails_naming_every_key(tmp_path):
  from arjax.convert import official

  model = golden_state_dict(MAR_GOLDEN)
  del model["decoder_norm.weight"]
  model["encoder_blocks.0.attn.extra.weight"] = np.zeros((3,), np.float32)
  model["diffloss.net.cond_embed.bias"] = np.zeros((5,), np.float32)
  model["diffloss.stray"] = np.zeros((1,), np.float32)
  source = write_official_mar(tmp_path / "ckpt.npz", model, model)
  with pytest.raises(ValueError) as e:
    official.convert(source, str(tmp_path / "out"), config=tiny_config(**TINY_SIZES),
                     kind="mar", log=lambda s: None)
  message = str(e.value)
  assert "missing: decoder_norm.weight" in message
  assert "unexpected: encoder_blocks.0.attn.extra.weight" in message
  assert "mis-shaped: diffloss.net.cond_embed.bias: got (5,), expected (96,)" in message
  assert "unexpected: diffloss.stray" in message  # outside both converters' prefixes


def test_one_state_dict_is_used_for_both_and_said_so():
  from arjax.families.masked.convert import MarConverter
  from arjax.weights.state_dict import Checkpoint

  sd = {"z_proj.weight": np.zeros((2, 2))}
  said = []
  params, ema = MarConverter().state_dicts(Checkpoint("ckpt.pth", {"model": sd}), said.append)
  assert params is sd and ema is sd
  assert said == ["WARNING: ckpt.pth has no 'model_ema' state dict: ema_params are a copy of "
                  "'model' (sampling with config.sample.use_ema=True uses the raw weights)"]
  said.clear()
  MarConverter().state_dicts(Checkpoint("ckpt.pth", {"model_ema": sd}), said.append)
  assert "no 'model' state dict" in said[0]


def test_args_set_the_model_from_its_name_and_leave_sampling_alone():
  from arjax.config import schema as configs
  from arjax.families.masked.convert import config_from_mar_args

  base = configs.load(os.path.join(REPO_ROOT, BASE_CONFIG))
  args = {"model": "mar_large", "buffer_size": 64, "class_num": 1000, "diffloss_d": 8,
          "diffloss_w": 1280, "cfg": 1.0, "img_size": 256, "temperature": 0.9}
  config, derived = config_from_mar_args(base, args)
  m = config.model
  assert (m.encoder_width, m.encoder_depth, m.encoder_heads) == (1024, 16, 16)
  assert (m.decoder_width, m.decoder_depth, m.decoder_heads) == (1024, 16, 16)
  assert (m.buffer_size, config.data.num_classes) == (64, 1000)
  assert (config.head.depth, config.head.width) == (8, 1280)
  # Sampling settings and a pixel tokenizer's geometry are the config's own.
  assert config.sample.cfg_scale == base.sample.cfg_scale
  assert config.sample.temperature == base.sample.temperature
  assert config.data.image_size == base.data.image_size
  assert "config.model.encoder_width=1024 (args.model='mar_large')" in derived
  assert base.model.encoder_width != 1024  # the given config is not modified


# -----------------------------------------------------------------------------
# Reading files: the flat convention, and pickles.


def test_flat_npz_convention_groups_metadata_and_unread_groups(tmp_path):
  from arjax.weights.state_dict import load_checkpoint

  path = tmp_path / "c.npz"
  np.savez(path, **{"model/a.weight": np.ones(2), "model_ema/a.weight": np.zeros(2),
                    "optimizer/state.0": np.ones(1), "epoch": np.int64(3),
                    "args_json": json.dumps({"model": "mar_base"})})
  ckpt = load_checkpoint(path, groups=("model", "model_ema"))
  assert sorted(ckpt.state_dicts) == ["model", "model_ema"]
  np.testing.assert_array_equal(ckpt.state_dicts["model"]["a.weight"], np.ones(2))
  assert (ckpt.epoch, ckpt.args, ckpt.ignored) == (3, {"model": "mar_base"}, ("optimizer",))


def test_unknown_suffix_and_missing_file_are_named(tmp_path):
  from arjax.weights.state_dict import CheckpointError, load_checkpoint

  with pytest.raises(CheckpointError, match=r"weights.h5: unknown checkpoint format '.h5'"):
    load_checkpoint(tmp_path / "weights.h5")
  with pytest.raises(FileNotFoundError, match="nope.npz: no such checkpoint file"):
    load_checkpoint(tmp_path / "nope.npz")


def test_a_pth_that_would_run_code_is_refused_in_one_line(tmp_path):
  marker = tmp_path / "marker"
  source = tmp_path / "checkpoint-last.pth"
  # A zip in torch.save's layout whose pickle calls os.system (see tests/test_safe_loading.py).
  payload = torch_files.CallOnLoad(os.system, f"touch {marker}")
  torch_files.save({}, source, data_pickle=pickle.dumps(payload, protocol=2))
  result = arjax("convert", f"--source={source}", f"--out={tmp_path / 'out'}", check=False)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"error: {source}: pickle refused: forbidden global '{os.system.__module__}.system'")
  assert not (tmp_path / "out").exists() and not marker.exists()


class _RunsCode:
  """Pickles to a call of `print`: what the restricted reader exists to refuse."""

  def __reduce__(self):
    return (print, ("unpickling ran code",))


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_pth_from_torch_save_is_read_and_code_is_refused(tmp_path, capfd):
  import argparse
  import torch
  from arjax.weights.state_dict import CheckpointError, load_checkpoint

  weights = {"z_proj.weight": torch.ones(2, 3), "z_proj.bias": torch.zeros(2)}
  official = {"model": weights, "model_ema": {k: v + 1 for k, v in weights.items()},
              "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": []},
              "epoch": 399, "scaler": {"scale": 65536.0},
              "args": argparse.Namespace(model="mar_base", buffer_size=64)}
  torch.save(official, tmp_path / "checkpoint-last.pth")
  ckpt = load_checkpoint(tmp_path / "checkpoint-last.pth", groups=("model", "model_ema"))
  np.testing.assert_array_equal(ckpt.state_dicts["model_ema"]["z_proj.weight"], np.full((2, 3), 2))
  assert ckpt.epoch == 399 and ckpt.args == {"model": "mar_base", "buffer_size": 64}
  assert ckpt.ignored == ("optimizer", "scaler")

  torch.save({"model": weights, "hook": _RunsCode()}, tmp_path / "evil.pth")
  with pytest.raises(CheckpointError, match=r"evil.pth: pickle refused: forbidden global "
                     r"'builtins.print'"):
    load_checkpoint(tmp_path / "evil.pth")
  assert "unpickling ran code" not in capfd.readouterr().out


# -----------------------------------------------------------------------------
# VAE.


def write_official_vae(path, suffix=".npz"):
  """kl16.ckpt's layout, {'model': state_dict}, with the tiny golden VAE's weights."""
  sd = golden_state_dict(VAE_GOLDEN)
  arrays = {f"model/{k}": v for k, v in sd.items()}
  if suffix == ".safetensors":
    from safetensors.numpy import save_file
    save_file(arrays, str(path))
  else:
    np.savez(path, **arrays)
  return sd


@needs_golden
def test_vae_round_trip_through_orbax(tmp_path):
  import orbax.checkpoint as ocp
  from arjax.convert import official
  from arjax.tokenizers import kl_vae_weights as convert_vae
  from arjax.tokenizers import kl_vae

  sd = write_official_vae(tmp_path / "kl16.npz")
  result = official.convert(tmp_path / "kl16.npz", str(tmp_path / "kl16"), log=lambda s: None)
  assert result["kind"] == "vae"  # detected from the names
  with ocp.StandardCheckpointer() as reader:
    restored = reader.restore(str(tmp_path / "kl16"))
  cfg = result["architecture"]
  expected = convert_vae.vae_params_from_state_dict(sd, cfg)
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  recorded = json.loads((tmp_path / "kl16" / "arjax_vae.json").read_text())
  assert recorded["architecture"]["ch_mult"] == [1, 1, 1, 1, 2]

  # The inferred architecture is the golden one: the restored weights give its posterior mean.
  with np.load(VAE_GOLDEN, allow_pickle=False) as d:
    img, golden_mean = d["in/img"].transpose(0, 2, 3, 1), d["out/posterior_mean"]
  encode = jax.jit(lambda p, x: kl_vae.AutoencoderKL(cfg).apply(
      {"params": p}, x, method=kl_vae.AutoencoderKL.encode)[0])
  mean = encode(restored, img)
  golden_mean = golden_mean.transpose(0, 2, 3, 1)
  assert np.abs(np.asarray(mean) - golden_mean).max() / np.abs(golden_mean).max() < 1e-4


def test_default_vae_architecture_is_inferred_as_mar_kl16():
  from arjax.tokenizers import kl_vae_weights as convert_vae
  from arjax.tokenizers import kl_vae
  from arjax.tokenizers.kl_vae_convert import vae_config_from_state_dict

  shapes = convert_vae._expected(kl_vae.KLVAEConfig())
  sd = {name: np.zeros(shape, np.float32) for name, (_, shape, _) in shapes.items()}
  assert vae_config_from_state_dict(sd) == kl_vae.KLVAEConfig()


@needs_golden
def test_vae_from_safetensors(tmp_path):
  pytest.importorskip("safetensors")
  from arjax.convert import official

  write_official_vae(tmp_path / "kl16.safetensors", suffix=".safetensors")
  result = official.convert(tmp_path / "kl16.safetensors", str(tmp_path / "out"), kind="vae",
                            log=lambda s: None)
  assert result["architecture"].ch == 32 and (tmp_path / "out" / "arjax_vae.json").is_file()


# -----------------------------------------------------------------------------
# The notebook.


def test_notebook_without_a_checkpoint_path_skips_cleanly():
  notebook = json.loads((REPO_ROOT / "notebooks" / "pretrained_mar.ipynb").read_text())
  assert notebook["nbformat"] == 4
  cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
  assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells)
  code = "\n\n".join("".join(c["source"]) for c in cells)
  env = {k: v for k, v in os.environ.items() if k not in ("MAR_CHECKPOINT", "VAE_CHECKPOINT")}
  # Cells run in order in one namespace, as Jupyter would, from the notebook's folder.
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT / "notebooks", env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "Skipping: no MAR checkpoint given" in result.stdout
  assert "Traceback" not in result.stderr
