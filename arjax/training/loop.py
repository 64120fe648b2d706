"""The training loop: data -> sharded step -> logs, sample grids, checkpoints. Resumes automatically.

Resume precedence: a checkpoint in `workdir/checkpoints` (the newest one that
restores; damaged newer ones are moved aside, see arjax/training/checkpoint.py) > a fresh
start from `config.seed`. The state holds the RNG and the checkpoint holds the
grain iterator, so a resumed run continues bit-for-bit, however it was stopped:
a kill -9 anywhere loses at most the steps since the last checkpoint, and SIGTERM
(a preemption notice) checkpoints the step reached and returns.
"""
import math
import os
import time

import jax
import numpy as np
import tqdm

from arjax.training import checkpoint
from arjax.evaluation import plots
from arjax.util import progress
from arjax.parallel import sharding
from arjax.training import summary
from arjax.training import state as train_state
from arjax.training.preemption import PreemptionNotice
from arjax.training.workdir import check_free_space, check_workdir
from arjax.data import latents, pipeline
from arjax.training.experiment import Experiment  # noqa: F401  (re-exported: train.Experiment)
from arjax.util.image_grid import save_class_grid
from arjax.families.causal.sampler import Sampler


def train_iterator(config, tokenizer=None, mesh=None):
  """This process's share of the training batches (a checkpointable grain iterator): images, or
  VAE moments from the latent cache `config.data.latents` (checked against `tokenizer`).

  The share is the block of rows of each global batch that this process's devices of `mesh`
  hold (`sharding.process_batch_block`); without a mesh, the whole batch.
  """
  block, blocks = (0, 1) if mesh is None else sharding.process_batch_block(
      mesh, config.train.global_batch_size)
  kwargs = dict(global_batch_size=config.train.global_batch_size, seed=config.data.shuffle_seed,
                process_index=block, process_count=blocks)
  if config.data.latents is not None:
    return latents.make_train_iterator(config, tokenizer, **kwargs)
  return pipeline.make_train_iterator(config.data, **kwargs)


def _write_grid(exp: Experiment, sampler: Sampler, params, step: int, workdir: str) -> str:
  c = exp.config
  labels = np.repeat(np.arange(c.data.num_classes), 10)
  images = sampler(params, labels, jax.random.PRNGKey(c.sample.seed), cfg_scale=c.sample.cfg_scale,
                   cfg_schedule_name=c.sample.cfg_schedule, temperature=c.sample.temperature)
  images = pipeline.denormalize(sharding.to_host(images))
  if jax.process_index() != 0:
    return ""
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  return save_class_grid(os.path.join(workdir, "samples", f"step_{step:07d}.png"), images, labels)


class NonFiniteError(RuntimeError):
  """Training met too many consecutive steps with a non-finite loss or gradient norm."""


def check_finite(streak: int, metrics, done: int, limit: int) -> None:
  """Raises NonFiniteError once `limit` consecutive updates were skipped (see train_step)."""
  if streak < limit:
    return
  bad = [k for k in ("loss", "grad_norm") if not math.isfinite(float(metrics[k]))]
  what = " and ".join(bad) or "the updated parameters or optimizer state"
  raise NonFiniteError(
      f"training stopped at step {done}: {what} non-finite for "
      f"{streak} consecutive steps since step {done - streak + 1} (config.train."
      f"max_nonfinite_steps={limit}); parameters are those of step {done - streak}, and the "
      "last checkpoint holds no non-finite value")


def _say(message: str) -> None:
  """Tells the user (once, from process 0) what happened to their run."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


def train_and_evaluate(config, workdir: str, *, stop_after=None, mesh=None):
  """Trains to config.train.num_steps (or `stop_after` steps, for tests); returns the final state.

  `mesh`: the devices to train on; default the config's mesh over all devices of the job.
  SIGTERM (a preemption notice) saves a checkpoint at the next step boundary and returns
  early, with a message saying where the checkpoint is.
  """
  with PreemptionNotice() as preemption:
    return _train_and_evaluate(config, workdir, stop_after, mesh, preemption)


def _train_and_evaluate(config, workdir: str, stop_after, mesh, preemption: PreemptionNotice):
  exp = Experiment(config, mesh=mesh)
  # Traced once: the checks below and a restore all read the state's shapes and shardings.
  abstract, shardings = exp.abstract_state()
  if checkpoint.committed_steps(checkpoint.checkpoint_dir(workdir)):
    # A config that does not build the checkpoint's arrays fails before the workdir is touched.
    checkpoint.check_fits(workdir, abstract, config)
  c = config
  check_workdir(workdir)
  # Room for two checkpoints: the new one is written before an old one may go (Orbax's files
  # are not the arrays' size; ~1-4x on small states).
  check_free_space(workdir, 2 * train_state.state_nbytes(abstract),
                   what="two checkpoints of the train state")
  is_chief = jax.process_index() == 0
  if is_chief:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(c.to_json_best_effort(indent=2))
  if c.data.latents is None:  # a latent cache stands in for the images
    pipeline.prepare(c.data.name, c.data.data_dir)
  data_iter = train_iterator(c, exp.tokenizer, exp.mesh)
  ckpt = checkpoint.Checkpointer(workdir, keep=c.train.keep_checkpoints,
                                 save_every=c.train.checkpoint_every)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(abstract, data_iter)
    resumed = int(state.step)
  else:
    state, shardings = exp.init_state()
    resumed = None
  _say(summary.training(c, exp.mesh, workdir, num_params=summary.count_parameters(abstract.params),
                        num_examples=summary.num_examples(c), resume_step=resumed,
                        checkpoints=ckpt.directory))
  step_fn = exp.jit_step(shardings)
  start = int(jax.device_get(state.step))
  end = c.train.num_steps if stop_after is None else min(c.train.num_steps, start + stop_after)

  writer = curves = None
  if is_chief:
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    curves = plots.TrainingCurves(workdir, resume_step=start)
  sampler = exp.sampler() if c.train.sample_every else None
  # A terminal gets a bar, a log file a line every 30 s (arjax/util/progress.py); the loss and rates
  # shown are those fetched at log steps below, so reporting adds no device sync.
  bar = progress.bar(c.train.num_steps, initial=start, desc="train", unit="step",
                     enabled=is_chief)
  last_time, last_step = time.perf_counter(), start
  preempted = False
  for step in range(start, end):
    batch = sharding.global_batch(next(data_iter), exp.mesh)
    state, metrics = step_fn(state, batch)
    done = step + 1
    preempted = preemption.reached(done)
    will_save = done % c.train.checkpoint_every == 0 or done == end or preempted
    if done % c.train.log_every == 0 or done == end or will_save:
      metrics = jax.device_get(metrics)  # also waits for the step: honest throughput
      check_finite(int(jax.device_get(state.nonfinite_streak)), metrics, done,
                   c.train.max_nonfinite_steps)
      now = time.perf_counter()
      images_per_s = (done - last_step) * c.train.global_batch_size / max(now - last_time, 1e-9)
      last_time, last_step = now, done
      # The bar's own rate gives steps/s; these two are the figures synced at this step.
      bar.set_postfix({"loss": f"{metrics['loss']:.4f}", "img/s": f"{images_per_s:.0f}"})
      if writer is not None:
        for k, v in metrics.items():
          writer.add_scalar(f"train/{k}", float(v), done)
        writer.add_scalar("train/images_per_second", images_per_s, done)
        curves.add(done, {**metrics, "images_per_second": images_per_s})
        if will_save or curves.due():  # always with a checkpoint and at the end
          curves.draw()
    bar.update(1)
    if sampler is not None and (done % c.train.sample_every == 0 or done == c.train.num_steps):
      path = _write_grid(exp, sampler, state.ema_params, done, workdir)
      if is_chief:
        bar.write(f"step {done}: sample grid {path}")
    ckpt.save(done, state, data_iter, force=(done == end or preempted))
    if preempted:
      break
  bar.close()
  ckpt.wait()
  ckpt.close()
  if preempted:
    _say(f"preempted (SIGTERM): stopped after step {done} of {c.train.num_steps}; checkpoint "
         f"{ckpt.step_dir(done)} is saved; run the same command to resume from it")
  if writer is not None:
    writer.close()
  return state
