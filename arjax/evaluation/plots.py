"""Pictures of a run: training curves, labelled class grids and the eval report.

Pure functions, arrays and metrics in, PNG bytes (or HTML text) out, so a notebook draws
the same pictures as the command line (`IPython.display.Image(data=...)`). `write_atomic`
puts bytes in a file through a temporary file and a rename: a crash leaves the previous
picture or the new one, never half of one. `TrainingCurves` is the training loop's record of
its logged scalars, kept across restarts in `train_metrics.jsonl` and drawn to
`train_curves.png`.

Matplotlib is used only through its object API on an Agg canvas (no pyplot): no display is
needed and no figure or state is shared between calls or threads. Grids of samples are drawn
with PIL, pixel for pixel, so their layout can be checked exactly.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
import uuid
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from arjax.util.image_grid import make_grid

# The PNG text key under which a class grid names its rows' classes (comma-separated).
ROWS_KEY = "arjax:rows"
# Training-curve figure: inches at DPI, i.e. 900 x 360 pixels.
CURVES_SIZE, CURVES_DPI = (9.0, 3.6), 100


# ----------------------------------------------------------------------------
# Files.


def write_atomic(path: str, data: bytes | str) -> str:
  """Writes `data` to `path` via a temporary file in the same directory and a rename."""
  # A name of its own per writer (processes or threads writing the same file each rename a
  # whole file), created with the umask's permissions like any other output.
  directory, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(directory, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
  try:
    with open(tmp, "xb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def figure_png(fig) -> bytes:
  """A matplotlib `Figure` rendered on its own Agg canvas, as PNG bytes."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg

  canvas = FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  canvas.print_png(buffer)
  return buffer.getvalue()


def _new_figure(size: tuple[float, float], dpi: int):
  from matplotlib.figure import Figure  # imported late: the train loop may never draw

  # A fixed layout (set by the callers): constrained layout doubles the drawing time.
  return Figure(figsize=size, dpi=dpi)


# ----------------------------------------------------------------------------
# Training curves.


def training_curves_png(records: Sequence[Mapping[str, float]]) -> bytes:
  """Loss and throughput against step, side by side, from `TrainingCurves` records; and when
  the run probed its samples (the QualityProbe hook), their FD and memorisation too.

  Each record holds `step` and any of `loss`, `images_per_second`, `probe_frechet_distance`,
  `probe_memorization`. The first throughput point includes compiling the step, so it sits
  low; the title gives the median of the others.
  """
  probed = any("probe_frechet_distance" in r for r in records)
  panels = [("loss", "training loss"), ("images_per_second", "throughput (images/s)")]
  if probed:
    panels += [("probe_frechet_distance", "samples: Fréchet distance"),
               ("probe_memorization", "samples: memorisation")]
  size = CURVES_SIZE if not probed else (CURVES_SIZE[0] * 2, CURVES_SIZE[1])
  fig = _new_figure(size, CURVES_DPI)
  axes = fig.subplots(1, len(panels))
  fig.subplots_adjust(left=0.07 if not probed else 0.04, right=0.98, bottom=0.14, top=0.9,
                      wspace=0.2 if not probed else 0.25)
  for ax, (key, title) in zip(axes, panels):
    points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
    if points:
      steps, values = zip(*points)
      ax.plot(steps, values, marker="." if len(points) < 50 else None, linewidth=1.2)
      if key == "images_per_second" and len(values) > 1:
        title += f", median {float(np.median(values[1:])):.0f}"
        ax.set_ylim(bottom=0)
      else:
        title += f", last {values[-1]:.4g}"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  return figure_png(fig)


class TrainingCurves:
  """The scalars a training run logged, kept across restarts, drawn to a PNG.

  Records go to `workdir/train_metrics.jsonl` as they are logged (one JSON object a line).
  A run resumed from the checkpoint of step S drops the records after S, which the stopped
  run logged but the resumed one will log again, so the curve has one point per logged step.
  `draw` rewrites `workdir/train_curves.png` atomically; `due` says whether `min_interval_s`
  have passed since the last drawing (or the start), so a short log interval does not spend
  the loop drawing (one drawing takes ~0.3 s on a CPU core).
  Process 0 of a job alone should make one.
  """

  def __init__(self, workdir: str, resume_step: int, *, min_interval_s: float = 30.0):
    self.jsonl = os.path.join(workdir, "train_metrics.jsonl")
    self.png = os.path.join(workdir, "train_curves.png")
    self.records = [r for r in read_records(self.jsonl) if r["step"] <= resume_step]
    write_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.records))
    self.min_interval_s = min_interval_s
    # The first drawing waits too: short runs (tests) draw at their checkpoints only.
    self._last_drawn = time.monotonic()

  def add(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self.records.append(record)
    with open(self.jsonl, "a") as f:
      f.write(json.dumps(record) + "\n")

  def due(self) -> bool:
    return time.monotonic() - self._last_drawn >= self.min_interval_s

  def draw(self) -> str:
    self._last_drawn = time.monotonic()
    return write_atomic(self.png, training_curves_png(self.records))


def read_records(path: str) -> list[dict]:
  """The records of a `train_metrics.jsonl`; none if it does not exist. A torn last line (a
  crash mid-write) is skipped."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


# ----------------------------------------------------------------------------
# Labelled class grids.


def _font(size: int) -> ImageFont.ImageFont:
  # Pillow's embedded font: the same pixels on every machine, no system font needed.
  return ImageFont.load_default(size=size)


def class_grid(images: np.ndarray, labels: np.ndarray, *, per_class: int = 10,
               class_names: Optional[Mapping[int, str]] = None, upscale: Optional[int] = None,
               pad: int = 1) -> tuple[np.ndarray, list[int]]:
  """One row per class present in `labels` (ascending), its first `per_class` images in order,
  and the class's name at the row's left: (uint8 RGB [rows*(H+pad)+pad, L + cols*(W+pad)+pad, 3]
  all times `upscale`, the row classes).

  Rows with fewer images are padded with white cells. The grid of images is the right-hand
  part of the picture; the label strip (width L) is the left. `class_names[k]` labels class k
  (default: its number). `upscale` defaults to enough to make cells at least 32 pixels.
  """
  images, labels = _check_images_labels(images, labels)
  n, h, w, c = images.shape
  if per_class < 1:
    raise ValueError(f"per_class must be >= 1, got {per_class}")
  upscale = upscale or max(1, -(-32 // max(h, w)))
  classes = [int(k) for k in np.unique(labels)]
  cells = []
  for k in classes:
    picked = images[labels == k][:per_class]
    blank = np.full((per_class - len(picked), h, w, c), 255, np.uint8)
    cells.append(np.concatenate([picked, blank]))
  grid = make_grid(np.concatenate(cells), num_rows=len(classes), pad=pad, upscale=upscale)
  if c == 1:
    grid = np.repeat(grid, 3, axis=-1)
  row_height = (h + pad) * upscale
  font = _font(max(10, min(24, int(row_height * 0.5))))
  texts = [str(class_names[k]) if class_names is not None else str(k) for k in classes]
  margin = max(4, row_height // 6)
  strip_width = max(int(math.ceil(font.getlength(t))) for t in texts) + 2 * margin
  strip = Image.new("RGB", (strip_width, grid.shape[0]), "white")
  draw = ImageDraw.Draw(strip)
  for row, text in enumerate(texts):
    center_y = pad * upscale + row * row_height + (h * upscale) // 2
    draw.text((strip_width - margin, center_y), text, fill="black", font=font, anchor="rm")
  return np.concatenate([np.asarray(strip), grid], axis=1), classes


def class_grid_png(images: np.ndarray, labels: np.ndarray, **kwargs) -> bytes:
  """`class_grid` as PNG bytes; the row classes are also stored as PNG text (`ROWS_KEY`)."""
  grid, classes = class_grid(images, labels, **kwargs)
  info = PngImagePlugin.PngInfo()
  info.add_text(ROWS_KEY, ",".join(map(str, classes)))
  return _png(grid, pnginfo=info)


def _png(array: np.ndarray, **save_kwargs) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG", **save_kwargs)
  return buffer.getvalue()


def _check_images_labels(images, labels) -> tuple[np.ndarray, np.ndarray]:
  images, labels = np.asarray(images), np.asarray(labels)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be uint8 [N, H, W, 1 or 3], got {images.dtype} {images.shape}")
  if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers of shape ({len(images)},), got {labels.dtype} "
                     f"{labels.shape}")
  if len(images) == 0:
    raise ValueError("images must not be empty")
  return images, labels


# ----------------------------------------------------------------------------
# Nearest training neighbours (the memorisation check).


def neighbours_png(samples: np.ndarray, sample_labels: np.ndarray, train_images: np.ndarray,
                   indices: np.ndarray, distances: np.ndarray,
                   train_radii: Optional[np.ndarray] = None) -> bytes:
  """One row per sample: the sample, then its nearest training images with their distances.

  `indices`, `distances`: [N, k] from `evaluate.nearest_neighbours(samples, train_images, k)`.
  `train_radii` [N]: the distance of each row's nearest training image to its own nearest
  training neighbour; with it each row shows d/r, the ratio `evaluate.memorization` counts as
  memorised below 1.
  """
  samples, sample_labels = _check_images_labels(samples, sample_labels)
  num_rows, k = indices.shape
  width, height = 1.3 * (k + 1), 1.5 * num_rows + 0.9
  fig = _new_figure((width, height), 100)
  axes = fig.subplots(num_rows, k + 1, squeeze=False)
  fig.subplots_adjust(left=0.02, right=0.98, bottom=0.1 / height, top=1 - 0.85 / height,
                      hspace=0.45, wspace=0.1)
  cmap = "gray" if samples.shape[-1] == 1 else None

  def show(ax, image, title):
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap=cmap, vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])

  for row in range(num_rows):
    title = f"sample, class {int(sample_labels[row])}"
    if train_radii is not None:
      title += f"\nd/r = {distances[row, 0] / max(train_radii[row], 1e-12):.2f}"
    show(axes[row, 0], samples[row], title)
    for j in range(k):
      show(axes[row, j + 1], train_images[indices[row, j]],
           f"train #{int(indices[row, j])}\nd = {distances[row, j]:.1f}")
  fig.suptitle("nearest training images, pixel-space distance d\n"
               "(d/r < 1: counted as memorised)", fontsize=9)
  return figure_png(fig)


# ----------------------------------------------------------------------------
# The eval report.


def eval_report_html(metrics: Mapping[str, Any], panels: Mapping[str, bytes], *,
                     title: str = "arjax eval", notes: Sequence[str] = ()) -> str:
  """A self-contained HTML page: `evaluate`'s metrics as a table, then each PNG panel
  (heading -> bytes) embedded as a data URI, then `notes` as paragraphs."""
  from arjax.evaluation.metrics import CANDIDATES, METRICS

  head = "".join(f"<th>{html.escape(h)}</th>" for h in CANDIDATES.values())
  rows = []
  for row in METRICS + ("num_images",):
    cells = "".join(f"<td>{_cell(metrics[key][row])}</td>" for key in CANDIDATES)
    rows.append(f"<tr><th>{html.escape(row)}</th>{cells}</tr>")
  summary = (f"FD / precision / recall against {metrics['num_reference']} held-out reference "
             f"images (k={metrics['k']}); classifier test accuracy "
             f"{metrics['classifier_test_accuracy']:.4f}; seed {metrics['seed']}.")
  figures = "".join(
      f"<h2>{html.escape(heading)}</h2>\n<img alt=\"{html.escape(heading)}\" "
      f"src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">\n"
      for heading, png in panels.items())
  paragraphs = "".join(f"<p>{html.escape(n)}</p>\n" for n in notes)
  return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #bbb; padding: 0.3em 0.8em; text-align: right; }}
img {{ image-rendering: pixelated; max-width: 100%; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<table>
<tr><th>metric</th>{head}</tr>
{chr(10).join(rows)}
</table>
<p>{html.escape(summary)}</p>
{figures}{paragraphs}</body></html>
"""


def _cell(value: Any) -> str:
  return f"{value:d}" if isinstance(value, (int, np.integer)) else f"{value:.4f}"


def memorisation_candidates(samples: np.ndarray, train_images: np.ndarray, *, num_rows: int = 8,
                            k: int = 4) -> dict[str, np.ndarray]:
  """The `num_rows` samples likeliest to be copies, by `evaluate.memorization`'s own measure.

  For every sample: its k nearest training images (pixel space) and the ratio d/r of its
  distance to the nearest one over that image's distance to its own nearest training
  neighbour (memorised: below 1). Returns the rows of the smallest ratios, ascending:
  {"rows": sample indices [R], "indices": [R, k], "distances": [R, k], "radii": [R]}.
  """
  from arjax.evaluation.metrics import nearest_neighbours

  indices, distances = nearest_neighbours(samples, train_images, min(k, len(train_images)))
  # A training image is its own first neighbour (distance 0); the second is the radius.
  radii = nearest_neighbours(train_images[indices[:, 0]], train_images, 2)[1][:, 1]
  ratio = distances[:, 0] / np.maximum(radii, 1e-12)
  rows = np.argsort(ratio, kind="stable")[:num_rows]
  return {"rows": rows, "indices": indices[rows], "distances": distances[rows],
          "radii": radii[rows]}


def write_eval_report(workdir: str, metrics: Mapping[str, Any], samples: np.ndarray,
                      labels: np.ndarray, train_images: np.ndarray, *,
                      num_neighbour_rows: int = 8, k: int = 4) -> dict[str, str]:
  """Writes workdir/eval_samples.png (labelled class grid), workdir/eval_neighbours.png
  (`memorisation_candidates` beside their nearest training images) and
  workdir/eval_report.html (the metrics table and both panels, self-contained); returns
  their paths."""
  near = memorisation_candidates(samples, train_images, num_rows=num_neighbour_rows, k=k)
  grid_png = class_grid_png(samples, labels)
  neighbours = neighbours_png(samples[near["rows"]], labels[near["rows"]], train_images,
                              near["indices"], near["distances"], near["radii"])
  model = metrics["model"]
  notes = [
      f"{model['memorization']:.1%} of the {model['num_images']} samples are nearer to their "
      "nearest training image than that image is to its own nearest training neighbour "
      "(d/r < 1; held-out real images: "
      f"{metrics['real_heldout']['memorization']:.1%}). The neighbour panel shows the "
      f"{len(near['rows'])} samples of smallest d/r with their {near['indices'].shape[1]} "
      "nearest training images.",
  ]
  paths = {"grid": write_atomic(os.path.join(workdir, "eval_samples.png"), grid_png),
           "neighbours": write_atomic(os.path.join(workdir, "eval_neighbours.png"), neighbours)}
  panels = {"samples (one row per class)": grid_png,
            "nearest training images of the samples likeliest to be copies": neighbours}
  paths["html"] = write_atomic(
      os.path.join(workdir, "eval_report.html"),
      eval_report_html(metrics, panels, notes=notes, title=f"arjax eval: {workdir}"))
  return paths
