"""Official xAR checkpoints: a released `xAR-*.pth` (one bare state dict) becomes an arjax
workdir through `python -m arjax convert`'s code path, and every key that does not fit is named.

The "released" file is written here from the golden weights (the exact official state_dict
names, buffers included) in torch.save's zip layout (tests/torch_files.py; no torch needed).
The arjax config is the xAR digits smoke config at the golden geometry: 64 x 64 one-channel
pixels in 4 x 4 patches = a 16 x 16 grid of 16-dim tokens, 1000 classes, xar_tiny's sizes.
"""
import collections
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_files
from conftest import REPO_ROOT

GOLDEN_DIR = pathlib.Path(
    os.environ.get("ARJAX_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))
XAR_GOLDEN = GOLDEN_DIR / "xar_tiny.npz"
needs_golden = pytest.mark.skipif(not XAR_GOLDEN.is_file(),
                                  reason=f"golden xar_tiny.npz absent from {GOLDEN_DIR}")

XAR_SIZES = {"imagenet256_xar_base.py": 172.6, "imagenet256_xar_large.py": 608.4,
             "imagenet256_xar_huge.py": 1186.0}


def golden_state_dict():
  with np.load(XAR_GOLDEN, allow_pickle=False) as d:
    return {k[len("param/"):]: d[k] for k in d.files if k.startswith("param/")}


def tiny_config():
  from arjax.config import schema as configs
  config = configs.load(str(REPO_ROOT / "configs/digits_xar.py:smoke"))
  config.data.image_size, config.tokenizer.patch_size, config.data.num_classes = 64, 4, 1000
  m = config.model
  m.width, m.encoder_depth, m.decoder_depth, m.encoder_heads, m.decoder_heads = 64, 2, 2, 2, 2
  m.entity, m.entity_k = "cell", 8
  return config


def write_released_pth(path, state_dict):
  """As the released xAR-B.pth: torch.save(model.state_dict()), buffers included."""
  tensors = collections.OrderedDict((k, torch_files.tensor(v)) for k, v in state_dict.items())
  return torch_files.save(tensors, path)


@pytest.mark.parametrize("name, millions", XAR_SIZES.items())
def test_imagenet_configs_build_at_the_published_sizes(name, millions):
  """xAR-B 172M, xAR-L 608M, xAR-H 1.1B (Ren et al. 2025), on KL-16 tokens."""
  from arjax import registry
  from arjax.config import schema as configs
  config = configs.load(str(REPO_ROOT / "configs" / name))
  registry.validate(config)
  tok = registry.make_tokenizer(config.tokenizer, config.data, abstract=True)
  assert (tok.num_tokens, tok.token_dim) == (256, 16)
  model, _, _ = registry.build_model(config, tok)
  params = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 256, 16)), jnp.zeros((1,), jnp.int32)))["params"]
  count = sum(leaf.size for leaf in jax.tree.leaves(params))
  assert abs(count / 1e6 - millions) < 0.001 * millions, count


@needs_golden
def test_a_released_file_converts_and_reproduces_the_official_velocity(tmp_path):
  from arjax.commands import sample as generate
  from arjax.config import schema as configs
  from arjax.convert import official
  from arjax.families.xar.model import XarModel
  from arjax.training.experiment import Experiment

  source = write_released_pth(tmp_path / "xAR-T.pth", golden_state_dict())
  lines = []
  result = official.convert(str(source), str(tmp_path / "out"), config=tiny_config(),
                            log=lines.append)
  assert result["kind"] == "xar"  # detected: not taken for MAR, whose z_proj it shares
  assert any("one bare state dict" in line for line in lines)
  exp = Experiment(configs.load(str(tmp_path / "out" / "config.py")))
  params, _ = generate.restore_params(exp, str(tmp_path / "out"), use_ema=True)
  with np.load(XAR_GOLDEN, allow_pickle=False) as d:
    x, labels = d["out/train/model_input"], d["out/train/labels_used"]
    t, golden = d["out/train/t"].reshape(4, -1).T, d["out/train/velocity"]
  v, _ = exp.model.apply({"params": jax.device_get(params)}, x, labels, t,
                         method=XarModel.velocity)
  assert np.abs(np.asarray(v) - golden).max() <= 1e-4 * np.abs(golden).max()


@needs_golden
def test_every_missing_unexpected_misshaped_and_misvalued_key_is_named(tmp_path):
  from arjax.convert import official

  sd = golden_state_dict()
  del sd["decoder_norm.weight"]
  del sd["encoder_blocks.1.attn.rope.freqs"]
  sd["encoder_blocks.0.attn.extra.weight"] = np.zeros((3,), np.float32)
  sd["pred.bias"] = np.zeros((5,), np.float32)
  sd["decoder_blocks.0.attn.rope.freqs_cos"] = sd["decoder_blocks.0.attn.rope.freqs_cos"] + 0.5
  source = write_released_pth(tmp_path / "bad.pth", sd)
  with pytest.raises(ValueError) as e:
    official.convert(str(source), str(tmp_path / "out"), config=tiny_config(), kind="xar",
                     log=lambda s: None)
  message = str(e.value)
  for line in ("missing: decoder_norm.weight", "missing: encoder_blocks.1.attn.rope.freqs",
               "unexpected: encoder_blocks.0.attn.extra.weight",
               "mis-shaped: pred.bias: got (5,), expected (16,)",
               "mis-valued buffer: decoder_blocks.0.attn.rope.freqs_cos"):
    assert line in message, message


@needs_golden
def test_a_config_that_contradicts_the_weights_names_the_fields(tmp_path):
  from arjax.convert import official

  config = tiny_config()
  config.model.width, config.model.decoder_depth = 96, 3
  config.model.entity_k = 4
  source = write_released_pth(tmp_path / "xAR-T.pth", golden_state_dict())
  with pytest.raises(ValueError) as e:
    official.convert(str(source), str(tmp_path / "out"), config=config, log=lambda s: None)
  message = str(e.value)
  assert "config.model.width=96, the checkpoint has 64 (z_proj.weight (64, 16))" in message
  assert "config.model.decoder_depth=3, the checkpoint has 2" in message
  assert "entity_k=4" in message
