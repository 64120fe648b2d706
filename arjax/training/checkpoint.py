"""Orbax checkpoints of the train state and the grain iterator, as two items of one step.

Layout: `workdir/checkpoints/<step>/{state,data_iter}`. Saves are asynchronous
(training goes on while the previous step's arrays are written) and atomic: Orbax
writes into `<step>.orbax-checkpoint-tmp` and renames it once complete, so a step
directory that exists is a finished one (a kill -9 mid-save leaves only the
temporary directory, which the next run's first save removes). Restore puts every
array onto the shardings of the *current* mesh, whatever mesh and however many
processes wrote it: the state is an Orbax PyTree (every process writes its own
shards) and the data position is one small JSON item that does not depend on the
process count. A checkpoint without a data item (e.g. one made by
`python -m arjax convert`) resumes the data at batch `state.step`: every step
consumes one batch.

What can go wrong, and what happens then:

* The config does not build the checkpoint's parameters (another width, depth,
  ...): `check_fits` / `restore` raise CheckpointMismatchError naming the
  parameter, both shapes and the config fields that differ from the run that
  wrote it (its `workdir/config.json`), before anything is written.
* The newest checkpoint is truncated or unreadable: `restore` falls back to the
  newest one that reads, warns naming the bad step, and moves the bad one aside to
  `<step>.corrupt` (kept for inspection, never deleted). If none reads, nothing is
  moved and NoReadableCheckpointError says why.
* Retention is done here, not by Orbax's max_to_keep: older checkpoints are
  deleted only after the `keep` newest ones are committed and verified (see
  `is_complete`), when the next save starts or at `close`. So while a new save is
  in flight the disk holds `keep` good checkpoints plus the unfinished one, never
  fewer. Deleting renames `<step>` to `<step>.deleting` first, so a kill in the
  middle of deleting never leaves a half-deleted directory under a step's name.
"""
import json
import logging
import os
import re
import shutil
import sys
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from arjax.config import schema as configs
from arjax.data import pipeline

ITEMS = ("state", "data_iter")
CORRUPT_SUFFIX = ".corrupt"
_DELETING_SUFFIX = ".deleting"
# Orbax's marks: the suffix of an unfinished step directory, and the file its finalize writes
# into a step (and into each item) just before the rename that publishes it.
_TMP_MARK = ".orbax-checkpoint-tmp"
_COMMIT_FILE = "commit_success.txt"
# Orbax's step names: no leading zeros (orbax.checkpoint._src.path.step).
_STEP_NAME = re.compile(r"0|[1-9]\d*")
# The config sections that decide parameter shapes, and the data fields among them.
_SHAPE_SECTIONS = ("model", "head", "tokenizer")
_SHAPE_DATA_FIELDS = ("data.image_size", "data.channels", "data.num_classes")


class CheckpointMismatchError(configs.ConfigError):
  """The config builds parameters of other shapes (or names) than the checkpoint holds."""


class NoReadableCheckpointError(OSError):
  """Every checkpoint in the directory failed to restore."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def committed_steps(directory: str) -> list[int]:
  """The steps of `directory` that Orbax has published (renamed into place), oldest first."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if _STEP_NAME.fullmatch(name) and os.path.isdir(os.path.join(directory, name)))


def is_complete(step_dir: str) -> bool:
  """Cheap structural check of a published step: Orbax's commit marks (of the step and of its
  state item) and the state's tree metadata are there. Array contents are checked by restoring."""
  return all(os.path.isfile(os.path.join(step_dir, *parts)) for parts in (
      (_COMMIT_FILE,), ("state", _COMMIT_FILE), ("state", "_METADATA")))


def _path_name(path) -> str:
  """A tree path as 'params/backbone/block_0/...', the same for dataclass fields and dict keys."""
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _leaves(tree) -> dict:
  return {_path_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _stored_leaves(manager: ocp.CheckpointManager, step: int) -> dict:
  """The state item's arrays as recorded in its metadata; raises if that cannot be read (a
  damaged checkpoint, which must not be mistaken for one that does not fit the config)."""
  metadata = manager.metadata(step).item_metadata
  tree = metadata["state"] if metadata is not None and "state" in metadata else None
  leaves = _leaves(tree) if tree is not None else {}
  if not leaves:
    raise FileNotFoundError(f"no readable array metadata in step {step}'s state item")
  return leaves


def _mismatch(stored: dict, wanted: dict) -> Optional[str]:
  """What differs between the checkpoint's leaves and the config's, in one sentence (or None)."""
  def describe(name):
    if name not in stored:
      return f"{name} {wanted[name][0]} is built by this config but absent from the checkpoint"
    if name not in wanted:
      return f"{name} {stored[name][0]} is in the checkpoint but not built by this config"
    (s_shape, s_dtype), (w_shape, w_dtype) = stored[name], wanted[name]
    if s_shape != w_shape:
      return f"{name} has shape {s_shape} in the checkpoint but {w_shape} with this config"
    return f"{name} is {s_dtype} in the checkpoint but {w_dtype} with this config"

  differing = [n for n in sorted(set(stored) | set(wanted)) if stored.get(n) != wanted.get(n)]
  if not differing:
    return None
  # The parameters themselves say the most; their EMA and optimizer moments follow them.
  first = next((n for n in differing if n.startswith("params/")), differing[0])
  more = f" (and {len(differing) - 1} more arrays differ)" if len(differing) > 1 else ""
  return describe(first) + more


def _flat_config(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat_config(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def differing_shape_fields(workdir: str, config) -> Optional[list[str]]:
  """The fields that set parameter shapes and differ between `config` and the run that wrote
  `workdir` (its config.json), as 'config.model.width=48 (32 in .../config.json)'; None when
  that run's config is not there to compare with."""
  path = os.path.join(os.path.abspath(workdir), "config.json")
  try:
    with open(path) as f:
      written = _flat_config(json.load(f))
  except (OSError, ValueError):
    return None
  current = _flat_config(json.loads(config.to_json_best_effort()))
  relevant = lambda k: k.split(".")[0] in _SHAPE_SECTIONS or k in _SHAPE_DATA_FIELDS
  return [f"config.{k}={current.get(k)!r} ({written.get(k)!r} in {path})"
          for k in sorted(set(current) | set(written))
          if relevant(k) and current.get(k) != written.get(k)]


def _mismatch_error(directory: str, step: int, what: str, hint: Optional[list]):
  if hint:
    advice = f"probably because {', '.join(hint)}"
  elif hint is not None:
    advice = "no field of config.model/head/tokenizer differs from the workdir's config.json"
  else:
    advice = "a field of config.model, config.head or config.tokenizer probably differs"
  return CheckpointMismatchError(
      f"checkpoint {os.path.join(directory, str(step))} does not fit the config: {what}; "
      f"{advice}. Train with the config that wrote it, or use another --workdir")


def _all_processes_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (one collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _manager(directory: str, *, save_every: int = 1, async_save: bool = True):
  # max_to_keep=None: Orbax deletes nothing; `Checkpointer._prune` does (see the module
  # docstring). create=False: opening a workdir (to check or sample it) creates nothing in it.
  # The item handlers are named up front so that metadata reads before any save or restore.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None, save_interval_steps=save_every, create=False,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(
      directory, item_names=ITEMS, options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data_iter": ocp.JsonCheckpointHandler()})


def check_fits(workdir: str, abstract_state, config=None) -> None:
  """Raises CheckpointMismatchError if the newest readable checkpoint of `workdir` holds arrays
  that `abstract_state` (what `config` builds) does not: other names, shapes or dtypes.

  Reads metadata only and writes nothing, so `train` can refuse a wrong config before it
  touches the workdir. With `config`, the error names the shape-setting fields that differ
  from the workdir's config.json. Unreadable checkpoints are left to `restore`.
  """
  directory = checkpoint_dir(workdir)
  steps = committed_steps(directory)
  if not steps:
    return
  manager = _manager(directory)
  wanted = _leaves(abstract_state)
  try:
    for step in reversed(steps):
      try:
        stored = _stored_leaves(manager, step)
      except Exception:  # pylint: disable=broad-except  (unreadable: `restore` falls back)
        continue
      what = _mismatch(stored, wanted)
      if what is not None:
        hint = differing_shape_fields(workdir, config) if config is not None else None
        raise _mismatch_error(directory, step, what, hint)
      return
  finally:
    manager.close()


class Checkpointer:
  def __init__(self, workdir: str, *, keep: int, save_every: int, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    self.keep = keep
    self.save_every = save_every
    self.manager = _manager(self.directory, save_every=save_every, async_save=async_save)
    self._has_saved = False

  def latest_step(self) -> Optional[int]:
    steps = committed_steps(self.directory)
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # ---------------------------------------------------------------------------
  # Saving and retention.

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    """Saves when `step` is on the save interval (or `force`); returns whether it did.

    Waits for the previous save first (as Orbax would), so that retention only ever counts
    committed checkpoints.
    """
    # On the interval only (Orbax's default policy would also save the first step of a run).
    if not (force or step % self.save_every == 0):
      return False
    self.wait()
    if jax.process_index() == 0:
      if not self._has_saved:
        os.makedirs(self.directory, exist_ok=True)
        self._remove_leftovers()
      self._prune()
    self._has_saved = True
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=pipeline.iterator_save_args(data_iter)), force=True)

  def _remove_leftovers(self) -> None:
    """Unfinished saves and deletions of a killed run: never steps, only disk space."""
    for name in os.listdir(self.directory):
      if _TMP_MARK in name or name.endswith(_DELETING_SUFFIX):
        logging.info("removing %s, left by an interrupted run", name)
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def _prune(self) -> None:
    """Deletes the committed steps older than the `keep` newest complete ones."""
    steps = committed_steps(self.directory)
    complete = [s for s in reversed(steps) if is_complete(self.step_dir(s))]
    if len(complete) <= self.keep:
      return
    oldest_kept = complete[self.keep - 1]
    for step in steps:
      if step < oldest_kept:
        doomed = self.step_dir(step) + _DELETING_SUFFIX
        shutil.rmtree(doomed, ignore_errors=True)
        os.rename(self.step_dir(step), doomed)  # atomic: the step is gone at once, or not at all
        shutil.rmtree(doomed)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.wait()
    if self._has_saved and jax.process_index() == 0:
      self._prune()  # the last save is committed now
    self.manager.close()

  # ---------------------------------------------------------------------------
  # Restoring.

  def restore(self, abstract_state, data_iter=None, step: Optional[int] = None):
    """Restores the state onto `abstract_state`'s shardings, and `data_iter` in place.

    Without `step`: the newest checkpoint that reads. Newer ones that do not read are moved
    aside to `<step>.corrupt` with a warning. Raises CheckpointMismatchError when the
    checkpoint's arrays are not those of `abstract_state` (a config error, not corruption:
    nothing is moved), NoReadableCheckpointError when no checkpoint reads, FileNotFoundError
    when there is none.
    """
    candidates = [step] if step is not None else list(reversed(committed_steps(self.directory)))
    if not candidates:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    _quiet_abandoned_reads()
    failures = []
    for candidate in candidates:
      error = None
      try:
        state = self._restore_step(candidate, abstract_state, data_iter)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (whatever a damaged file raises)
        if step is not None:
          raise
        error = e
      # Every process must resume from the same step, so one failure fails the step for all.
      if _all_processes_agree(error is None):
        self._set_aside(failures, candidate)
        return state
      if os.path.isdir(self.step_dir(candidate)):  # else deleted meanwhile: not corruption
        failures.append((candidate, error or RuntimeError("unreadable on another process")))
    raise NoReadableCheckpointError(
        f"no checkpoint in {self.directory} could be restored (nothing was moved): " + "; ".join(
            f"step {s}: {_one_line(e)}" for s, e in failures))

  def _restore_step(self, step: int, abstract_state, data_iter):
    stored = _stored_leaves(self.manager, step)
    what = _mismatch(stored, _leaves(abstract_state))
    if what is not None:
      raise _mismatch_error(self.directory, step, what, None)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    has_data_item = os.path.isdir(os.path.join(self.step_dir(step), "data_iter"))
    if data_iter is not None and has_data_item:
      items["data_iter"] = pipeline.iterator_restore_args()
    logging.info("restoring checkpoint %d from %s", step, self.directory)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = restored["state"]
    if data_iter is not None:
      position = restored["data_iter"] if has_data_item else int(state.step)
      pipeline.set_iterator_position(data_iter, position)
    return state

  def _set_aside(self, failures, restored_step: int) -> None:
    """Moves the checkpoints that failed to restore out of the way, keeping their files."""
    for step, error in failures:
      source = self.step_dir(step)
      target, n = source + CORRUPT_SUFFIX, 1
      while os.path.exists(target):
        target, n = f"{source}{CORRUPT_SUFFIX}.{n}", n + 1
      logging.warning("checkpoint step %d in %s is unreadable (%s); moved aside to %s; resuming "
                      "from step %d", step, self.directory, _one_line(error), target, restored_step)
      if jax.process_index() == 0:
        os.rename(source, target)
    if failures:
      _sync_processes("arjax_checkpoint_set_aside")
      self.manager.reload()  # else Orbax still lists the moved steps, and refuses to re-save them


_ABANDONED_READ = "Encountered error while reading array index"  # Orbax's failed-read message


def _is_abandoned_read(error) -> bool:
  return error is not None and (str(error) == "Event loop is closed" or
                                str(error).startswith(_ABANDONED_READ))


class _DropAbandonedReads(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and _is_abandoned_read(record.exc_info[1]))


def _quiet_abandoned_reads() -> None:
  """Drops Python's reports of the reads Orbax abandons when one read of a checkpoint fails.

  Orbax reads all arrays concurrently; once one fails, the others are left mid-flight and each
  is reported as it finishes or is collected (sys.unraisablehook: "Event loop is closed",
  "Encountered error while reading array index ..."; asyncio's logger: "Task exception was
  never retrieved"): hundreds of tracebacks that bury the one-line warning naming the bad step.
  Only those reports are dropped; every other one still goes where it went.
  """
  previous = sys.unraisablehook
  if getattr(previous, "arjax_drops_abandoned_reads", False):
    return
  def hook(unraisable):
    if not _is_abandoned_read(unraisable.exc_value):
      previous(unraisable)
  hook.arjax_drops_abandoned_reads = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_DropAbandonedReads())


def _one_line(error: BaseException, limit: int = 300) -> str:
  """The error at the bottom of `error`'s chain (the file and byte range TensorStore could not
  read, rather than Orbax's wrapper around it), on one line."""
  seen = {id(error)}
  while (cause := error.__cause__ or error.__context__) is not None and id(cause) not in seen:
    seen.add(id(cause))
    error = cause
  text = " ".join(f"{type(error).__name__}: {error}".split())
  return text if len(text) <= limit else text[:limit] + "..."

def restore_params(exp, workdir: str, use_ema: bool):
  """Parameters of the newest checkpoint in `workdir`, on the experiment's mesh."""
  ckpt = Checkpointer(workdir, keep=1, save_every=1, async_save=False)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f"--workdir={workdir} holds no checkpoint: train first "
                            f"(python -m arjax train --config=... --workdir={workdir})")
  abstract, _ = exp.abstract_state()
  state = ckpt.restore(abstract)
  ckpt.close()
  return (state.ema_params if use_ema else state.params), int(state.step)
