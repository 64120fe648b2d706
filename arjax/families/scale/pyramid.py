"""The scale pyramid: a token map as a coarse-to-fine sequence of scales (FlowAR's layout).

A tokenizer gives a square map of side N in raster order, tokens [B, N*N, D] (VAE latents or
pixel patches; the plug-in tokenizer's flat layout). The pyramid of `sides` (s_0 < ... <
s_{K-1} = N; FlowAR: doubling, 1, 2, 4, ..., N) is the map at each side, concatenated:

    pyramid [B, L, D],  L = sum_k s_k^2,  scale k at rows [offset_k, offset_k + s_k^2), raster

Down-sampling is area averaging: output cell i of a side-s axis covers [i N/s, (i+1) N/s) of
the input axis, and each input cell is weighted by its overlap with it (torch's
interpolate(mode='area') for integer ratios, an exact area average for any ratio). So the
finest scale is the map itself and a coarser one is its box average.

Up-sampling (the AR input of scale k is scale k-1 brought to side s_k, as FlowAR) is
`upsample` = 'nearest' (each output cell takes the input cell containing its centre: exact
repetition for integer ratios) or 'bilinear' (half-pixel centres, edges clamped: torch's
interpolate(mode='bilinear', align_corners=False)). Both are separable [s_out, s_in] matrices
built on the host (static shapes, a matmul per axis, and exact: constant maps stay constant).
"""
import dataclasses
from typing import Tuple

import jax.numpy as jnp
import numpy as np

UPSAMPLINGS = ("nearest", "bilinear")


def doubling_sides(side: int) -> Tuple[int, ...]:
  """1, 2, 4, ..., side (FlowAR's scales of a power-of-two map; side itself last)."""
  sides, s = [], 1
  while s < side:
    sides.append(s)
    s *= 2
  return tuple(sides) + (side,)


def area_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in]: row i averages the input cells under output cell i, by overlap."""
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    lo, hi = i * n_in / n_out, (i + 1) * n_in / n_out
    for j in range(int(np.floor(lo)), int(np.ceil(hi))):
      m[i, j] = min(hi, j + 1) - max(lo, j)
  return (m / m.sum(axis=1, keepdims=True)).astype(np.float32)


def upsample_matrix(n_out: int, n_in: int, kind: str) -> np.ndarray:
  """[n_out, n_in] interpolation weights (see the module docstring)."""
  centres = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5  # output centres in input cells
  m = np.zeros((n_out, n_in), np.float64)
  if kind == "nearest":
    m[np.arange(n_out), np.clip(np.floor(centres + 0.5), 0, n_in - 1).astype(int)] = 1.0
  elif kind == "bilinear":
    c = np.clip(centres, 0, n_in - 1)
    lo = np.floor(c).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = c - lo
    np.add.at(m, (np.arange(n_out), lo), 1.0 - w)
    np.add.at(m, (np.arange(n_out), hi), w)
  else:
    raise ValueError(f"upsample={kind!r}: one of {UPSAMPLINGS}")
  return m.astype(np.float32)


def resize(grid, matrix_rows: np.ndarray, matrix_cols: np.ndarray):
  """grid [B, h, w, D] -> [B, h', w', D] by the separable matrices [h', h] and [w', w]."""
  grid = jnp.einsum("oh,bhwd->bowd", jnp.asarray(matrix_rows), grid)
  return jnp.einsum("pw,bowd->bopd", jnp.asarray(matrix_cols), grid)


@dataclasses.dataclass(frozen=True)
class ScalePyramid:
  """The scales of a side-N token map (see the module docstring)."""
  sides: Tuple[int, ...]
  upsample: str = "nearest"

  def __post_init__(self):
    sides = tuple(int(s) for s in self.sides)
    if not sides or any(s <= 0 for s in sides) or any(a >= b for a, b in zip(sides, sides[1:])):
      raise ValueError(f"scales {self.sides}: positive and strictly increasing")
    if self.upsample not in UPSAMPLINGS:
      raise ValueError(f"upsample={self.upsample!r}: one of {UPSAMPLINGS}")
    object.__setattr__(self, "sides", sides)

  @property
  def side(self) -> int:
    return self.sides[-1]

  @property
  def num_scales(self) -> int:
    return len(self.sides)

  @property
  def sizes(self) -> Tuple[int, ...]:
    """Tokens per scale: the block sizes of the block-causal mask."""
    return tuple(s * s for s in self.sides)

  @property
  def length(self) -> int:
    return sum(self.sizes)

  def offset(self, k: int) -> int:
    return sum(self.sizes[:k])

  def scale_ids(self) -> np.ndarray:
    """[L] int: the scale of every pyramid row."""
    return np.repeat(np.arange(self.num_scales), self.sizes)

  def down(self, tokens, k: int):
    """Finest map tokens [B, N*N, D] -> scale k [B, s_k^2, D] (area average)."""
    b, _, d = tokens.shape
    n, s = self.side, self.sides[k]
    grid = tokens.reshape(b, n, n, d)
    if s != n:
      grid = resize(grid, area_matrix(s, n), area_matrix(s, n))
    return grid.reshape(b, s * s, d)

  def up(self, tokens, k: int):
    """Scale k-1 tokens [B, s_{k-1}^2, D] -> side s_k [B, s_k^2, D]: scale k's AR input."""
    b, _, d = tokens.shape
    s_in, s_out = self.sides[k - 1], self.sides[k]
    m = upsample_matrix(s_out, s_in, self.upsample)
    return resize(tokens.reshape(b, s_in, s_in, d), m, m).reshape(b, s_out * s_out, d)

  def build(self, tokens):
    """Finest map tokens [B, N*N, D] -> the pyramid [B, L, D] (every scale, coarse to fine)."""
    if tokens.shape[1] != self.side * self.side:
      raise ValueError(f"{tokens.shape[1]} tokens are not the {self.side} x {self.side} map of "
                       f"scales {self.sides}")
    return jnp.concatenate([self.down(tokens, k) for k in range(self.num_scales)], axis=1)

  def scale(self, pyramid, k: int):
    """Scale k's rows [B, s_k^2, D] of a pyramid [B, L, D]."""
    return pyramid[:, self.offset(k):self.offset(k) + self.sizes[k]]

  def ar_inputs(self, pyramid):
    """The AR inputs of scales 1..K-1, concatenated [B, L - s_0^2, D]: up(scale k-1) each.
    (Scale 0's input is the class, which the backbone supplies.)"""
    if self.num_scales == 1:
      return pyramid[:, :0]
    return jnp.concatenate([self.up(self.scale(pyramid, k - 1), k)
                            for k in range(1, self.num_scales)], axis=1)
