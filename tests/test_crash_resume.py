"""Real `python -m arjax train` processes, killed and restarted: nothing saved is ever lost.

One training run (20 steps, a checkpoint every 2, keeping 2) is interrupted 11 times: SIGKILL
while it starts up, while the first step compiles, mid-run, while an async checkpoint is being
written, right after a checkpoint is committed (before old ones are pruned), and once SIGTERM
(a preemption notice). Kill moments come from a seeded RNG and from watching the process's
output and checkpoint directory. After every interruption the next process must resume from
the newest *complete* checkpoint, and the run must end with exactly the parameters, EMA and
optimizer state of a run that was never interrupted. A config that does not fit the
checkpoint fails with one line naming the parameter, both shapes and the config field,
touching nothing.

The processes use 2 simulated CPU devices (a real data-parallel mesh; more only compile
longer) and the tests' persistent compilation cache, so that a restart costs seconds; the one
killed inside its first compile runs without it, so that it really compiles. The reference and
the interrupted run are made once per session and shared by the tests, also when pytest-xdist
puts them on different workers (a lock in the session's shared temp dir).
"""
import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO_ROOT

NUM_STEPS = 20
CHECKPOINT_EVERY = 2
TRAIN_ARGS = ("train", "--config=configs/digits.py:smoke",
              f"--config.train.num_steps={NUM_STEPS}",
              f"--config.train.checkpoint_every={CHECKPOINT_EVERY}",
              "--config.train.keep_checkpoints=2")
TMP_MARK = ".orbax-checkpoint-tmp"
POLL_S = 0.005
RUN_TIMEOUT_S = 300


def subprocess_env(data_dir, cache_dir):
  env = dict(os.environ, ARJAX_DATA_DIR=data_dir, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if cache_dir is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env


class Run:
  """One `python -m arjax train` process; its merged stdout/stderr is collected as it comes."""

  def __init__(self, workdir, env, *args):
    self.workdir = str(workdir)
    self.proc = subprocess.Popen([sys.executable, "-m", "arjax", *TRAIN_ARGS,
                                  f"--workdir={self.workdir}", *args],
                                 cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
    self.started = time.monotonic()
    self._chunks = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    while chunk := os.read(self.proc.stdout.fileno(), 1 << 16):
      self._chunks.append(chunk)

  @property
  def output(self) -> str:
    return b"".join(self._chunks).decode(errors="replace")

  def running(self) -> bool:
    return self.proc.poll() is None

  def finish(self, timeout=RUN_TIMEOUT_S) -> int:
    code = self.proc.wait(timeout=timeout)
    self._reader.join()
    return code

  def signal(self, signum) -> None:
    self.proc.send_signal(signum)

  def resumed_from(self):
    found = re.findall(r"resuming from checkpoint step (\d+)", self.output)
    return int(found[-1]) if found else None


def ckpt_dir(workdir):
  return os.path.join(str(workdir), "checkpoints")


def listing(workdir):
  """(committed steps, names of unfinished Orbax step directories) of a workdir."""
  try:
    names = os.listdir(ckpt_dir(workdir))
  except FileNotFoundError:
    return set(), set()
  return {int(n) for n in names if n.isdigit()}, {n for n in names if TMP_MARK in n}


def is_complete(step_dir):
  """Orbax's commit marks of the step and of its state item, and the state's metadata."""
  return all(os.path.isfile(os.path.join(step_dir, *p)) for p in (
      ("commit_success.txt",), ("state", "commit_success.txt"), ("state", "_METADATA")))


def restore_host(step_dir):
  """A checkpoint's state as host numpy arrays (whatever mesh wrote it) and its data position."""
  checkpointer = ocp.StandardCheckpointer()
  path = os.path.join(step_dir, "state")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        checkpointer.metadata(path).item_metadata)
  state = jax.tree.map(np.asarray, checkpointer.restore(path, target))
  with open(os.path.join(step_dir, "data_iter", "metadata")) as f:
    return state, json.load(f)


def assert_same_training_state(step_dir, reference_dir):
  state, position = restore_host(step_dir)
  ref_state, ref_position = restore_host(reference_dir)
  assert position == ref_position
  assert (jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(ref_state))
  for name in ("params", "ema_params", "opt_state", "step", "rng", "nonfinite_streak"):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state[name])[0],
                            jax.tree.leaves(ref_state[name])):
      assert np.array_equal(a, b), f"{name}{jax.tree_util.keystr(path)} differs"
  assert int(state["step"]) == NUM_STEPS


def shared_root(tmp_path_factory):
  """A directory of this session common to all xdist workers, under a lock file."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session's directory, above the per-worker ones
  root = root / "crash_resume"
  root.mkdir(exist_ok=True)
  return str(root)


class Once:
  """`with Once(root, name) as todo:` — `todo` is True for the first process of the session to
  get there (which then makes the thing), False for the others (which wait for it)."""

  def __init__(self, root, name):
    self._lock = open(os.path.join(root, f"{name}.lock"), "a")
    self._done = os.path.join(root, f"{name}.done")

  def __enter__(self):
    fcntl.flock(self._lock, fcntl.LOCK_EX)
    return not os.path.exists(self._done)

  def __exit__(self, exc_type, *_):
    if exc_type is None:
      open(self._done, "w").close()
    fcntl.flock(self._lock, fcntl.LOCK_UN)
    self._lock.close()


class Reference:
  """The uninterrupted run."""

  def __init__(self, root, data_dir):
    self.root = root
    self.data_dir = data_dir
    self.workdir = os.path.join(root, "reference")
    # The tests' persistent compilation cache (tests/conftest.py), else one of this session.
    self.cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(root, "cache")

  def env(self, cached=True):
    return subprocess_env(self.data_dir, self.cache_dir if cached else None)

  def final_dir(self):
    with Once(self.root, "reference") as todo:
      if todo:
        run = Run(self.workdir, self.env())
        assert run.finish() == 0, run.output
        assert f"trained to step {NUM_STEPS}" in run.output
    return os.path.join(ckpt_dir(self.workdir), str(NUM_STEPS))


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_dir):
  return Reference(shared_root(tmp_path_factory), data_dir)


class Watch:
  """What a run has done to its checkpoint directory so far: the steps it committed and the
  saves it started (Orbax temporary directories it created: a killed run's leftovers are told
  apart by inode and change time, as a new save of the same step recreates the directory)."""

  def __init__(self, workdir):
    self.workdir = workdir
    self.old_steps = listing(workdir)[0]
    self.old_tmp = self._tmp_dirs()
    self.committed, self.started = set(), set()

  def _tmp_dirs(self):
    found = set()
    for name in listing(self.workdir)[1]:
      try:
        st = os.stat(os.path.join(ckpt_dir(self.workdir), name))
      except FileNotFoundError:
        continue
      found.add((name, st.st_ino, st.st_ctime_ns))
    return found

  def poll(self):
    self.committed |= listing(self.workdir)[0] - self.old_steps  # (later pruned ones too)
    self.started |= self._new_tmp_steps() | self.committed

  def _new_tmp_steps(self):
    return {int(name.split(".")[0]) for name, *_ in self._tmp_dirs() - self.old_tmp}

  def unfinished(self):
    """The saves this run started and left unfinished (to be called once it has ended)."""
    return self._new_tmp_steps() - listing(self.workdir)[0]


def after_start(seconds):
  return lambda run, watch: time.monotonic() - run.started >= seconds


def in_training_loop(seconds):
  """`seconds` after the progress bar appears: compiling the step, stepping, saving."""
  since = []
  def trigger(run, watch):
    if not since and "train:" in run.output:
      since.append(time.monotonic())
    return bool(since) and time.monotonic() - since[0] >= seconds
  return trigger


def saving(n, jitter):
  """`jitter` seconds after the run's n-th save has started (its temporary directory appeared)."""
  at = []
  def trigger(run, watch):
    if not at and len(watch.started) >= n:
      at.append(time.monotonic() + jitter)
    return bool(at) and time.monotonic() >= at[0]
  return trigger


def committed(n):
  """As soon as the run's n-th checkpoint is published, before the next save prunes old ones."""
  return lambda run, watch: len(watch.committed) >= n


def mid_run(seconds):
  """`seconds` after the run's first checkpoint is committed: among steps and saves."""
  at = []
  def trigger(run, watch):
    if not at and watch.committed:
      at.append(time.monotonic() + seconds)
    return bool(at) and time.monotonic() >= at[0]
  return trigger


def interrupt(workdir, env, kind, trigger, signum=signal.SIGKILL):
  """Starts a run, sends `signum` once `trigger` holds, and records what it saw."""
  before = listing(workdir)[0]
  watch = Watch(workdir)
  run = Run(workdir, env)
  while True:
    watch.poll()
    assert run.running(), f"{kind}: the run ended before its interruption point:\n{run.output}"
    if trigger(run, watch):
      break
    time.sleep(POLL_S)
  run.signal(signum)
  code = run.finish()
  watch.poll()
  steps = listing(workdir)[0]
  return {
      "kind": kind, "seconds": round(time.monotonic() - run.started, 2), "exit_code": code,
      "newest_before": max(before, default=None), "resumed_from": run.resumed_from(),
      "steps_after": sorted(steps), "unfinished_saves": sorted(watch.unfinished()),
      "incomplete_steps": [s for s in steps if not is_complete(os.path.join(ckpt_dir(workdir),
                                                                           str(s)))],
      "found_damage": "unreadable" in run.output,
      "first_step_done": bool(re.search(rf"\b[1-9]\d*/{NUM_STEPS}\b", run.output)),
      "output_tail": run.output[-3000:],
  }


def interrupted_run(reference, workdir):
  """The interrupted run's record: one entry per process, the last one run to the end."""
  # The reference runs meanwhile, on another thread: only the final comparison needs it.
  failures = []
  def run_reference():
    try:
      reference.final_dir()
    except BaseException as e:  # re-raised in the test's thread below
      failures.append(e)
  thread = threading.Thread(target=run_reference)
  thread.start()

  rng = random.Random(20240613)
  plan = [
      # Without the compilation cache, so that the first step really compiles, for seconds.
      ("compile", in_training_loop(rng.uniform(0.2, 1.0)), signal.SIGKILL, False),
      *[("startup", after_start(rng.uniform(0.5, 4.0)), signal.SIGKILL, False)
        for _ in range(4)],
      ("saving", saving(1, jitter=rng.uniform(0, 0.05)), signal.SIGKILL, True),
      ("committed", committed(1), signal.SIGKILL, True),
      ("startup", after_start(rng.uniform(0.5, 4.0)), signal.SIGKILL, True),
      ("mid-run", mid_run(rng.uniform(0.05, 1.0)), signal.SIGKILL, True),
      ("saving", saving(2, jitter=rng.uniform(0, 0.05)), signal.SIGKILL, True),
      ("sigterm", mid_run(rng.uniform(0.05, 1.0)), signal.SIGTERM, True),
  ]
  records = [interrupt(workdir, reference.env(cached), kind, trigger, signum)
             for kind, trigger, signum, cached in plan]

  before = listing(workdir)[0]
  final = Run(workdir, reference.env())
  code = final.finish()
  records.append({"kind": "final", "exit_code": code, "newest_before": max(before),
                  "resumed_from": final.resumed_from(), "found_damage": "unreadable" in
                  final.output, "output_tail": final.output[-3000:]})
  thread.join()
  if failures:
    raise failures[0]
  return records


@pytest.fixture(scope="session")
def interrupted(reference):
  """(the interrupted run's records, its workdir); made once per session."""
  workdir = os.path.join(reference.root, "interrupted")
  record_path = os.path.join(reference.root, "interrupted.json")
  with Once(reference.root, "interrupted") as todo:
    if todo:
      with open(record_path, "w") as f:
        json.dump(interrupted_run(reference, workdir), f)
  with open(record_path) as f:
    return json.load(f), workdir


def describe(records):
  return "\n".join(f"{r['kind']}: {r.get('seconds')} s, exit {r['exit_code']}, resumed from "
                   f"{r['resumed_from']}, steps after {r.get('steps_after')}, unfinished saves "
                   f"{r.get('unfinished_saves')}" for r in records)


@pytest.mark.slow
def test_sigkill_anywhere_loses_nothing_and_training_ends_bit_for_bit(interrupted, reference):
  records, workdir = interrupted
  print("\n" + describe(records))
  kills = [r for r in records if r["kind"] not in ("sigterm", "final")]
  assert len(kills) >= 10
  assert all(r["exit_code"] == -signal.SIGKILL for r in kills), describe(records)
  for r in records:
    # Each process that got as far as restoring resumed from the newest checkpoint there was
    # (none: a fresh start), and none found a damaged one.
    if r["resumed_from"] is not None or r["newest_before"] is None:
      assert r["resumed_from"] == r["newest_before"], r["output_tail"]
    assert not r["found_damage"], r["output_tail"]
    # No kill left a step directory that is not a complete checkpoint.
    assert not r.get("incomplete_steps"), r
  # The kill points were hit: inside the first step's compile, and during async saves (the
  # save's temporary directory was left unfinished), and the run was resumed mid-way.
  assert [r["first_step_done"] for r in kills if r["kind"] == "compile"] == [False]
  assert any(r["unfinished_saves"] for r in kills if r["kind"] == "saving"), describe(records)
  final = records[-1]
  assert final["exit_code"] == 0 and f"trained to step {NUM_STEPS}" in final["output_tail"]
  assert final["resumed_from"] > 0
  assert_same_training_state(os.path.join(ckpt_dir(workdir), str(NUM_STEPS)),
                             reference.final_dir())
  # Retention kept the newest two complete checkpoints; nothing unfinished is left.
  assert sorted(os.listdir(ckpt_dir(workdir))) == [str(NUM_STEPS - CHECKPOINT_EVERY),
                                                   str(NUM_STEPS)]


@pytest.mark.slow
def test_sigterm_checkpoints_the_next_step_exits_0_and_the_run_resumes_from_it(interrupted,
                                                                                reference):
  records, workdir = interrupted
  i, preempted = next((i, r) for i, r in enumerate(records) if r["kind"] == "sigterm")
  assert preempted["exit_code"] == 0, preempted["output_tail"]
  stopped = re.search(r"preempted \(SIGTERM\): stopped after step (\d+) of \d+; checkpoint "
                      r"(\S+) is saved; run the same command to resume", preempted["output_tail"])
  assert stopped, preempted["output_tail"]
  step = int(stopped.group(1))
  assert stopped.group(2) == os.path.join(ckpt_dir(workdir), str(step))
  # It saved the step it had reached ...
  assert step > preempted["newest_before"] and max(preempted["steps_after"]) == step
  assert f"trained to step {step}" in preempted["output_tail"]
  # ... and the next process resumed from it; the run then ended on the reference's numbers.
  assert records[i + 1]["resumed_from"] == step
  assert_same_training_state(os.path.join(ckpt_dir(workdir), str(NUM_STEPS)),
                             reference.final_dir())


def snapshot(root):
  """Every directory and file under `root`, with the files' bytes."""
  files = {}
  for directory, _, names in os.walk(root):
    files[os.path.relpath(directory, root)] = None
    for name in names:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, root)] = f.read()
  return files


@pytest.mark.slow
def test_a_config_that_does_not_fit_the_checkpoint_fails_naming_parameter_shapes_and_field(
    tmp_path, reference):
  workdir = tmp_path / "trained"
  reference.final_dir()
  shutil.copytree(reference.workdir, workdir)
  before = snapshot(workdir)
  run = Run(workdir, reference.env(), "--config.model.width=48")
  assert run.finish() != 0
  errors = [line for line in run.output.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, run.output
  error = errors[0]
  assert os.path.join(ckpt_dir(workdir), str(NUM_STEPS)) in error
  # The first parameter in path order; the smoke model's width is 32, its 2 heads of 16.
  assert ("params/backbone/block_0/attn/key/kernel has shape (32, 2, 16) in the checkpoint but "
          "(48, 2, 24) with this config") in error
  assert "config.model.width=48 (32 in " in error
  assert snapshot(workdir) == before
