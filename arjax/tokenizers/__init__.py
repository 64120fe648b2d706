"""Tokenizers: images <-> continuous tokens.

The contract (a VAE tokenizer keeps it too):

    tokenizer.encode(images [B, H, W, C] float in [-1, 1]) -> tokens [B, T, D]
    tokenizer.decode(tokens [B, T, D]) -> images [B, H, W, C] float in [-1, 1]
    tokenizer.num_tokens, tokenizer.token_dim
    tokenizer.value_range  (lo, hi) bounding every valid token entry, or None if unbounded

Both are pure jnp functions, so they run inside the jitted train step and sampler.
"""
from arjax.tokenizers.patchify import Patchify  # noqa: F401


def make_tokenizer(tok_cfg, data_cfg):
  if tok_cfg.name == "patchify":
    return Patchify(patch_size=tok_cfg.patch_size, image_size=data_cfg.image_size,
                    channels=data_cfg.channels, scale=tok_cfg.scale)
  raise ValueError(f"config.tokenizer.name={tok_cfg.name!r} is unknown; known: 'patchify'")
