"""Patchify: an image-like array as a raster sequence of non-overlapping p x p patches.

The one patchify of arjax. Input and output are channels-last: [B, H, W, C] <-> tokens
[B, (H/p)*(W/p), p*p*C], token index = row * (W/p) + column. How a patch's p*p*C values are
flattened is `order`:

    'hwc'   (pixel row, pixel column, channel), channel fastest: the pixel tokenizer
    'chw'   (channel, pixel row, pixel column), channel slowest: MAR's `patchify` of NCHW
            latents (feature c*p*p + i*p + j), which its VAE tokens and weights assume

Both are pure reshapes and transposes: exact, and `unpatchify` is their inverse.
"""
ORDERS = ("hwc", "chw")
# Axes of [B, rows, p, cols, p, C] in token-feature order, per `order`.
_FEATURE_AXES = {"hwc": (2, 4, 5), "chw": (5, 2, 4)}


def _check_order(order: str) -> None:
  if order not in ORDERS:
    raise ValueError(f"patch order {order!r}: one of {ORDERS}")


def patchify(x, patch_size: int, order: str = "hwc"):
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C]."""
  _check_order(order)
  b, h, w, c = x.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"patch size {p} does not divide the {h}x{w} input")
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, *_FEATURE_AXES[order])
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, patch_size: int, rows: int, cols: int, channels: int, order: str = "hwc"):
  """[B, rows*cols, p*p*C] -> [B, rows*p, cols*p, C], the inverse of `patchify`."""
  _check_order(order)
  b, p = tokens.shape[0], patch_size
  feature_shape = {"hwc": (p, p, channels), "chw": (channels, p, p)}[order]
  x = tokens.reshape(b, rows, cols, *feature_shape)
  # Back to [B, rows, p, cols, p, C].
  axes = {"hwc": (0, 1, 3, 2, 4, 5), "chw": (0, 1, 4, 2, 5, 3)}[order]
  return x.transpose(axes).reshape(b, rows * p, cols * p, channels)
