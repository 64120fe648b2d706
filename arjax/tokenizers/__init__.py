"""Tokenizers: images <-> continuous tokens.

The contract (a VAE tokenizer keeps it too):

    tokenizer.encode(images [B, H, W, C] float in [-1, 1]) -> tokens [B, T, D]
    tokenizer.decode(tokens [B, T, D]) -> images [B, H, W, C] float in [-1, 1]
    tokenizer.num_tokens, tokenizer.token_dim
    tokenizer.value_range  (lo, hi) bounding every valid token entry, or None if unbounded

Both are pure jnp functions, so they run inside the jitted train step and sampler.

A stochastic tokenizer (the KL VAE) adds `sample_posterior`; when it is true the train step
calls `encode(images, rng)`. One that can train from a latent cache adds
`encode_moments(moments, rng=None)` and `moments_shape` (see arjax/data/latents.py).
"""
from arjax.tokenizers.patchify import Patchify  # noqa: F401


def make_tokenizer(tok_cfg, data_cfg, *, abstract: bool = False):
  """The tokenizer a config names. `abstract`: a VAE's parameters as shapes only (no weights
  read), enough for token shapes and `jax.eval_shape` model building."""
  if tok_cfg.name == "patchify":
    return Patchify(patch_size=tok_cfg.patch_size, image_size=data_cfg.image_size,
                    channels=data_cfg.channels, scale=tok_cfg.scale)
  if tok_cfg.name == "kl_vae":
    return _kl_vae(tok_cfg, data_cfg, abstract)
  raise ValueError(f"config.tokenizer.name={tok_cfg.name!r} is unknown; known: 'patchify', "
                   "'kl_vae'")


def _kl_vae(tok_cfg, data_cfg, abstract: bool):
  # Imported here: the VAE pulls in Flax, which pixel-patch runs do not need.
  from arjax.config.schema import ConfigError
  from arjax.tokenizers import kl_vae

  if tok_cfg.architecture not in kl_vae.ARCHITECTURES:
    raise ConfigError(f"config.tokenizer.architecture={tok_cfg.architecture!r}: must be one of "
                      f"{sorted(kl_vae.ARCHITECTURES)}")
  vae_cfg = kl_vae.ARCHITECTURES[tok_cfg.architecture]
  if abstract:
    params = kl_vae.param_shapes(vae_cfg)
  else:
    params = load_kl_vae_params(tok_cfg)
  return kl_vae.KLVAETokenizer(params, vae_cfg, image_size=data_cfg.image_size,
                               patch_size=tok_cfg.patch_size,
                               latent_scale=float(tok_cfg.latent_scale),
                               sample_posterior=tok_cfg.sample_posterior)


def load_kl_vae_params(tok_cfg):
  """The weights `config.tokenizer.checkpoint` names, for `config.tokenizer.architecture`.

  Errors name the field and the path: ConfigError when unset or not that architecture's
  weights, FileNotFoundError when nothing is at the path.
  """
  from arjax.config.schema import ConfigError
  from arjax.tokenizers import kl_vae_weights as convert_vae
  from arjax.tokenizers import kl_vae

  path = tok_cfg.checkpoint
  if path is None:
    raise ConfigError(
        "config.tokenizer.checkpoint is None: the KL VAE needs its weights (an .npz or "
        ".safetensors state dict, or a directory written by `python -m arjax convert`)")
  try:
    return convert_vae.load_vae_params(path, kl_vae.ARCHITECTURES[tok_cfg.architecture])
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config.tokenizer.checkpoint={path!r}: {e}") from e
  except ValueError as e:
    raise ConfigError(f"config.tokenizer.checkpoint={path!r} "
                      f"(config.tokenizer.architecture={tok_cfg.architecture!r}): {e}") from e
