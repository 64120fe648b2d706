"""PNG grids of samples: one row per class, the same layout everywhere (train, sample, eval)."""
import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, num_rows: int, pad: int = 1, upscale: int = 4) -> np.ndarray:
  """uint8 [N, H, W, C] -> one uint8 image [rows*(H+pad)+pad, cols*(W+pad)+pad, C], row-major."""
  n, h, w, c = images.shape
  cols = -(-n // num_rows)
  grid = np.full((num_rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, q = divmod(i, cols)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = image
  return np.kron(grid, np.ones((upscale, upscale, 1), np.uint8)) if upscale > 1 else grid


def save_class_grid(path: str, images: np.ndarray, labels: np.ndarray, per_class: int = 10) -> str:
  """Saves up to `per_class` images of each label present, one row per class, sorted by class."""
  rows = []
  classes = np.unique(labels)
  for k in classes:
    picked = images[labels == k][:per_class]
    if len(picked) < per_class:  # keep rows aligned
      picked = np.concatenate([picked, np.full((per_class - len(picked),) + images.shape[1:], 255, np.uint8)])
    rows.append(picked)
  grid = make_grid(np.concatenate(rows), num_rows=len(classes))
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  return path
