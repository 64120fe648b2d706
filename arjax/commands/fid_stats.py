"""`fid_stats`: FID reference statistics (pool3 mu, sigma) of a dataset split, computed once.

    python -m arjax fid_stats --config=configs/X.py --inception=weights/inception \\
        [--split=train] [--out=FILE.npz] [--batch=N]

The split's images are decoded as training sees them (config.data: centre crop, resize,
channels), streamed through the FID Inception-v3 that `convert --kind=inception` wrote (a
directory, or its fid_inception_v3.npz), and their running moments written to --out (default
<data_dir>/arjax_fid_stats/<dataset>_<split>_<size>px.npz). Memory does not grow with the
split; every process streams its own block of it and process 0 writes the merged statistics.
A file already computed from the same dataset, split, size and weights is read, not
recomputed. `reference_statistics.load` reads the result, as it reads ADM's files.
"""
import hashlib
import os
from typing import Optional

import jax

from arjax.data import pipeline
from arjax.evaluation import inception
from arjax.evaluation import inception_convert
from arjax.evaluation import inception_extractor
from arjax.evaluation import reference_statistics


def default_out(config, split: str) -> str:
  d = config.data
  name = f"{d.name}_{split}_{d.image_size}px.npz".replace("/", "_")
  return os.path.join(pipeline.default_data_dir(d.data_dir), "arjax_fid_stats", name)


def _file_digest(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()[:16]


def run(config, inception_path: str, *, split: Optional[str] = None, out: Optional[str] = None,
        batch_size: Optional[int] = None, log=print) -> str:
  """Computes (or finds cached) the statistics; returns the line to print."""
  d = config.data
  split = split or d.train_split
  out = out or default_out(config, split)
  pipeline.prepare(d.name, d.data_dir)  # the bundled datasets build on first use
  params_path = inception_convert.params_path(inception_path)
  params = inception.load_params(params_path)
  extractor = inception_extractor.InceptionExtractor(params, batch_size=batch_size)
  source = {"dataset": d.name, "split": split, "image_size": d.image_size,
            "channels": d.channels, "inception_sha256": _file_digest(params_path)}
  batches = lambda: pipeline.split_image_batches(
      d, split, extractor.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())
  stats = reference_statistics.compute_and_cache(
      out, batches, extractor, source=source, log=log,
      merge=inception_extractor.merged_across_processes, write=jax.process_index() == 0)
  return (f"FID reference statistics of {d.name!r} split {split!r} ({stats.count} images, "
          f"{d.image_size}px): {out}")
