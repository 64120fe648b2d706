"""Rotary position embeddings (Su et al. 2021), on one axis or on the two axes of a token grid.

A query or key vector's feature pairs (i, i + d/2) are rotated by the angle position * f_i,
f_i = base^(-2i/d): the dot product of a query at p and a key at q then depends on p - q
alone. 2-D RoPE (as in ViT/DiT variants and next-scale models) gives the first half of the
head's features the row and the second half the column, each rotated 1-D, so a logit depends
on the row offset and the column offset.

Positions are integers given by the caller: [n] (shared by the batch) or [B, n] for 1-D,
[n, 2] or [B, n, 2] (row, column) for 2-D.

Which features form a rotated pair is `pairs`: 'halves' pairs feature i with i + d/2 (GPT-NeoX,
LLaMA), 'interleaved' pairs 2i with 2i + 1 (EVA's and xAR's VisionRotaryEmbeddingFast, whose
`rotate_half` maps (x0, x1, ...) to (-x1, x0, ...)); the frequencies are the same, so the two
differ only by a fixed permutation of the head's features, which official weights fix.
"""
import dataclasses

import jax.numpy as jnp

PAIRINGS = ("halves", "interleaved")


@dataclasses.dataclass(frozen=True)
class Rope:
  """Which RoPE an attention applies: `axes` 1 (sequence) or 2 (grid rows and columns)."""
  axes: int = 1
  base: float = 10000.0
  pairs: str = "halves"  # or 'interleaved' (see the module docstring)

  def __post_init__(self):
    if self.axes not in (1, 2):
      raise ValueError(f"Rope(axes={self.axes}): RoPE is 1-D or 2-D")
    if self.pairs not in PAIRINGS:
      raise ValueError(f"Rope(pairs={self.pairs!r}): one of {PAIRINGS}")

  def apply(self, x, positions):
    """x [B, n, H, Dh] at `positions` -> x rotated (see the module docstring)."""
    if self.axes == 1:
      return rotate(x, positions, self.base, pairs=self.pairs)
    positions = jnp.asarray(positions)
    if positions.shape[-1] != 2:
      raise ValueError(f"2-D RoPE needs (row, column) positions [..., n, 2], got {positions.shape}")
    half = x.shape[-1] // 2
    if half % 2:
      raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {x.shape[-1]}")
    return jnp.concatenate(
        [rotate(x[..., :half], positions[..., 0], self.base, pairs=self.pairs),
         rotate(x[..., half:], positions[..., 1], self.base, pairs=self.pairs)], axis=-1)


def grid_positions(flat_positions, grid_width: int):
  """Raster positions [...] on a grid `grid_width` wide -> (row, column) [..., 2]."""
  flat_positions = jnp.asarray(flat_positions)
  return jnp.stack([flat_positions // grid_width, flat_positions % grid_width], axis=-1)


def rotate(x, positions, base: float = 10000.0, *, pairs: str = "halves"):
  """1-D RoPE of x [B, n, H, d] (d even) at integer positions [n] or [B, n]; float32 math.
  `pairs`: which features rotate together (see the module docstring)."""
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"RoPE needs an even feature dim, got {d}")
  freqs = base ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  angles = jnp.asarray(positions, jnp.float32)[..., None] * freqs  # [(B,) n, d/2]
  if angles.ndim == 2:
    angles = angles[None]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]  # [B, n, 1, d/2]
  x32 = x.astype(jnp.float32)
  if pairs == "interleaved":
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
  x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)
