"""The training loop's hook contract (arjax/training/hooks.py): each hook runs at its period and
in its place after the step, the loop ends at num_steps or when a hook asks it to stop, a stop
is checkpointed (and resumes bit-for-bit), and hooks a caller adds run at their own period."""
import os
import signal
import threading

import jax
import numpy as np
import pytest

from arjax.config import schema as configs
from arjax.evaluation import plots
from arjax.training import checkpoint
from arjax.training import hooks
from arjax.training import loop as train
from conftest import REPO_ROOT

NUM_STEPS = 6


def config_for(data_dir):
  """Periods chosen so that no two hooks share all their steps: checkpoints at 3 and 6 (the
  end), logs at 4 and with each checkpoint, sample grids at 4 and at num_steps, quality probes
  at 5 and at the end."""
  config = configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))
  config.data.data_dir = data_dir
  config.train.num_steps = NUM_STEPS
  config.train.checkpoint_every = 3
  config.train.log_every = 4
  config.train.sample_every = 4
  config.train.eval_every = 5
  config.train.eval_num_samples = 100  # the sample grid's shape: its compiled program
  config.train.keep_checkpoints = 3
  return config


class Recorded(hooks.Hook):
  """Runs `inner` as the loop would, noting (event, step, the hook's name) in `log`."""

  def __init__(self, inner, name, log):
    self.inner, self.name, self.log = inner, name, log

  def due(self, loop):
    return self.inner.due(loop)

  def __call__(self, loop):
    self.log.append(("call", loop.step, self.name))
    self.inner(loop)

  def close(self, loop):
    self.log.append(("close", loop.step, self.name))
    self.inner.close(loop)


def record_hooks(monkeypatch, log):
  """Wraps every hook the loop builds (standard and extra) in a Recorded one."""
  standard = hooks.standard

  def recorded(loop, notice, extra=()):
    built = standard(loop, notice, extra)
    names = [getattr(h, "name", type(h).__name__) for h in built]
    return [Recorded(h, n, log) for h, n in zip(built, names)]

  monkeypatch.setattr(hooks, "standard", recorded)


def named(name, hook):
  hook.name = name
  return hook


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
  """An uninterrupted run with two extra hooks, every hook's calls recorded:
  (config, workdir, final state, log)."""
  config = config_for(data_dir)
  workdir = str(tmp_path_factory.mktemp("hooks_straight"))
  log = []
  seen = []
  extra = [named("every5", hooks.Every(5, lambda loop: seen.append(loop.step))),
           named("every5+end", hooks.Every(5, lambda loop: None, at_end=True))]
  with pytest.MonkeyPatch.context() as mp:
    record_hooks(mp, log)
    state = train.train_and_evaluate(config, workdir, extra_hooks=extra)
  assert seen == [5]  # the extra hook's function itself ran
  return config, workdir, state, log


def steps_of(log, name):
  return [step for event, step, n in log if event == "call" and n == name]


def test_each_hook_runs_at_its_period(straight):
  config, workdir, state, log = straight
  assert int(state.step) == NUM_STEPS
  assert steps_of(log, "Preemption") == [1, 2, 3, 4, 5, 6]  # every step: the sync point needs it
  assert steps_of(log, "Logging") == [1, 2, 3, 4, 5, 6]  # the progress bar moves every step
  assert steps_of(log, "NonFinite") == [3, 4, 6]  # log steps: log_every, checkpoints, the end
  assert steps_of(log, "SampleGrid") == [4, 6]  # sample_every and num_steps
  assert steps_of(log, "QualityProbe") == [5, 6]  # eval_every and the end
  assert steps_of(log, "every5") == [5]
  assert steps_of(log, "every5+end") == [5, 6]
  assert steps_of(log, "Checkpoint") == [3, 6]
  # ...and what they wrote says the same.
  assert checkpoint.committed_steps(checkpoint.checkpoint_dir(workdir)) == [3, 6]
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
      "step_0000004.png", "step_0000006.png"]
  records = plots.read_records(os.path.join(workdir, "train_metrics.jsonl"))
  assert [r["step"] for r in records if "loss" in r] == [3, 4, 6]
  probes = [r for r in records if "probe_frechet_distance" in r]
  assert [r["step"] for r in probes] == [5, 6]
  for r in probes:  # eval's own metrics on the 100 samples: an untrained model's are poor
    assert r["probe_frechet_distance"] > 0 and 0 <= r["probe_memorization"] <= 1


def test_hooks_run_in_their_order_after_each_step_and_close_last_first(straight):
  _, _, _, log = straight
  order = ["Preemption", "NonFinite", "Logging", "SampleGrid", "QualityProbe", "every5",
           "every5+end", "Checkpoint"]
  for step in range(1, NUM_STEPS + 1):
    called = [n for event, s, n in log if event == "call" and s == step]
    assert called == [n for n in order if n in called], (step, called)
  # Extra hooks run before the step's checkpoint, so that a stop they ask for is saved.
  assert [n for e, s, n in log if e == "call" and s == NUM_STEPS][-1] == "Checkpoint"
  closes = [(s, n) for event, s, n in log if event == "close"]
  assert closes == [(NUM_STEPS, n) for n in reversed(order)]
  # Closing comes after the last step's calls, once.
  assert log[-len(order):] == [("close", NUM_STEPS, n) for n in reversed(order)]


def test_a_hook_asking_to_stop_ends_the_loop_after_its_step_is_saved(
    straight, tmp_path, capsys, monkeypatch):
  config, _, reference, _ = straight
  workdir = str(tmp_path / "stopped")
  after = []

  def stop_at_2(loop):
    if loop.step == 2:
      loop.request_stop("stopped by the test")

  log = []
  record_hooks(monkeypatch, log)
  state = train.train_and_evaluate(config, workdir, extra_hooks=[
      named("stopper", hooks.Every(1, stop_at_2)),
      named("after", hooks.Every(1, lambda loop: after.append((loop.step, loop.stopping))))])
  assert int(state.step) == 2  # no step after the stop
  assert after == [(1, False), (2, True)]  # hooks after the stopper see it
  assert steps_of(log, "Checkpoint") == [2]  # off its period: the stop is saved
  assert checkpoint.committed_steps(checkpoint.checkpoint_dir(workdir)) == [2]
  out = capsys.readouterr().out
  assert (f"stopped by the test: stopped after step 2 of {NUM_STEPS}; checkpoint "
          f"{workdir}/checkpoints/2 is saved; run the same command to resume from it") in out
  assert [n for e, _, n in log if e == "close"][0] == "Checkpoint"

  # The saved step resumes bit-for-bit: the stopped run ends where the uninterrupted one did.
  monkeypatch.undo()
  resumed = train.train_and_evaluate(config, workdir)
  assert int(resumed.step) == NUM_STEPS
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_is_a_stop_asked_by_the_preemption_hook_at_the_next_step(
    straight, tmp_path, capsys):
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("SIGTERM is handled on the main thread only; elsewhere it would end the tests")
  config, _, _, _ = straight
  workdir = str(tmp_path / "preempted")
  before = signal.getsignal(signal.SIGTERM)

  def sigterm_at_3(loop):
    if loop.step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler only takes note

  state = train.train_and_evaluate(config, workdir,
                                   extra_hooks=[hooks.Every(1, sigterm_at_3)])
  assert int(state.step) == 4  # noticed by the Preemption hook after step 4
  assert checkpoint.committed_steps(checkpoint.checkpoint_dir(workdir)) == [3, 4]
  assert (f"preempted (SIGTERM): stopped after step 4 of {NUM_STEPS}; checkpoint "
          f"{workdir}/checkpoints/4 is saved; run the same command to resume from it"
          ) in capsys.readouterr().out
  assert signal.getsignal(signal.SIGTERM) is before


# -----------------------------------------------------------------------------
# The rules the hooks share, without training.


def bare_loop(start=0, end=NUM_STEPS, **train_fields):
  config = configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))
  config.train.num_steps = NUM_STEPS
  for k, v in train_fields.items():
    setattr(config.train, k, v)
  return hooks.Loop(config=config, workdir="", exp=None, state=None, data_iter=None,
                    checkpointer=None, start=start, end=end)


def run_steps(loop, hook_list):
  """The loop's own schedule, with no training step."""
  while loop.running:
    loop.advance(None, None)
    for hook in hook_list:
      if hook.due(loop):
        hook(loop)


def test_the_one_end_condition_is_the_last_step_or_a_stop_request():
  loop = bare_loop(start=2, end=5)
  calls = []
  run_steps(loop, [hooks.Every(1, lambda l: calls.append(l.step))])
  assert calls == [3, 4, 5] and loop.step == 5 and not loop.running

  loop = bare_loop()
  run_steps(loop, [hooks.Every(2, lambda l: l.request_stop("first")),
                   hooks.Every(1, lambda l: l.request_stop("second"))])
  assert loop.step == 1 and loop.stop_reason == "second"  # the first request wins
  assert not bare_loop(start=NUM_STEPS).running  # a finished run takes no step


def test_checkpoint_and_log_steps():
  loop = bare_loop(checkpoint_every=3, log_every=4)
  due = []
  while loop.running:
    loop.advance(None, None)
    due.append((loop.step, loop.checkpoint_due, loop.log_due))
  assert [s for s, c, _ in due if c] == [3, 6]
  assert [s for s, _, g in due if g] == [3, 4, 6]
  loop = bare_loop(end=4, checkpoint_every=3, log_every=4)  # stop_after: the end is saved
  loop.step = 4
  assert loop.checkpoint_due and loop.at_end
  loop.step = 2
  loop.request_stop("test")
  assert loop.checkpoint_due and loop.log_due and not loop.running


def test_the_preemption_hook_asks_its_notice_every_step():
  class Notice:
    asked = []

    def reached(self, step):
      self.asked.append(step)
      return step == 3

  loop, notice = bare_loop(), Notice()
  run_steps(loop, [hooks.Preemption(notice)])
  assert notice.asked == [1, 2, 3] and loop.stop_reason == "preempted (SIGTERM)"


def test_every_needs_a_period_of_at_least_one_step():
  with pytest.raises(ValueError, match="period must be >= 1"):
    hooks.Every(0, lambda loop: None)
  assert not hooks.Hook().due(bare_loop())  # a hook without a period never runs by itself
