"""`sample`: restore a trained workdir and write class-conditional samples (npz + PNG grid)."""
import hashlib
import os

import jax
import numpy as np

from arjax.training.checkpoint import restore_params  # noqa: F401  (sample.restore_params)
from arjax.config import schema as configs
from arjax.evaluation import plots
from arjax.parallel import sharding
from arjax.training import summary
from arjax.util import progress as progress_lib
from arjax.data import pipeline
from arjax.util.image_grid import save_class_grid
from arjax.commands import sample_parts


def parse_labels(spec: str, num_images: int, num_classes: int) -> np.ndarray:
  """'' -> an equal share of every class (sorted); '3,5' -> 3,5,3,5,... ; checked against num_classes."""
  if num_images <= 0:
    raise configs.ConfigError(f"config.sample.num_images={num_images}: must be > 0")
  if not spec.strip():
    return np.sort(np.arange(num_images) % num_classes).astype(np.int64)
  try:
    wanted = [int(s) for s in spec.split(",") if s.strip()]
  except ValueError as e:
    raise configs.ConfigError(f"config.sample.labels={spec!r}: expected comma-separated class ids") from e
  bad = [k for k in wanted if not 0 <= k < num_classes]
  if bad or not wanted:
    raise configs.ConfigError(f"config.sample.labels={spec!r}: class ids must lie in "
                              f"[0, {num_classes}) (config.data.num_classes)")
  return np.resize(np.asarray(wanted, np.int64), num_images)



def sample_images(exp, params, labels: np.ndarray, *, progress: bool = True) -> np.ndarray:
  """uint8 [N, H, W, C] for labels [N], in fixed-size batches (the last one padded).

  Image i is drawn from (config.sample.seed, i) whatever config.sample.batch_size is: each
  batch tells the sampler the index of its first image (`first_index`).
  """
  s = exp.config.sample
  sampler = exp.sampler()
  rng = jax.random.PRNGKey(s.seed)
  out = []
  starts = range(0, len(labels), s.batch_size)
  for start in progress_lib.iterate(starts, desc="sample", unit="batch", enabled=progress):
    chunk = labels[start:start + s.batch_size]
    padded = np.resize(chunk, s.batch_size)  # one compiled shape for every batch
    images = sampler(params, padded, rng, first_index=start, cfg_scale=s.cfg_scale,
                     cfg_schedule_name=s.cfg_schedule, temperature=s.temperature)
    out.append(pipeline.denormalize(sharding.to_host(images))[: len(chunk)])
  return np.concatenate(out)


def run(exp, workdir: str, *, progress: bool = True) -> dict:
  """Draws config.sample.num_images images into workdir/samples.npz (+ PNG grids), batch by
  batch through resumable per-process part files (`sample_parts`): a run killed part-way and
  started again draws only the batches not yet written."""
  s, d = exp.config.sample, exp.config.data
  labels = parse_labels(s.labels, s.num_images, d.num_classes)
  params, step = restore_params(exp, workdir, s.use_ema)
  process, lead = jax.process_index(), jax.process_index() == 0
  if lead:
    print(summary.sampling(exp.config, exp.mesh, workdir, step=step, num_images=len(labels)),
          flush=True)
  num_batches = -(-len(labels) // s.batch_size)
  directory = sample_parts.parts_dir(workdir)
  if lead:
    sample_parts.prepare(directory, _manifest(exp.config, step, labels),
                         announce=lambda m: print(m, flush=True))
  sample_parts.sync("sample_parts_ready")
  done = sample_parts.all_processes(sample_parts.written(directory, num_batches, process))
  if lead and done.any():
    print(f"sample: resuming: {int(done.sum())} of {num_batches} batches are written already "
          f"in {directory}", flush=True)
  sampler = exp.sampler()
  rng = jax.random.PRNGKey(s.seed)
  todo = [b for b in range(num_batches) if not done[b]]
  for batch in progress_lib.iterate(todo, desc="sample", unit="batch", enabled=progress and lead):
    start = batch * s.batch_size
    chunk = labels[start:start + s.batch_size]
    padded = np.resize(chunk, s.batch_size)  # one compiled shape for every batch
    images = sampler(params, padded, rng, first_index=start, cfg_scale=s.cfg_scale,
                     cfg_schedule_name=s.cfg_schedule, temperature=s.temperature)
    rows, ids = sample_parts.local_rows(images, len(chunk), start)
    sample_parts.write_part(directory, batch, num_batches, process, pipeline.denormalize(rows),
                            labels[ids], ids)
  if lead:
    print(f"sample: drew {len(todo)} of {num_batches} batches"
          + (f" ({num_batches - len(todo)} written by an earlier run)" if len(todo) < num_batches
             else ""), flush=True)
  sample_parts.sync("sample_parts_written")
  npz, png = os.path.join(workdir, "samples.npz"), os.path.join(workdir, "samples.png")
  labelled = os.path.join(workdir, "samples_labelled.png")
  if lead:
    shape = (d.image_size, d.image_size, d.channels)
    grid_images, grid_labels = sample_parts.merge(directory, npz, num_batches, len(labels), shape)
    png = save_class_grid(png, grid_images, grid_labels)
    plots.write_atomic(labelled, plots.class_grid_png(grid_images, grid_labels))
  sample_parts.sync("samples_merged")
  return {"npz": npz, "png": png, "labelled_png": labelled, "step": step,
          "num_images": len(labels)}


def _manifest(config, step: int, labels: np.ndarray) -> dict:
  """Everything that decides the images of a request: parts of another one are never mixed in."""
  s = config.sample
  return {"checkpoint_step": int(step), "num_images": int(len(labels)),
          "labels_sha": hashlib.sha256(np.ascontiguousarray(labels, np.int64)).hexdigest(),
          "sample": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
          "model": config.model.to_dict(), "head": config.head.to_dict(),
          "tokenizer": config.tokenizer.to_dict(), "processes": jax.process_count(),
          "devices": jax.device_count()}
