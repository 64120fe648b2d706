"""The training loop: set-up, then step after step with periodic hooks. Resumes automatically.

`train_and_evaluate` first sets up (the experiment and its mesh, the workdir checks, the data
iterator, a checkpoint restore, the summary it prints), then runs the loop, whose body is the
sharded step followed by the hooks of arjax/training/hooks.py (preemption, non-finite check,
progress and logs, sample grids, checkpoints, and any a caller adds). The loop has one end
condition: it runs until config.train.num_steps (or `stop_after` steps) or until a hook asks
it to stop, which only a preemption notice does among the standard hooks.

Resume precedence: a checkpoint in `workdir/checkpoints` (the newest one that
restores; damaged newer ones are moved aside, see arjax/training/checkpoint.py) > a fresh
start from `config.seed`. The state holds the RNG and the checkpoint holds the
grain iterator, so a resumed run continues bit-for-bit, however it was stopped:
a kill -9 anywhere loses at most the steps since the last checkpoint, and SIGTERM
(a preemption notice) checkpoints the step reached and returns.
"""
import os
import time

import jax

from arjax.training import checkpoint
from arjax.training import hooks
from arjax.util import progress
from arjax.parallel import sharding
from arjax.training import summary
from arjax.training import state as train_state
from arjax.training.hooks import NonFiniteError, check_finite  # noqa: F401  (re-exported)
from arjax.training.preemption import PreemptionNotice
from arjax.training.workdir import check_free_space, check_workdir
from arjax.data import latents, pipeline
from arjax.training.experiment import Experiment  # noqa: F401  (re-exported: train.Experiment)


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


def train_and_evaluate(config, workdir: str, *, stop_after=None, mesh=None, extra_hooks=()):
  """Trains to config.train.num_steps (or `stop_after` steps, for tests); returns the final state.

  `mesh`: the devices to train on; default the config's mesh over all devices of the job.
  SIGTERM (a preemption notice) saves a checkpoint at the next step boundary and returns
  early, with a message saying where the checkpoint is.
  `extra_hooks`: more periodic work (arjax/training/hooks.py: `hooks.Hook` objects, e.g.
  `hooks.Every(n, fn)`), run after the standard hooks of each step and before its checkpoint.
  """
  with PreemptionNotice() as preemption:
    loop, step_fn = _set_up(config, workdir, stop_after, mesh)
    return _run(loop, step_fn, hooks.standard(loop, preemption, extra_hooks))


def _set_up(config, workdir: str, stop_after, mesh):
  """Everything before the first step: checks, config.json, data, restore or init, summary.
  Returns the loop's starting point (hooks.Loop) and the jitted step."""
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
  if jax.process_index() == 0:
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
  hooks.say(summary.training(c, exp.mesh, workdir,
                             num_params=summary.count_parameters(abstract.params),
                             num_examples=summary.num_examples(c), resume_step=resumed,
                             checkpoints=ckpt.directory))
  step_fn = exp.jit_step(shardings)
  start = int(jax.device_get(state.step))
  end = c.train.num_steps if stop_after is None else min(c.train.num_steps, start + stop_after)
  loop = hooks.Loop(config=c, workdir=workdir, exp=exp, state=state, data_iter=data_iter,
                    checkpointer=ckpt, start=start, end=end)
  return loop, step_fn


def _run(loop: hooks.Loop, step_fn, hook_list) -> train_state.TrainState:
  """The loop: a step, then every hook that is due; until the end or a hook's stop request."""
  c = loop.config
  # A terminal gets a bar, a log file a line every 30 s (arjax/util/progress.py); the loss and rates
  # shown are those fetched at log steps (hooks.Logging), so reporting adds no device sync.
  loop.bar = progress.bar(c.train.num_steps, initial=loop.start, desc="train", unit="step",
                          enabled=loop.is_chief)
  loop.started_at = time.perf_counter()
  while loop.running:
    batch = sharding.global_batch(next(loop.data_iter), loop.exp.mesh)
    loop.advance(*step_fn(loop.state, batch))
    for hook in hook_list:
      if hook.due(loop):
        hook(loop)
  loop.bar.close()
  for hook in reversed(hook_list):  # the checkpoint's last save is waited for first
    hook.close(loop)
  return loop.state
