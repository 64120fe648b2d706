"""`sample`: restore a trained workdir and write class-conditional samples (npz + PNG grid)."""
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


def run(exp, workdir: str) -> dict:
  s, d = exp.config.sample, exp.config.data
  labels = parse_labels(s.labels, s.num_images, d.num_classes)
  params, step = restore_params(exp, workdir, s.use_ema)
  if jax.process_index() == 0:
    print(summary.sampling(exp.config, exp.mesh, workdir, step=step, num_images=len(labels)),
          flush=True)
  images = sample_images(exp, params, labels, progress=jax.process_index() == 0)
  npz, png = os.path.join(workdir, "samples.npz"), os.path.join(workdir, "samples.png")
  labelled = os.path.join(workdir, "samples_labelled.png")
  if jax.process_index() == 0:  # every process holds all images; one writes them
    np.savez(npz, images=images, labels=labels.astype(np.int64))
    png = save_class_grid(png, images, labels)
    plots.write_atomic(labelled, plots.class_grid_png(images, labels))
  return {"npz": npz, "png": png, "labelled_png": labelled, "step": step,
          "num_images": len(images)}
