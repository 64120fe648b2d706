"""Pictures of a run (arjax/evaluation/plots.py): training curves, labelled class grids, the eval report.

The command-line flow (sample, eval writing their pictures) is checked end to end in
tests/test_cli.py; here the pictures' content is pinned down on small arrays.
"""
import base64
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from arjax.evaluation import metrics as evaluate
from arjax.commands import sample as generate
from arjax.evaluation import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def open_png(data: bytes) -> Image.Image:
  """The decoded picture; fails unless `data` is a whole, valid PNG."""
  assert data.startswith(PNG_SIGNATURE)
  Image.open(io.BytesIO(data)).verify()  # checks every chunk's CRC; the image is then unusable
  image = Image.open(io.BytesIO(data))
  assert image.format == "PNG"
  image.load()
  return image


def random_images(n, size=8, channels=1, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), np.uint8)


# ----------------------------------------------------------------------------
# Training curves.


def test_training_writes_its_curves_and_their_records_next_to_tensorboard(smoke_run):
  from conftest import SMOKE_RUN_STEPS

  config, workdir, _ = smoke_run
  assert config.train.log_every == 1
  assert os.path.isdir(os.path.join(workdir, "tensorboard"))
  records = plots.read_records(os.path.join(workdir, "train_metrics.jsonl"))
  assert [r["step"] for r in records] == list(range(1, SMOKE_RUN_STEPS + 1))
  assert all(r["loss"] > 0 and r["images_per_second"] > 0 for r in records)
  with open(os.path.join(workdir, "train_curves.png"), "rb") as f:
    curves = open_png(f.read())
  assert curves.size == (900, 360)  # plots.CURVES_SIZE at plots.CURVES_DPI
  assert not [n for n in os.listdir(workdir) if n.endswith(".tmp")]


def test_a_resumed_run_keeps_the_records_up_to_its_checkpoint_only(tmp_path):
  first = plots.TrainingCurves(str(tmp_path), resume_step=0)
  for step in range(1, 6):
    first.add(step, {"loss": 1.0 / step, "images_per_second": 100.0})
  with open(first.jsonl, "a") as f:
    f.write('{"step": 6, "lo')  # killed mid-line
  # The stopped run logged steps 1..5 but checkpointed step 4: steps 5 and 6 come again.
  resumed = plots.TrainingCurves(str(tmp_path), resume_step=4, min_interval_s=3600)
  assert [r["step"] for r in resumed.records] == [1, 2, 3, 4]
  resumed.add(5, {"loss": 0.3, "images_per_second": 90.0})
  assert plots.read_records(first.jsonl) == resumed.records
  assert resumed.records[-1] == {"step": 5, "loss": 0.3, "images_per_second": 90.0}
  # Drawn when the loop says so (a checkpoint, the end), else once min_interval_s have passed.
  assert not resumed.due()
  resumed.draw()
  resumed.min_interval_s = 0
  assert resumed.due()
  with open(resumed.png, "rb") as f:
    assert open_png(f.read()).size == (900, 360)


def test_an_atomic_write_that_fails_leaves_the_previous_file_and_no_temporary(tmp_path):
  path = str(tmp_path / "picture.png")
  plots.write_atomic(path, b"previous")
  with pytest.raises(TypeError):
    plots.write_atomic(path, 12345)  # not bytes: fails while writing the temporary file
  assert open(path, "rb").read() == b"previous"
  assert os.listdir(tmp_path) == ["picture.png"]


# ----------------------------------------------------------------------------
# Labelled class grids.


def test_class_grid_has_one_labelled_row_per_requested_class_with_its_samples_in_order():
  labels = generate.parse_labels("5,3", 20, num_classes=10)  # --config.sample.labels=5,3
  images = random_images(len(labels))
  per_class, upscale, pad = 12, 4, 1  # 10 samples per class: two blank cells per row
  data = plots.class_grid_png(images, labels, per_class=per_class, upscale=upscale, pad=pad)
  grid = np.asarray(open_png(data).convert("RGB"))
  assert Image.open(io.BytesIO(data)).text[plots.ROWS_KEY] == "3,5"  # ascending classes

  cell = (8 + pad) * upscale
  assert grid.shape[0] == 2 * cell + pad * upscale
  label_width = grid.shape[1] - (per_class * cell + pad * upscale)
  assert label_width > 0
  for row, k in enumerate([3, 5]):
    top = pad * upscale + row * cell
    for column in range(per_class):
      left = label_width + pad * upscale + column * cell
      shown = grid[top:top + 8 * upscale, left:left + 8 * upscale]
      if column < 10:
        expected = np.kron(images[labels == k][column, ..., 0], np.ones((upscale, upscale)))
        np.testing.assert_array_equal(shown, np.repeat(expected[..., None], 3, -1))
      else:
        assert (shown == 255).all()
  # Each row's label is drawn in its own band of the strip, and "3" and "5" differ.
  bands = [grid[pad * upscale + row * cell:(row + 1) * cell, :label_width] for row in (0, 1)]
  assert all((band < 128).any() for band in bands)
  assert not np.array_equal(bands[0], bands[1])


def test_class_grid_labels_rows_with_class_names_when_given():
  labels = np.array([0, 1, 0, 1])
  images = random_images(4, channels=3)
  numbered, _ = plots.class_grid(images, labels)
  named, classes = plots.class_grid(images, labels, class_names={0: "airplane", 1: "automobile"})
  assert classes == [0, 1]
  assert named.shape[0] == numbered.shape[0] and named.shape[1] > numbered.shape[1]
  np.testing.assert_array_equal(named[:, -40:], numbered[:, -40:])  # the same images


def test_class_grid_names_a_bad_argument():
  with pytest.raises(ValueError, match="images must be uint8"):
    plots.class_grid(np.zeros((2, 8, 8, 1), np.float32), np.array([0, 1]))
  with pytest.raises(ValueError, match="labels must be integers of shape"):
    plots.class_grid(random_images(2), np.array([0, 1, 2]))


# ----------------------------------------------------------------------------
# Nearest training neighbours.


def test_memorisation_candidates_rank_samples_by_the_memorisation_ratio():
  train = random_images(25, size=4, seed=3)
  samples = np.concatenate([random_images(9, size=4, seed=4), train[[11]]])
  near = plots.memorisation_candidates(samples, train, num_rows=4, k=2)
  flat = train.reshape(len(train), -1).astype(np.float64)

  def brute_ratio(sample):
    d = np.sqrt(((flat - sample.reshape(-1).astype(np.float64)) ** 2).sum(1))
    nearest = int(np.argmin(d))
    r = np.sqrt(((np.delete(flat, nearest, 0) - flat[nearest]) ** 2).sum(1)).min()
    return d[nearest] / r, r

  ratios = [brute_ratio(s)[0] for s in samples]
  np.testing.assert_array_equal(near["rows"], np.argsort(ratios, kind="stable")[:4])
  assert near["rows"][0] == 9  # the copy of a training image comes first, at distance 0
  np.testing.assert_allclose(near["radii"], [brute_ratio(samples[i])[1] for i in near["rows"]])
  assert near["indices"].shape == near["distances"].shape == (4, 2)


# ----------------------------------------------------------------------------
# The eval report.


def fake_metrics():
  metrics = {key: {"frechet_distance": 9.6912 + i, "precision": 0.9321, "recall": 0.8243 - i / 10,
                   "class_consistency": 0.9817, "memorization": 0.8041 - i / 10,
                   "num_images": 1000 - i}
             for i, key in enumerate(evaluate.CANDIDATES)}
  metrics.update(num_reference=225, k=3, classifier_test_accuracy=0.9933, seed=0, num_subsets=10)
  return metrics


def embedded_pngs(page: str) -> list:
  return [open_png(base64.b64decode(b64))
          for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_eval_report_is_one_self_contained_page_with_the_metrics_and_both_panels(tmp_path):
  metrics = fake_metrics()
  train = random_images(40, seed=5)
  samples, labels = random_images(20, seed=6), np.arange(20) % 4
  paths = plots.write_eval_report(str(tmp_path), metrics, samples, labels, train,
                                  num_neighbour_rows=3, k=2)
  page = open(paths["html"]).read()
  for key in evaluate.CANDIDATES:
    for metric in evaluate.METRICS:
      assert f"<td>{metrics[key][metric]:.4f}</td>" in page
    assert f"<td>{metrics[key]['num_images']}</td>" in page
  assert not re.search(r'(src|href)="(?!data:)', page)  # nothing loaded from elsewhere
  grid, neighbours = embedded_pngs(page)
  for image, path in ((grid, paths["grid"]), (neighbours, paths["neighbours"])):
    with open(path, "rb") as f:
      on_disk = open_png(f.read())
    assert on_disk.size == image.size
    np.testing.assert_array_equal(np.asarray(on_disk), np.asarray(image))
  assert grid.text[plots.ROWS_KEY] == "0,1,2,3"
  # 3 rows of (sample + 2 neighbours) at 1.3 x 1.5 inches a cell, 100 dpi.
  assert neighbours.size == (390, 540)
