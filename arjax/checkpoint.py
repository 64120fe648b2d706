"""Orbax checkpoints of the train state and the grain iterator, as two items of one step.

Layout: `workdir/checkpoints/<step>/{state,data_iter}`. Saves are asynchronous
(training goes on while the previous step's arrays are written) and atomic: Orbax
writes into a temporary directory and renames it once complete, so a step
directory that exists is a finished one. Restore puts every array onto the
shardings of the *current* mesh, whatever mesh and however many processes wrote
it: the state is an Orbax PyTree (every process writes its own shards) and the
data position is one small JSON item that does not depend on the process count.
A checkpoint without a data item (e.g. one made by `python -m arjax convert`)
resumes the data at batch `state.step`: every step consumes one batch.
"""
import logging
import os
from typing import Optional

import orbax.checkpoint as ocp

from arjax.data import pipeline


class Checkpointer:
  def __init__(self, workdir: str, *, keep: int, save_every: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data_iter"), options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    """Saves when `step` is on the save interval (or `force`); returns whether it did."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=pipeline.iterator_save_args(data_iter)), force=force)

  def restore(self, abstract_state, data_iter=None, step: Optional[int] = None):
    """Restores the state onto `abstract_state`'s shardings, and `data_iter` in place."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    has_data_item = os.path.isdir(os.path.join(self.directory, str(step), "data_iter"))
    if data_iter is not None and has_data_item:
      items["data_iter"] = pipeline.iterator_restore_args()
    logging.info("restoring checkpoint %d from %s", step, self.directory)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = restored["state"]
    if data_iter is not None:
      position = restored["data_iter"] if has_data_item else int(state.step)
      pipeline.set_iterator_position(data_iter, position)
    return state

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
