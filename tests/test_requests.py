"""Bad sampling requests through the library API, and a too-full disk, fail early and clearly.

Each refusal is a ValueError (or, for the disk, an OSError) naming the argument, raised before
anything is compiled, and an existing workdir (a real trained one) is left byte for byte as
it was.
"""
import hashlib
import os
import shutil

import jax
import numpy as np
import pytest

from arjax.config import schema as configs
from arjax.training import state as train_state
from arjax.training.experiment import Experiment
from arjax.families.masked.sampler import MarSampler
from arjax.families.causal.sampler import Sampler
from arjax.training.workdir import DiskSpaceError, check_free_space, free_bytes
from conftest import REPO_ROOT


def snapshot(workdir: str) -> dict:
  """{relative path: sha256} of every file under `workdir`."""
  digests = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digests[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return digests


@pytest.fixture(scope="module")
def samplers():
  """The causal and the MAR sampler of the smoke configs (10 classes), never compiled."""
  causal = Experiment(configs.load(str(REPO_ROOT / "configs/digits.py:smoke")))
  mar = Experiment(configs.load(str(REPO_ROOT / "configs/digits_mar.py:smoke")))
  return {"causal": causal.sampler(), "mar": mar.sampler()}


class Compilations:
  """Counts XLA backend compilations while active (jax.monitoring's compile-time event)."""

  def __enter__(self):
    self.count = 0
    self._listener = lambda event, duration, **kw: self._seen(event)
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def _seen(self, event):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)


BAD_REQUESTS = [
    # (what is wrong, labels, keyword arguments, the message)
    ("label >= num_classes", [0, 10, 3], {}, r"labels: class ids must lie in \[0, 10\); got 10 "
     r"at index 1 \(1 out of range\)"),
    ("the null class", [10], {}, r"labels: class ids must lie in \[0, 10\); got 10"),
    ("negative label", [-1, 2, -3], {}, r"labels: class ids must lie in \[0, 10\); got -1 at "
     r"index 0 \(2 out of range\)"),
    ("empty request", [], {}, r"labels: empty request \(0 images\)"),
    ("float labels", [1.5], {}, r"labels: expected integer class ids, got dtype float64"),
    ("2-D labels", [[1, 2]], {}, r"labels: expected a 1-D array of class ids, got shape \(1, 2\)"),
    ("cfg_scale < 0", [1], {"cfg_scale": -0.5}, r"cfg_scale=-0.5: must be finite and >= 0"),
    ("cfg_scale NaN", [1], {"cfg_scale": float("nan")}, r"cfg_scale=nan: must be finite"),
    ("temperature 0", [1], {"temperature": 0.0}, r"temperature=0.0: must be finite and > 0"),
    ("temperature < 0", [1], {"temperature": -1}, r"temperature=-1: must be finite and > 0"),
    ("negative first_index", [1], {"first_index": -4}, r"first_index=-4: must be an integer >= 0"),
    ("unknown schedule", [1], {"cfg_scale": 2.0, "cfg_schedule_name": "cosine"},
     r"cfg_schedule='cosine'; known: 'constant', 'linear'"),
]


@pytest.mark.parametrize("family", ["causal", "mar"])
def test_bad_requests_fail_naming_the_argument_before_compiling(samplers, smoke_run, family):
  _, workdir, state = smoke_run
  before = snapshot(workdir)
  sampler, rng = samplers[family], jax.random.PRNGKey(0)
  params = state.params if family == "causal" else None  # never looked at: refused first
  for what, labels, kwargs, message in BAD_REQUESTS:
    with Compilations() as compiled, pytest.raises(ValueError, match=message):
      sampler(params, np.asarray(labels), rng, **kwargs)
    assert compiled.count == 0, what
  assert snapshot(workdir) == before
  with Compilations() as compiled:  # the counter does see a compilation
    jax.jit(lambda x: x * 3 + 1)(np.float32(2))
  assert compiled.count == 1


def test_bad_step_counts_fail_when_the_sampler_is_built(samplers):
  causal, mar = samplers["causal"], samplers["mar"]
  for steps in (0, -3):
    with pytest.raises(ValueError, match=rf"num_steps={steps}: must be > 0"):
      Sampler(causal.model, causal.head, causal.tokenizer, num_steps=steps)
  with pytest.raises(ValueError, match=r"num_steps=None: expected an integer > 0$"):
    Sampler(causal.model, causal.head, causal.tokenizer, num_steps=None)
  for num_iter in (0, -1, 2.5):
    with pytest.raises(ValueError, match=rf"num_iter={num_iter}: must be an integer > 0"):
      MarSampler(mar.model, mar.head, mar.tokenizer, num_iter=num_iter, num_steps=2)
  with pytest.raises(ValueError, match=r"num_steps=0: must be > 0"):
    MarSampler(mar.model, mar.head, mar.tokenizer, num_iter=4, num_steps=0)


# -----------------------------------------------------------------------------
# The disk.


def test_a_states_bytes_are_counted_from_its_abstract_shapes(smoke_run):
  config, _, state = smoke_run
  abstract, _ = Experiment(config).abstract_state()
  estimate = train_state.state_nbytes(abstract)
  assert estimate == sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  # Parameters, EMA and two Adam moments: four float32 copies of the parameters, and a little.
  params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
  assert 16 * params <= estimate <= 16 * params + 1024


def test_too_little_free_space_fails_naming_workdir_free_and_needed_bytes(smoke_run, tmp_path):
  _, workdir, _ = smoke_run
  before = snapshot(workdir)
  free = free_bytes(workdir)
  assert free == shutil.disk_usage(workdir).free > 0
  needed = free + 2 ** 40  # a terabyte more than there is
  with pytest.raises(DiskSpaceError) as error:
    check_free_space(workdir, needed)
  message = str(error.value)
  assert message.startswith(f"--workdir={workdir}: its filesystem has ")
  assert " bytes free (" in message and f", but {needed} bytes (" in message
  assert message.endswith(" TiB) are needed for one checkpoint; free some space or choose "
                          "another --workdir")
  free_said = int(message.split("its filesystem has ")[1].split(" bytes free")[0])
  assert abs(free_said - free) < 2 ** 30  # the same disk, give or take what others wrote
  assert isinstance(error.value, OSError)  # the CLI reports OSErrors in one line
  assert snapshot(workdir) == before
  # Enough space: the free bytes are returned, nothing is written either.
  assert check_free_space(workdir, 1) > 0
  assert snapshot(workdir) == before
  # A workdir yet to be made is judged by the filesystem it would be made on, and not made.
  fresh = str(tmp_path / "not" / "yet")
  with pytest.raises(DiskSpaceError, match=rf"--workdir={fresh}: its filesystem has") as error:
    check_free_space(fresh, needed, what="the samples")
  assert "are needed for the samples" in str(error.value)
  assert not os.path.exists(tmp_path / "not")
  with pytest.raises(ValueError, match=r"needed_bytes=-1: expected an integer >= 0"):
    check_free_space(workdir, -1)


@pytest.mark.parametrize("workdir", ["gs://bucket/run", "s3://bucket/run"])
def test_a_url_workdir_is_refused_before_anything_is_made(workdir, tmp_path, monkeypatch):
  from arjax.training.workdir import check_workdir

  monkeypatch.chdir(tmp_path)
  with pytest.raises(OSError, match="not URLs; mount the bucket"):
    check_workdir(workdir)
  assert os.listdir(tmp_path) == []  # no local 'gs:' directory


def test_training_refuses_a_workdir_without_room_for_its_checkpoints(tmp_path, data_dir):
  from arjax.training import loop as train

  config = configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))
  config.data.data_dir = data_dir
  # ~10^14 bytes of state (traced abstractly, never allocated): more than any test disk holds.
  config.model.width, config.model.depth = 2**16, 64
  workdir = tmp_path / "run"
  with pytest.raises(DiskSpaceError, match="needed for two checkpoints of the train state"):
    train.train_and_evaluate(config, str(workdir))
  assert os.listdir(workdir) == []  # checked before config.json, TensorBoard or checkpoints
