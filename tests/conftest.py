"""Test-wide set-up: 8 simulated CPU devices, so meshes and shardings are real.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before
anything imports jax.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache shared by the tests and the `python -m arjax` processes they
# start (through the environment): many tests compile the same smoke-size step, and on two
# cores compiling is most of their time. A cached executable is the very binary a fresh
# compile gives, so no number changes. A truncated entry (a test kills a process mid-write)
# is reported by JAX and recompiled.
_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# One BLAS thread per process (numpy/scipy's OpenBLAS; XLA has its own pool): `make test` runs
# two workers on two cores, and OpenBLAS's threads spin against each other under that load,
# which made a 2048-d FID's eigvals take 29 s instead of 2.7 s and eigh 8.5 s instead of
# 1.4 s (2026-12-08). Set before numpy loads; the subprocesses the tests start inherit it.
for _blas in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
  os.environ.setdefault(_blas, "1")
# Keep TFDS quiet and off the network: nothing in the tests may download.
os.environ.setdefault("TFDS_DISABLE_GCS", "1")

# Freed host memory stays in the process, as `python -m arjax` keeps it (arjax/parallel/host_allocator.py):
# without it every large XLA:CPU temporary is page-faulted in afresh on every call.
from arjax.parallel import host_allocator  # noqa: E402

host_allocator.keep_freed_memory()

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Reference outputs of official code (../shared/golden/README*.md); ARJAX_GOLDEN_DIR overrides.
GOLDEN_DIR = pathlib.Path(
    os.environ.get("ARJAX_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))


def golden_files(pattern):
  """Every golden file matching `pattern` (e.g. 'mar_*.npz'), sorted; none if the folder is absent."""
  return sorted(GOLDEN_DIR.glob(pattern)) if GOLDEN_DIR.is_dir() else []


def golden_cases(pattern):
  """One test id per golden file (its name in the id); a clean skip when the folder has none."""
  return [pytest.param(p, id=p.name) for p in golden_files(pattern)] or [pytest.param(
      None, id="no-golden-files",
      marks=pytest.mark.skip(reason=f"no {pattern} in {GOLDEN_DIR} (set ARJAX_GOLDEN_DIR)"))]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One prepared TFDS data dir shared by every test of the session."""
  from arjax.data import pipeline

  path = tmp_path_factory.mktemp("tensorflow_datasets")
  pipeline.prepare("digits", str(path))
  return str(path)


@pytest.fixture(scope="session")
def smoke_run(data_dir, tmp_path_factory):
  """digits.py:smoke trained SMOKE_RUN_STEPS steps in a fresh workdir: (config, workdir, state).

  Shared by tests that only read it (a second run to compare with, a workdir that refused
  requests must leave alone); none may write into it.
  """
  from arjax.config import schema as configs
  from arjax.training import loop as train

  config = configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))
  config.data.data_dir = data_dir
  workdir = str(tmp_path_factory.mktemp("smoke_run"))
  state = train.train_and_evaluate(config, workdir, stop_after=SMOKE_RUN_STEPS)
  return config, workdir, state


SMOKE_RUN_STEPS = 3
