"""The periodic work of the training loop: one hook per concern, each with its own period.

After every step the loop (arjax/training/loop.py) calls, in order, each hook that is `due`:

    Preemption    every step       asks the preemption notice; on SIGTERM asks the loop to stop
    NonFinite     log steps        raises NonFiniteError after too many skipped updates in a row
    Logging       every step       the progress bar; at log steps TensorBoard, train_metrics.jsonl
                                   and train_curves.png
    SampleGrid    sample_every     a class grid of EMA samples in workdir/samples
    QualityProbe  eval_every       FD and memorisation of a few EMA samples, logged with the
                                   curves: when a run starts to memorise
    (extra hooks) their own        whatever a caller adds (`train_and_evaluate(extra_hooks=...)`)
    Checkpoint    checkpoint_every also at the last step and when a stop was asked for

A hook sees the loop through `Loop`: the step just completed, the state, the metrics (fetched to
the host once per step, on demand), and the rules every hook agrees on: `log_due` (a step whose
metrics are fetched and logged) and `checkpoint_due`. One hook may ask the loop to stop
(`Loop.request_stop`); hooks after it in the order see `loop.stopping`, the Checkpoint hook
saves that step, and the loop ends: it runs while `loop.step < loop.end` and no stop was asked
for, and nothing else ends it but an exception. When it ends, the progress bar is closed, then
the hooks, last first (`close`): the Checkpoint hook waits for its last save and says why a
stopped run stopped and where its checkpoint is.

Hooks run on every process of a multi-host job, at the same steps (the preemption sync point
and the sharded sampler require it); what reaches the disk or the terminal comes from process 0.
"""
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import tqdm

from arjax.data import pipeline
from arjax.evaluation import plots
from arjax.parallel import sharding
from arjax.util.image_grid import save_class_grid


def say(message: str) -> None:
  """Tells the user (once, from process 0) what happened to their run."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


class Loop:
  """What the hooks see of the training loop. `step` counts the steps completed so far."""

  def __init__(self, *, config, workdir: str, exp, state, data_iter, checkpointer, start: int,
               end: int):
    self.config, self.workdir, self.exp = config, workdir, exp
    self.state, self.data_iter, self.checkpointer = state, data_iter, checkpointer
    self.start, self.end, self.step = start, end, start
    self.metrics = None  # the last step's metrics, on the device
    self.is_chief = jax.process_index() == 0
    self.bar = None  # the progress report (arjax/util/progress.py), set by the loop
    self.started_at = None  # time.perf_counter() when the loop began, set by the loop
    self.stop_reason: Optional[str] = None
    self._host_metrics = None
    # Figures a hook measured at this step, to TensorBoard and the curves (the Logging hook
    # sets it; without one they go nowhere).
    self.log_scalars: Callable[[dict], None] = lambda scalars: None
    self._sampler = None

  def sampler(self):
    """The experiment's sampler, one for every hook that samples: they share its compiled
    programs (the grid and the quality probe draw the same shapes by default)."""
    if self._sampler is None:
      self._sampler = self.exp.sampler()
    return self._sampler

  def advance(self, state, metrics) -> None:
    """Records one more completed step (called by the loop only)."""
    self.state, self.metrics, self._host_metrics = state, metrics, None
    self.step += 1

  def host_metrics(self) -> dict:
    """This step's metrics as host numbers: fetched once (which waits for the step), then shared."""
    if self._host_metrics is None:
      self._host_metrics = jax.device_get(self.metrics)
    return self._host_metrics

  def request_stop(self, reason: str) -> None:
    """Ends the loop after this step, which is checkpointed; `reason` opens the line that says
    so, e.g. 'preempted (SIGTERM)'. The first request wins."""
    if self.stop_reason is None:
      self.stop_reason = reason

  @property
  def stopping(self) -> bool:
    return self.stop_reason is not None

  @property
  def running(self) -> bool:
    """The loop's one end condition: the last step is not reached and no hook asked to stop."""
    return self.step < self.end and not self.stopping

  @property
  def at_end(self) -> bool:
    return self.step == self.end

  @property
  def checkpoint_due(self) -> bool:
    return self.step % self.config.train.checkpoint_every == 0 or self.at_end or self.stopping

  @property
  def log_due(self) -> bool:
    """Metrics are fetched, checked and logged at these steps: every log_every, and with every
    checkpoint (a curve drawn with each checkpoint ends at it)."""
    return self.step % self.config.train.log_every == 0 or self.at_end or self.checkpoint_due


class Hook:
  """One periodic piece of the loop's work. `due(loop)` says whether it runs after this step
  (default: every `every` steps; never if `every` is 0 or None); `__call__(loop)` does it;
  `close(loop)` runs once when the loop ends normally."""

  every: Optional[int] = None

  def due(self, loop: Loop) -> bool:
    return bool(self.every) and loop.step % self.every == 0

  def __call__(self, loop: Loop) -> None:
    raise NotImplementedError

  def close(self, loop: Loop) -> None:
    pass


class Every(Hook):
  """`fn(loop)` every `every` steps (and at the loop's last step if `at_end`): a function as a
  hook, e.g. `Every(500, evaluate)` in `train_and_evaluate(..., extra_hooks=[...])`."""

  def __init__(self, every: int, fn: Callable[[Loop], Any], *, at_end: bool = False):
    if every < 1:
      raise ValueError(f"a hook's period must be >= 1 step, got {every}")
    self.every, self.fn, self.at_end = every, fn, at_end

  def due(self, loop: Loop) -> bool:
    return super().due(loop) or (self.at_end and loop.at_end)

  def __call__(self, loop: Loop) -> None:
    self.fn(loop)


class Preemption(Hook):
  """Every step (on every process: the multi-host sync point needs it), asks the preemption
  notice; on SIGTERM the loop saves this step and stops."""

  def __init__(self, notice):
    self.notice = notice

  def due(self, loop: Loop) -> bool:
    return True

  def __call__(self, loop: Loop) -> None:
    if self.notice.reached(loop.step):
      loop.request_stop("preempted (SIGTERM)")


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


class NonFinite(Hook):
  """At log steps (whose metrics are fetched anyway: no extra device sync), stops training
  with NonFiniteError once config.train.max_nonfinite_steps updates in a row were skipped."""

  def due(self, loop: Loop) -> bool:
    return loop.log_due

  def __call__(self, loop: Loop) -> None:
    metrics = loop.host_metrics()  # also waits for the step: honest throughput below
    check_finite(int(jax.device_get(loop.state.nonfinite_streak)), metrics, loop.step,
                 loop.config.train.max_nonfinite_steps)


class Logging(Hook):
  """Every step advances the progress bar; at log steps the loss and throughput go to the bar,
  and (process 0) every metric to TensorBoard (workdir/tensorboard) and to the training curves
  (workdir/train_metrics.jsonl, drawn to train_curves.png with every checkpoint and at most
  every 30 s otherwise; arjax/evaluation/plots.py)."""

  def __init__(self, loop: Loop):
    self.writer = self.curves = None
    if loop.is_chief:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(loop.workdir, "tensorboard"))
      self.curves = plots.TrainingCurves(loop.workdir, resume_step=loop.start)
      loop.log_scalars = self.add_scalars
    self._last_time, self._last_step = None, loop.start  # the rate counts from the loop's start
    self._step = loop.start

  def due(self, loop: Loop) -> bool:
    return True

  def __call__(self, loop: Loop) -> None:
    self._step = loop.step
    if loop.log_due:
      self._log(loop)
    loop.bar.update(1)

  def _log(self, loop: Loop) -> None:
    done, metrics = loop.step, loop.host_metrics()
    now = time.perf_counter()
    since = loop.started_at if self._last_time is None else self._last_time
    images_per_s = ((done - self._last_step) * loop.config.train.global_batch_size
                    / max(now - since, 1e-9))
    self._last_time, self._last_step = now, done
    # The bar's own rate gives steps/s; these two are the figures synced at this step.
    loop.bar.set_postfix({"loss": f"{metrics['loss']:.4f}", "img/s": f"{images_per_s:.0f}"})
    if self.writer is not None:
      for k, v in metrics.items():
        self.writer.add_scalar(f"train/{k}", float(v), done)
      self.writer.add_scalar("train/images_per_second", images_per_s, done)
      self.curves.add(done, {**metrics, "images_per_second": images_per_s})
      if loop.checkpoint_due or self.curves.due():  # always with a checkpoint and at the end
        self.curves.draw()

  def add_scalars(self, scalars: dict) -> None:
    """Other hooks' figures for this step (process 0): TensorBoard and the curves."""
    if self.writer is None:
      return
    for k, v in scalars.items():
      self.writer.add_scalar(f"train/{k}", float(v), self._step)
    self.curves.add(self._step, scalars)
    self.curves.draw()

  def close(self, loop: Loop) -> None:
    if self.writer is not None:
      self.writer.close()


def write_grid(exp, sampler, params, step: int, workdir: str) -> str:
  """Samples 10 images of every class with `sampler` (the experiment's family's) and saves
  their class grid as workdir/samples/step_NNNNNNN.png (process 0); returns its path ('' on
  other processes)."""
  c = exp.config
  labels = np.repeat(np.arange(c.data.num_classes), 10)
  images = sampler(params, labels, jax.random.PRNGKey(c.sample.seed), cfg_scale=c.sample.cfg_scale,
                   cfg_schedule_name=c.sample.cfg_schedule, temperature=c.sample.temperature)
  images = pipeline.denormalize(sharding.to_host(images))
  if jax.process_index() != 0:
    return ""
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  return save_class_grid(os.path.join(workdir, "samples", f"step_{step:07d}.png"), images, labels)


class SampleGrid(Hook):
  """Every config.train.sample_every steps and at config.train.num_steps, a class grid of the
  EMA parameters' samples, drawn by the experiment's sampler (`exp.sampler()`)."""

  def __init__(self, loop: Loop):
    self.every = loop.config.train.sample_every
    self.sampler = loop.sampler() if self.every else None

  def due(self, loop: Loop) -> bool:
    return bool(self.every) and (super().due(loop) or loop.step == loop.config.train.num_steps)

  def __call__(self, loop: Loop) -> None:
    path = write_grid(loop.exp, self.sampler, loop.state.ema_params, loop.step, loop.workdir)
    if loop.is_chief:
      loop.bar.write(f"step {loop.step}: sample grid {path}")


class QualityProbe(Hook):
  """Every config.train.eval_every steps (and at the last), `eval`'s Fréchet distance and
  memorisation of config.train.eval_num_samples EMA samples (classes in turn, the config's
  sampling settings), logged as probe_frechet_distance / probe_memorization with the other
  curves (train_metrics.jsonl, train_curves.png, TensorBoard).

  The numbers are `arjax.evaluation.metrics`' on fewer samples than `eval`'s 1000: FD is
  biased upwards by ~1/N, so read the curve's shape (where FD stops falling while memorisation
  keeps rising), and `eval` for the figure. The classifier is `eval`'s cached one.
  """

  def __init__(self, loop: Loop):
    c = loop.config
    self.every = c.train.eval_every
    if not self.every:
      return
    from arjax.evaluation import feature_classifier, metrics  # pylint: disable=import-outside-toplevel
    self.metrics = metrics
    d = c.data
    pipeline.prepare(d.name, d.data_dir)
    self.train_images, train_labels = pipeline.load_split(d, d.train_split)
    eval_images, eval_labels = pipeline.load_split(d, d.eval_split)
    self.classifier = feature_classifier.load_or_train(
        pipeline.default_data_dir(d.data_dir), self.train_images, train_labels, name=d.name)
    reference, _ = metrics.split_heldout(eval_labels, seed=c.sample.seed)
    self.reference_feats = self.classifier.features(eval_images[reference])
    self.labels = np.arange(c.train.eval_num_samples) % d.num_classes
    self.sampler = loop.sampler()

  def due(self, loop: Loop) -> bool:
    return bool(self.every) and (super().due(loop) or loop.at_end)

  def __call__(self, loop: Loop) -> None:
    s = loop.config.sample
    images = self.sampler(loop.state.ema_params, self.labels, jax.random.PRNGKey(s.seed),
                          cfg_scale=s.cfg_scale, cfg_schedule_name=s.cfg_schedule,
                          temperature=s.temperature)
    images = pipeline.denormalize(sharding.to_host(images))
    if not loop.is_chief:
      return
    m = self.metrics
    fd = m.size_matched_mean(m.frechet_distance, self.classifier.features(images),
                             self.reference_feats, num_subsets=5, seed=s.seed)
    scores = {"probe_frechet_distance": float(fd),
              "probe_memorization": m.memorization(images, self.train_images)}
    loop.log_scalars(scores)
    loop.bar.write(f"step {loop.step}: {len(images)} samples: FD {fd:.2f}, memorisation "
                   f"{scores['probe_memorization']:.3f}")


class Checkpoint(Hook):
  """Saves the state and the data position every config.train.checkpoint_every steps, at the
  loop's last step and at a step where a stop was asked for; on close, waits for the last save
  and, if a hook stopped the run, says so and where its checkpoint is."""

  def due(self, loop: Loop) -> bool:
    return loop.checkpoint_due

  def __call__(self, loop: Loop) -> None:
    loop.checkpointer.save(loop.step, loop.state, loop.data_iter,
                           force=loop.at_end or loop.stopping)

  def close(self, loop: Loop) -> None:
    loop.checkpointer.wait()
    loop.checkpointer.close()
    if loop.stopping:
      say(f"{loop.stop_reason}: stopped after step {loop.step} of "
          f"{loop.config.train.num_steps}; checkpoint {loop.checkpointer.step_dir(loop.step)} "
          "is saved; run the same command to resume from it")


def standard(loop: Loop, notice, extra=()) -> list:
  """The loop's hooks in the order they run after a step; `extra` ones run before the
  checkpoint, so that a stop they ask for is saved."""
  return [Preemption(notice), NonFinite(), Logging(loop), SampleGrid(loop), QualityProbe(loop),
          *extra, Checkpoint()]
