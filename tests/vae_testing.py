"""Helpers for tests that need a real (tiny) KL VAE: weights, a weights file, a config."""
import jax
import numpy as np

from arjax.config import schema as configs
from arjax.tokenizers import kl_vae_weights as convert_vae
from arjax.tokenizers import kl_vae
from conftest import REPO_ROOT

TINY = kl_vae.ARCHITECTURES["kl16_tiny"]


def tiny_params(seed: int = 0):
  """Random weights for the tiny VAE with PyTorch-default-like scales, drawn by numpy: Flax's
  jitted init of the whole VAE takes ~20 s to compile on a 2-core CPU, this takes none."""
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    name = path[-1].key
    if name == "scale":  # GroupNorm affine, near the identity
      return 1.0 + 0.1 * rng.standard_normal(shape.shape)
    if name == "bias":
      return 0.1 * rng.standard_normal(shape.shape)
    fan_in = int(np.prod(shape.shape[:-1]))  # HWIO kernel
    return rng.uniform(-1, 1, shape.shape) / np.sqrt(fan_in)

  shapes = kl_vae.param_shapes(TINY)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: np.asarray(draw(path, s), np.float32), shapes)


def write_npz(path, params) -> str:
  """`params` as the PyTorch-named state dict `.npz` that config.tokenizer.checkpoint reads."""
  np.savez(path, **convert_vae.state_dict_from_vae_params(params))
  return str(path)


def vae_config(checkpoint=None, **tokenizer):
  """configs/digits.py:smoke on 32x32 RGB digits, tokenized by the tiny KL VAE (2x2 latents,
  4 tokens of dim 16)."""
  config = configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))
  config.data.image_size = 32
  config.data.channels = 3
  config.tokenizer = type(config.tokenizer)()
  config.tokenizer.name = "kl_vae"
  config.tokenizer.checkpoint = checkpoint
  config.tokenizer.architecture = "kl16_tiny"
  config.tokenizer.patch_size = 1
  config.tokenizer.latent_scale = 0.2325
  config.tokenizer.sample_posterior = True
  config.tokenizer.update(tokenizer)
  return config
