"""`eval`: score `workdir/samples.npz`; write eval.json and print a table.

config.eval.metrics picks what: 'classifier' (the small-dataset path: a cached CNN's features,
held-out images and per-class baselines; holds the splits in memory) or 'inception' (the
papers' FID / IS / precision / recall on the FID Inception-v3 against config.eval.reference,
streamed: memory independent of the number of samples).
"""
import json
import os

import numpy as np

from arjax.errors import InputFileError
from arjax.evaluation import metrics as evaluate
from arjax.evaluation import npz_files
from arjax.evaluation import plots
from arjax.training import summary
from arjax.data import pipeline


def _samples_path(workdir: str) -> str:
  """workdir/samples.npz, or FileNotFoundError saying which command writes it."""
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
  return path


def load_samples(workdir: str, config=None):
  """(images, labels) of workdir/samples.npz; FileNotFoundError / InputFileError in one line."""
  path = _samples_path(workdir)
  arrays = npz_files.read_arrays(path, "samples", ("images", "labels"))
  images, labels = arrays["images"], arrays["labels"]
  check_samples(path, images.shape, images.dtype, labels, config)
  return images, labels


def check_sample_file(workdir: str, config) -> tuple:
  """(path, number of images) of workdir/samples.npz, checked from the images' .npy header and
  the labels, without reading the images (they are streamed later)."""
  path = _samples_path(workdir)
  shape, dtype = npz_files.array_header(path, "images", "samples")
  labels = npz_files.read_arrays(path, "samples", ("labels",))["labels"]
  check_samples(path, tuple(shape), dtype, labels, config)
  return path, shape[0]


def check_samples(path: str, shape: tuple, dtype, labels, config=None) -> None:
  """InputFileError naming `path` and what is wrong, unless the images (of `shape`, `dtype`)
  are uint8 [N, H, W, C] (of the config's size and channels, when given) and the labels
  integers [N] in [0, num_classes)."""
  shape = tuple(shape)
  if dtype != np.uint8:
    raise InputFileError(f"{path}: 'images' must be uint8 (pixel values 0..255), got {dtype}")
  if len(shape) != 4 or shape[0] == 0:
    raise InputFileError(f"{path}: 'images' must be a non-empty [N, H, W, C] array, got shape "
                         f"{shape}")
  if labels.ndim != 1 or len(labels) != shape[0]:
    raise InputFileError(f"{path}: 'labels' must be [N] with N = {shape[0]} (one per image), "
                         f"got shape {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise InputFileError(f"{path}: 'labels' must be integers, got {labels.dtype}")
  if config is not None:
    d = config.data
    want = (d.image_size, d.image_size, d.channels)
    if shape[1:] != want:
      raise InputFileError(f"{path}: images are {shape[1:]}, the config's data "
                           f"{want} (config.data.image_size, config.data.channels)")
    bad = labels[(labels < 0) | (labels >= d.num_classes)]
    if bad.size:
      raise InputFileError(f"{path}: label {int(bad[0])} is out of range [0, "
                           f"{d.num_classes}) (config.data.num_classes); {bad.size} such labels")
  elif labels.min() < 0:
    raise InputFileError(f"{path}: label {int(labels.min())} is negative")


def run(config, workdir: str) -> str:
  if config.eval.metrics == "inception":
    return run_inception(config, workdir)
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


def run_inception(config, workdir: str) -> str:
  """The papers' metrics of workdir/samples.npz (config.eval.metrics = 'inception')."""
  import jax

  from arjax.commands import fid_stats
  from arjax.errors import ConfigError
  from arjax.evaluation import inception
  from arjax.evaluation import inception_convert
  from arjax.evaluation import inception_extractor
  from arjax.evaluation import paper_metrics
  from arjax.evaluation import reference_statistics

  e = config.eval
  if e.inception is None:
    raise ConfigError("config.eval.inception is not set: convert the FID Inception weights once "
                      "(python -m arjax convert --kind=inception "
                      "--source=pt_inception-2015-12-05-6726825d.pth --out=DIR) and pass "
                      "--config.eval.inception=DIR")
  path, num_images = check_sample_file(workdir, config)
  reference_path = e.reference or fid_stats.default_out(config, config.data.train_split)
  if not os.path.isfile(reference_path):
    how = ("" if e.reference else
           f" (config.eval.reference is not set, and `python -m arjax fid_stats --config=... "
           f"--inception={e.inception}` has not written this default)")
    raise FileNotFoundError(f"{reference_path}: no such reference statistics file{how}")
  reference = reference_statistics.load(reference_path, dim=inception.POOL3_DIM,
                                        spatial_dim=inception.SPATIAL_DIM)
  params = inception.load_params(inception_convert.params_path(e.inception))
  extractor = inception_extractor.InceptionExtractor(params, batch_size=e.batch_size)
  metrics = paper_metrics.evaluate_samples(path, extractor, reference, num_images=num_images)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(metrics, f, indent=2, default=float)
  return (paper_metrics.format_report(metrics, e.paper_row)
          + f"\nmetrics: {os.path.join(workdir, 'eval.json')}")
