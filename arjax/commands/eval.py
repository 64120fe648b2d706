"""`eval`: score `workdir/samples.npz` against the held-out split; write eval.json and print a table."""
import json
import os

import numpy as np

from arjax.errors import InputFileError
from arjax.evaluation import metrics as evaluate
from arjax.evaluation import npz_files
from arjax.evaluation import plots
from arjax.training import summary
from arjax.data import pipeline


def load_samples(workdir: str, config=None):
  """(images, labels) of workdir/samples.npz; FileNotFoundError / InputFileError in one line."""
  path = os.path.join(workdir, "samples.npz")
  if not os.path.exists(path):
    from arjax.training import checkpoint
    first = ("" if checkpoint.committed_steps(checkpoint.checkpoint_dir(workdir)) else
             f"it holds no checkpoint either, so train first (python -m arjax train "
             f"--config=CONFIG --workdir={workdir}), then ")
    raise FileNotFoundError(
        f"{path} does not exist: eval scores the samples of a workdir; {first}draw them with "
        f"`python -m arjax sample --config=CONFIG --workdir={workdir}` (CONFIG: the same "
        "--config as for eval)")
  return check_samples(path, npz_files.read_arrays(path, "samples", ("images", "labels")), config)


def check_samples(path: str, arrays, config=None):
  """(images, labels) of a samples file, or InputFileError naming `path` and what is wrong:
  uint8 images [N, H, W, C] (of the config's size and channels, when given), integer labels
  [N] in [0, num_classes)."""
  images, labels = arrays["images"], arrays["labels"]
  if images.dtype != np.uint8:
    raise InputFileError(f"{path}: 'images' must be uint8 (pixel values 0..255), got "
                         f"{images.dtype}")
  if images.ndim != 4 or images.shape[0] == 0:
    raise InputFileError(f"{path}: 'images' must be a non-empty [N, H, W, C] array, got shape "
                         f"{images.shape}")
  if labels.ndim != 1 or len(labels) != len(images):
    raise InputFileError(f"{path}: 'labels' must be [N] with N = {len(images)} (one per image), "
                         f"got shape {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise InputFileError(f"{path}: 'labels' must be integers, got {labels.dtype}")
  if config is not None:
    d = config.data
    want = (d.image_size, d.image_size, d.channels)
    if tuple(images.shape[1:]) != want:
      raise InputFileError(f"{path}: images are {tuple(images.shape[1:])}, the config's data "
                           f"{want} (config.data.image_size, config.data.channels)")
    bad = labels[(labels < 0) | (labels >= d.num_classes)]
    if bad.size:
      raise InputFileError(f"{path}: label {int(bad[0])} is out of range [0, "
                           f"{d.num_classes}) (config.data.num_classes); {bad.size} such labels")
  elif labels.min() < 0:
    raise InputFileError(f"{path}: label {int(labels.min())} is negative")
  return images, labels


def run(config, workdir: str) -> str:
  d = config.data
  images, labels = load_samples(workdir, config)
  pipeline.prepare(d.name, d.data_dir)
  train_images, train_labels = pipeline.load_split(d, d.train_split)
  eval_images, eval_labels = pipeline.load_split(d, d.eval_split)
  print(summary.evaluation(config, os.path.join(workdir, "samples.npz"), num_samples=len(images),
                           num_train=len(train_images), num_eval=len(eval_images)), flush=True)
  metrics = evaluate.evaluate(
      images, labels, train_images=train_images, train_labels=train_labels,
      eval_images=eval_images, eval_labels=eval_labels,
      cache_dir=pipeline.default_data_dir(d.data_dir), name=d.name, seed=config.sample.seed,
      progress=True)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(metrics, f, indent=2, default=float)
  report = plots.write_eval_report(workdir, metrics, images, labels, train_images)
  return (evaluate.format_report(metrics)
          + f"\nmetrics: {os.path.join(workdir, 'eval.json')}"
          + f"\nsample grid: {os.path.join(workdir, 'samples.png')}"
          + f"\nreport: {report['html']} (panels {report['grid']}, {report['neighbours']})")
