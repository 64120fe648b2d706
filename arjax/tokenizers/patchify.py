"""Pixel-patch tokenizer: non-overlapping p x p patches in raster order.

Normalisation: the data pipeline maps uint8 pixels to [-1, 1] (`u / 127.5 - 1`);
tokens are those values times `scale` (so a user can bring the data nearer unit
variance, which the flow head's N(0, 1) noise assumes), and `decode` divides it
back out: decode(encode(x)) == x exactly up to float rounding.
A patch's channels-last pixels are flattened (row, column, channel) into D = p*p*C
(`arjax.layers.patches`, order 'hwc').
"""
import dataclasses

from arjax.errors import ConfigError
from arjax.layers import patches
from arjax.tokenizers import base


@dataclasses.dataclass(frozen=True)
class Patchify:
  patch_size: int
  image_size: int
  channels: int
  scale: float = 1.0

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"config.tokenizer.patch_size={self.patch_size} must divide "
                       f"config.data.image_size={self.image_size}")

  @property
  def value_range(self):
    """Every valid token entry lies in [lo, hi]: pixels in [-1, 1], times `scale`."""
    return (-self.scale, self.scale)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid * self.grid

  @property
  def token_dim(self) -> int:
    return self.patch_size * self.patch_size * self.channels

  def encode(self, images):
    b, h, w, c = images.shape
    if (h, w, c) != (self.image_size, self.image_size, self.channels):
      raise ValueError(f"images of shape {images.shape[1:]} given to a tokenizer for "
                       f"{(self.image_size, self.image_size, self.channels)}")
    return patches.patchify(images, self.patch_size) * self.scale

  def decode(self, tokens):
    return patches.unpatchify(tokens / self.scale, self.patch_size, self.grid, self.grid,
                              self.channels)


class PatchifyKind(base.TokenizerKind):
  """`tokenizer.name='patchify'`: non-overlapping pixel patches, scaled."""
  name = "patchify"
  schema = {
      "tokenizer.patch_size": ((int,), lambda v: v > 0, "> 0"),
      "tokenizer.scale": ((float, int), lambda v: v > 0, "> 0"),
  }

  def check(self, config):
    if config.data.image_size % config.tokenizer.patch_size:
      raise ConfigError(f"config.tokenizer.patch_size={config.tokenizer.patch_size} must divide "
                        f"config.data.image_size={config.data.image_size}")

  def make(self, tok_cfg, data_cfg, *, abstract=False):
    return Patchify(patch_size=tok_cfg.patch_size, image_size=data_cfg.image_size,
                    channels=data_cfg.channels, scale=tok_cfg.scale)
