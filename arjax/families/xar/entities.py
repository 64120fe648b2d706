"""xAR's prediction units ("entities"): which tokens of the latent grid are generated together.

An entity layout is a permutation of the grid's raster positions into *sequence order*, where
entity s occupies sequence positions [s * size, (s + 1) * size), plus that common size. Every
entity of a layout has the same size, so the sampler's scan over entities has one static shape.

    'cell'       k x k neighbouring tokens (the paper's best); cells in raster order, raster
                 order inside a cell. k = grid / 2 on a square grid is xAR's official layout
                 (4 cells of 8 x 8 on the 16 x 16 latent: `clusterify`).
    'token'      one token per entity, raster order (next-token prediction)
    'subsample'  a non-local group: the tokens (i, j) with i = a mod k, j = b mod k for the
                 entity (a, b), entities in raster order of (a, b), so there are k * k of them
    'image'      the whole grid at once (one entity: flow matching on the image)

Sequence order matters beyond grouping: learned position embeddings are stored in it (an
official checkpoint's `*_pos_embed_learned` rows are sequence positions) and the RoPE angles of
a sequence position are those of its grid cell (`grid_positions`).
"""
import dataclasses
from typing import Tuple

import numpy as np

KINDS = ("cell", "token", "subsample", "image")


@dataclasses.dataclass(frozen=True)
class EntityLayout:
  """The layout of `kind` on a grid_h x grid_w token grid; `k` is the cell side ('cell') or the
  subsampling stride ('subsample'), unused otherwise."""
  kind: str
  grid_h: int
  grid_w: int
  k: int = 1

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"entity kind {self.kind!r}: one of {KINDS}")
    if self.kind in ("cell", "subsample"):
      if self.k <= 0 or self.grid_h % self.k or self.grid_w % self.k:
        raise ValueError(f"entity {self.kind!r} with k={self.k} needs k to divide the "
                         f"{self.grid_h} x {self.grid_w} token grid")

  @property
  def num_tokens(self) -> int:
    return self.grid_h * self.grid_w

  @property
  def size(self) -> int:
    """Tokens per entity."""
    if self.kind == "cell":
      return self.k * self.k
    if self.kind == "subsample":
      return self.num_tokens // (self.k * self.k)
    if self.kind == "token":
      return 1
    return self.num_tokens

  @property
  def num_entities(self) -> int:
    return self.num_tokens // self.size

  def seq_to_raster(self) -> np.ndarray:
    """[L] int: sequence position -> raster index h * grid_w + w."""
    h, w = self.grid_h, self.grid_w
    raster = np.arange(h * w).reshape(h, w)
    if self.kind == "cell":
      k = self.k
      # (cell row, cell col, row in cell, col in cell): cells raster-major, then raster inside.
      return raster.reshape(h // k, k, w // k, k).transpose(0, 2, 1, 3).reshape(-1)
    if self.kind == "subsample":
      k = self.k
      # (a, b) = (h mod k, w mod k) picks the entity; inside it, raster order of (h // k, w // k).
      return raster.reshape(h // k, k, w // k, k).transpose(1, 3, 0, 2).reshape(-1)
    return raster.reshape(-1)

  def raster_to_seq(self) -> np.ndarray:
    """[L] int: the inverse permutation."""
    return np.argsort(self.seq_to_raster())

  def grid_positions(self) -> np.ndarray:
    """[L, 2] int: (row, column) of each sequence position (RoPE's angles)."""
    order = self.seq_to_raster()
    return np.stack([order // self.grid_w, order % self.grid_w], axis=-1).astype(np.int32)

  def block_sizes(self) -> Tuple[int, ...]:
    """The block-causal mask's blocks: one per entity."""
    return (self.size,) * self.num_entities


def official_layout(grid: int = 16) -> EntityLayout:
  """xAR's released layout: 4 cells of (grid/2)^2 tokens (`clusterify`)."""
  return EntityLayout("cell", grid, grid, grid // 2)
