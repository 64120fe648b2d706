"""MAR's kl16.ckpt -> the KL VAE tokenizer: what `python -m arjax convert --kind=vae` uses.

A VAE checkpoint ({'model': AutoencoderKL state_dict}, or LDM's {'state_dict': ...}) becomes
the Orbax params tree that `config.tokenizer.checkpoint` names (written by
arjax/convert/official.py). The architecture is the config's `tokenizer.architecture` when a
kl_vae config is given, else the one the weights' shapes show; every key is matched either
way (arjax/tokenizers/kl_vae_weights.py).
"""
from typing import Mapping

import numpy as np

from arjax.tokenizers import kl_vae
from arjax.tokenizers import kl_vae_weights
from arjax.weights import converter
from arjax.weights.state_dict import CheckpointError, num_indexed


def vae_config_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> kl_vae.KLVAEConfig:
  """The `KLVAEConfig` whose parameter shapes an `AutoencoderKL.state_dict()` shows.

  Attention sits at levels, which KLVAEConfig names by resolution: they are expressed for
  resolution 256 (MAR's), which builds the same network whatever the training resolution.
  """
  def shape(key):
    if key not in state_dict:
      raise ValueError(f"cannot infer the VAE's architecture: missing {key}")
    return tuple(np.shape(state_dict[key]))

  ch, in_channels = shape("encoder.conv_in.weight")[:2]
  levels = num_indexed(state_dict, "encoder.down.")
  if levels is None:
    raise ValueError("cannot infer the VAE's architecture: no encoder.down.<i>.* keys")
  ch_mult = tuple(shape(f"encoder.down.{i}.block.0.conv2.weight")[0] // ch
                  for i in range(levels))
  num_res_blocks = num_indexed(state_dict, "encoder.down.0.block.")
  z_channels = shape("decoder.conv_in.weight")[1]
  embed_dim = shape("post_quant_conv.weight")[1]
  resolution = 256
  attn = lambda part, i: any(k.startswith(f"{part}.{i}.attn.") for k in state_dict)
  return kl_vae.KLVAEConfig(
      ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
      encoder_attn_resolutions=tuple(resolution >> i for i in range(levels)
                                     if attn("encoder.down", i)),
      decoder_attn_resolutions=tuple(resolution >> i for i in range(levels)
                                     if attn("decoder.up", i)),
      resolution=resolution, in_channels=in_channels,
      out_ch=shape("decoder.conv_out.weight")[0], z_channels=z_channels, embed_dim=embed_dim,
      double_z=shape("encoder.conv_out.weight")[0] == 2 * z_channels,
      use_variational=shape("quant_conv.weight")[0] == 2 * embed_dim,
      use_conv_shortcut=any(".conv_shortcut." in k for k in state_dict))


class KLVAEConverter(converter.TokenizerConverter):
  """`--kind=vae`: an AutoencoderKL checkpoint (MAR's kl16.ckpt, LDM's)."""
  name = "vae"
  what = "KL VAE"
  # MAR's kl16.ckpt holds {'model': ...}; LDM-trained autoencoders {'state_dict': ...}.
  groups = ("model", "state_dict")
  evidence = "encoder.conv_in.weight"

  def detect(self, ckpt):
    return bool({self.evidence, "decoder.conv_out.weight"} & converter.parameter_names(ckpt))

  def state_dict(self, ckpt, log):
    """Group 'model' (kl16.ckpt), else 'state_dict', else the bare one."""
    for group in tuple(self.groups) + ("",):
      if ckpt.state_dicts.get(group):
        others = sorted(g for g in ckpt.state_dicts if g != group)
        if others:
          raise CheckpointError(f"{ckpt.path}: state dicts {[group] + others}: which one is the "
                                "VAE is ambiguous")
        sd = ckpt.state_dicts[group]
        dropped = sorted(k for k in sd if k.startswith(kl_vae_weights.LDM_LOSS_PREFIXES))
        if dropped:
          log(f"not imported from {ckpt.path}: {len(dropped)} keys under "
              f"{', '.join(map(repr, kl_vae_weights.LDM_LOSS_PREFIXES))} (LDM's training loss, "
              "not the autoencoder)")
        return sd
    raise CheckpointError(f"{ckpt.path}: no VAE state dict (looked for groups "
                          f"{list(self.groups)} and top-level names)")

  def architecture(self, state_dict, config=None):
    if config is not None and config.get("tokenizer", {}).get("name") == kl_vae.KLVAEKind.name:
      return kl_vae.ARCHITECTURES[config.tokenizer.architecture]
    return vae_config_from_state_dict(state_dict)

  def params(self, state_dict, architecture):
    return kl_vae_weights.vae_params_from_state_dict(
        state_dict, architecture, ignore_prefixes=kl_vae_weights.LDM_LOSS_PREFIXES)
