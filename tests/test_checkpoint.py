"""Checkpointer: damaged checkpoints fall back to the newest good one, retention never leaves
fewer good checkpoints than it keeps, leftovers of killed runs are never taken for steps, and a
config that does not fit the checkpoint is refused naming parameter, shapes and field.

Real Orbax files on the 8 simulated devices, with a small sharded state (the Checkpointer does
not care what the state is) and a real grain iterator.
"""
import gc
import json
import logging
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from arjax.training import checkpoint
from arjax.config import schema as configs
from arjax.data import pipeline
from conftest import REPO_ROOT


def mesh():
  return jax.sharding.Mesh(np.asarray(jax.devices()).reshape(8), ("data",))


# Wide enough that array chunks are stored in their own data files (OCDBT inlines small values
# into its index), as a real model's are.
WIDTH = 1024


def abstract_state(width=WIDTH):
  sharded, replicated = NamedSharding(mesh(), P("data")), NamedSharding(mesh(), P())
  return {"params": {"w": jax.ShapeDtypeStruct((8, width), jnp.float32, sharding=sharded),
                     "b": jax.ShapeDtypeStruct((width,), jnp.float32, sharding=replicated)},
          "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}


def state_at(step, width=WIDTH):
  rng = np.random.default_rng(step)
  values = {"params": {"w": rng.normal(size=(8, width)).astype(np.float32),
                       "b": rng.normal(size=(width,)).astype(np.float32)},
            "step": np.int32(step)}
  return jax.tree.map(lambda v, a: jax.device_put(v, a.sharding), values, abstract_state(width))


def data_iterator():
  return pipeline.iterate(grain.MapDataset.range(10_000).batch(4), worker_count=0)


def save_steps(workdir, steps, *, keep=10, every=2):
  """Checkpoints `steps`, the data iterator one batch further per step, as training would."""
  ckpt = checkpoint.Checkpointer(str(workdir), keep=keep, save_every=every)
  it = data_iterator()
  for step in range(1, max(steps) + 1):
    next(it)
    if step in steps:
      ckpt.save(step, state_at(step), it, force=True)
  ckpt.close()


def step_dir(workdir, step):
  return os.path.join(str(workdir), "checkpoints", str(step))


def files_under(path):
  return sorted(os.path.relpath(os.path.join(d, n), path)
                for d, _, names in os.walk(path) for n in names)


def largest_array_file(step_path):
  files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_path, "state"))
           for n in names if os.sep + "d" + os.sep in os.path.join(d, n)]
  return max(files, key=os.path.getsize)


def truncate_array_file(path):
  target = largest_array_file(path)
  with open(target, "r+b") as f:
    f.truncate(os.path.getsize(target) // 2)


def garble_array_file(path):
  target = largest_array_file(path)
  size = os.path.getsize(target)
  with open(target, "wb") as f:
    f.write(np.random.default_rng(0).bytes(size))


def delete_tree_metadata(path):
  os.remove(os.path.join(path, "state", "_METADATA"))


def delete_array_index(path):
  os.remove(os.path.join(path, "state", "manifest.ocdbt"))


def garble_data_position(path):
  with open(os.path.join(path, "data_iter", "metadata"), "w") as f:
    f.write('{"next_index": ')


# Once one read fails, Orbax abandons its concurrent reads of the other arrays; the reports
# Python makes of them (hundreds of tracebacks) would bury the warning, and must not leak.
no_leaked_reports = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


@no_leaked_reports
@pytest.mark.parametrize("damage", [truncate_array_file, garble_array_file, delete_tree_metadata,
                                    delete_array_index, garble_data_position])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_good_one(tmp_path, caplog, damage):
  save_steps(tmp_path, {2, 4, 6})
  damage(step_dir(tmp_path, 6))
  damaged_files = files_under(step_dir(tmp_path, 6))

  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=10, save_every=2)
  it = data_iterator()
  with caplog.at_level(logging.WARNING):
    state = ckpt.restore(abstract_state(), it)
  assert int(state["step"]) == 4
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_at(4))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert it.get_state() == {"next_index": 4}
  # The warning names the bad step and where it went; its files are all kept there.
  warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert "checkpoint step 6 in" in warning and "unreadable" in warning
  assert f"moved aside to {step_dir(tmp_path, 6)}.corrupt" in warning
  assert "resuming from step 4" in warning
  gc.collect()  # the abandoned reads are reported when collected: none may be
  assert not [r for r in caplog.records if r.name == "asyncio"]
  assert files_under(step_dir(tmp_path, 6) + ".corrupt") == damaged_files
  assert checkpoint.committed_steps(ckpt.directory) == [2, 4]
  # Training carries on: step 6 is saved again.
  assert ckpt.save(6, state_at(6), it)
  ckpt.close()
  assert checkpoint.committed_steps(ckpt.directory) == [2, 4, 6]


@no_leaked_reports
def test_when_no_checkpoint_reads_nothing_is_moved_and_the_error_names_every_step(tmp_path):
  save_steps(tmp_path, {2, 4})
  truncate_array_file(step_dir(tmp_path, 2))
  delete_tree_metadata(step_dir(tmp_path, 4))
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=10, save_every=2)
  with pytest.raises(checkpoint.NoReadableCheckpointError,
                     match=r"could be restored \(nothing was moved\): step 4: .*; step 2: "):
    ckpt.restore(abstract_state(), data_iterator())
  assert sorted(os.listdir(ckpt.directory)) == ["2", "4"]


def test_old_checkpoints_are_deleted_only_once_newer_ones_are_committed_and_complete(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, save_every=2)
  it = data_iterator()
  ckpt.save(2, state_at(2), it)
  ckpt.save(4, state_at(4), it)
  # Step 4 is being written in the background: step 2 stays until 4 is committed.
  assert 2 in checkpoint.committed_steps(ckpt.directory)
  ckpt.wait()
  assert checkpoint.committed_steps(ckpt.directory) == [2, 4]
  # Step 4 turns out damaged (incomplete): saving 6 deletes nothing, as 2 is the newest
  # checkpoint known to be complete.
  delete_tree_metadata(step_dir(tmp_path, 4))
  ckpt.save(6, state_at(6), it)
  ckpt.wait()
  assert checkpoint.committed_steps(ckpt.directory) == [2, 4, 6]
  # Once 6 is committed and complete, older ones go; nothing is left half-deleted.
  ckpt.close()
  assert sorted(os.listdir(ckpt.directory)) == ["6"]


def test_leftovers_of_a_killed_run_are_never_taken_for_checkpoints_and_are_cleaned_up(tmp_path):
  save_steps(tmp_path, {2, 4})
  directory = os.path.join(str(tmp_path), "checkpoints")
  # A save killed mid-write, and a deletion killed after its rename: partial copies of step 4.
  shutil.copytree(os.path.join(directory, "4"), os.path.join(directory, "6.orbax-checkpoint-tmp"))
  os.rename(os.path.join(directory, "2"), os.path.join(directory, "2.deleting"))
  os.remove(os.path.join(directory, "2.deleting", "state", "_METADATA"))

  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, save_every=2)
  assert ckpt.latest_step() == 4
  it = data_iterator()
  assert int(ckpt.restore(abstract_state(), it)["step"]) == 4
  ckpt.save(6, state_at(6), it)
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["4", "6"]


def smoke_config(width):
  config = configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))
  config.model.width = width
  return config


def test_a_checkpoint_that_does_not_fit_is_refused_naming_parameter_shapes_and_field(tmp_path):
  save_steps(tmp_path, {2, 4})
  with open(os.path.join(str(tmp_path), "config.json"), "w") as f:
    f.write(smoke_config(32).to_json_best_effort())
  expected = (r"checkpoint \S+/checkpoints/4 does not fit the config: params/b has shape "
              r"\(1024,\) in the checkpoint but \(1536,\) with this config \(and 1 more "
              r"arrays differ\); probably because config.model.width=48 \(32 in "
              r"\S+/config.json\)")
  with pytest.raises(checkpoint.CheckpointMismatchError, match=expected):
    checkpoint.check_fits(str(tmp_path), abstract_state(width=1536), smoke_config(48))
  # A mismatch is the config's fault, not the files': restore refuses too, and moves nothing.
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, save_every=2)
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"params/b has shape \(1024,\)"):
    ckpt.restore(abstract_state(width=1536))
  assert sorted(os.listdir(ckpt.directory)) == ["2", "4"]
  # Another parameter tree (e.g. a deeper model) is named by the path that differs.
  deeper = abstract_state()
  deeper["params"]["w2"] = deeper["params"]["w"]
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"params/w2 \(8, 1024\) is built by this config but absent from the "
                           r"checkpoint"):
    checkpoint.check_fits(str(tmp_path), deeper)
  checkpoint.check_fits(str(tmp_path), abstract_state())  # the right config passes


def test_config_fields_are_compared_with_the_run_that_wrote_the_workdir(tmp_path):
  assert checkpoint.differing_shape_fields(str(tmp_path), smoke_config(32)) is None
  written = smoke_config(32)
  written.train.learning_rate = 0.5  # not a shape: not listed
  with open(os.path.join(str(tmp_path), "config.json"), "w") as f:
    f.write(written.to_json_best_effort())
  assert checkpoint.differing_shape_fields(str(tmp_path), smoke_config(32)) == []
  current = smoke_config(48)
  current.data.num_classes = 12
  path = os.path.join(str(tmp_path), "config.json")
  assert checkpoint.differing_shape_fields(str(tmp_path), current) == [
      f"config.data.num_classes=12 (10 in {path})", f"config.model.width=48 (32 in {path})"]
  json.loads(open(path).read())  # untouched
