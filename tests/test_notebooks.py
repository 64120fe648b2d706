"""Every notebook in notebooks/ runs top to bottom, headless, at a smoke size.

Each notebook is executed with nbclient in an IPython kernel of this interpreter that imports
this checkout's arjax, from the notebooks/ folder (as Jupyter runs it), with papermill's
convention: a cell inserted after the one tagged "parameters" overrides its values with
`smoke_parameters` below. A cell error fails the test with the cell's source and traceback.
The committed notebooks carry no outputs and are exactly what their builders write.
"""
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from conftest import REPO_ROOT

NOTEBOOKS = REPO_ROOT / "notebooks"
NOTEBOOK_NAMES = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
KERNEL_NAME = "arjax-tests"


def smoke_parameters(name: str, tmp_path, data_dir: str) -> dict:
  """Values for the parameters cell of notebooks/<name>.ipynb: seconds, not minutes."""
  workdir = str(tmp_path / "workdir")
  if name == "quickstart":
    return dict(CONFIG="configs/digits.py:smoke", TRAIN_STEPS=4, WORKDIR=workdir,
                DATA_DIR=data_dir, IMAGES_PER_CLASS=2, CFG_SCALES=[1.0, 4.0],
                TEMPERATURES=[0.5, 1.0])
  if name == "sampling_and_guidance":
    return dict(CONFIG="configs/digits.py:smoke", WORKDIR=workdir, TRAIN_STEPS=4,
                DATA_DIR=data_dir, IMAGES_PER_CLASS=1, ODE_STEPS=[2], SOLVERS=["euler", "heun"],
                CFG_SCALES=[1.0, 3.0], CFG_INTERVALS=[(0.0, 1.0), (0.5, 1.0)],
                TEMPERATURES=[0.5], PER_CLASS=1)
  if name == "pretrained_mar":
    return dict(MAR_CHECKPOINT=None, VAE_CHECKPOINT=None, OUT=workdir)
  raise KeyError(f"notebooks/{name}.ipynb has no smoke parameters: add them to "
                 "smoke_parameters in tests/test_notebooks.py")


# What each notebook must print at smoke size, beyond running without an error.
EXPECTED_OUTPUT = {
    "quickstart": "at step 4 after",
    "sampling_and_guidance": "same seed, same images: True",
    "pretrained_mar": "Skipping: no MAR checkpoint given",
}


def with_parameters(nb, values: dict):
  """Papermill's injection: a cell after the "parameters" cell assigning `values`."""
  [index] = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  source = "# Parameters injected by tests/test_notebooks.py\n" + "".join(
      f"{name} = {value!r}\n" for name, value in values.items())
  injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(index + 1, injected)
  return nb


@pytest.fixture(scope="module")
def kernel_manager_factory(tmp_path_factory):
  """KernelManagers of a kernel spec that runs this interpreter (whatever `python3` is on the
  PATH or in ~/.local/share/jupyter) on this checkout, with the tests' environment (simulated
  devices, the shared compilation cache)."""
  spec_root = tmp_path_factory.mktemp("kernels")
  (spec_root / KERNEL_NAME).mkdir()
  env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                     os.environ.get("PYTHONPATH")]))}
  for name in ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR",
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "TFDS_DISABLE_GCS"):
    if name in os.environ:
      env[name] = os.environ[name]
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "arjax tests", "language": "python", "env": env}
  (spec_root / KERNEL_NAME / "kernel.json").write_text(json.dumps(spec))
  specs = KernelSpecManager(kernel_dirs=[str(spec_root)])
  # Unix sockets in a folder of their own, not TCP ports: parallel workers (pytest -n) cannot
  # pick the same port between choosing it and the kernel binding it. The folder is short
  # (tempfile's, not tmp_path): a socket path may not exceed ~100 characters.
  sockets = tempfile.mkdtemp(prefix="arjax-kernels-")
  yield lambda: KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs,
                              transport="ipc", ip=tempfile.mkdtemp(dir=sockets) + "/kernel")
  shutil.rmtree(sockets, ignore_errors=True)


def _plain(text: str) -> str:
  return re.sub(r"\x1b\[[0-9;]*m", "", text)  # IPython colours its tracebacks


def _failure(name: str, nb, error: CellExecutionError) -> str:
  for index, cell in enumerate(nb.cells):
    for output in cell.get("outputs", []):
      if output.get("output_type") == "error":
        return (f"notebooks/{name}.ipynb: cell {index} raised {output['ename']}\n"
                f"--- cell source ---\n{cell.source}\n--- traceback ---\n"
                + _plain("\n".join(output["traceback"])))
  return f"notebooks/{name}.ipynb failed:\n{_plain(str(error))}"


def run_notebook(name: str, values: dict, kernel_manager):
  nb = with_parameters(nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4), values)
  client = NotebookClient(nb, km=kernel_manager, timeout=600, startup_timeout=120,
                          resources={"metadata": {"path": str(NOTEBOOKS)}})
  try:
    client.execute()
  except CellExecutionError as e:
    pytest.fail(_failure(name, nb, e), pytrace=False)
  return nb


def text_of(cell) -> str:
  parts = []
  for output in cell.get("outputs", []):
    if output.get("output_type") == "stream":
      parts.append(output["text"])
    elif "text/plain" in output.get("data", {}):
      parts.append(output["data"]["text/plain"])
  return "".join(parts)


def has_image(cell) -> bool:
  return any("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


def check_quickstart(nb, values):
  """The loss curve is read from the smoke run's workdir: every step logged, finite losses."""
  from arjax.training.tensorboard_scalars import read_scalars

  steps, loss = read_scalars(values["WORKDIR"])["train/loss"]
  assert list(steps) == [1, 2, 3, 4]  # configs/digits.py:smoke logs every step
  assert all(0 < v < 10 for v in loss), loss
  [curve] = [c for c in nb.cells if 'scalars["train/loss"]' in c.source]
  assert has_image(curve)


def check_sampling_and_guidance(nb, values):
  """With no checkpoint in WORKDIR, the notebook trained its own model there first."""
  from arjax.training import checkpoint

  assert checkpoint.committed_steps(checkpoint.checkpoint_dir(values["WORKDIR"])) == [2, 4]


EXTRA_CHECKS = {"quickstart": check_quickstart,
                "sampling_and_guidance": check_sampling_and_guidance}


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_runs_top_to_bottom_at_smoke_size(name, tmp_path, data_dir,
                                                    kernel_manager_factory):
  values = smoke_parameters(name, tmp_path, data_dir)
  nb = run_notebook(name, values, kernel_manager_factory())

  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code), "a code cell did not run"
  printed = "".join(text_of(c) for c in code)
  assert EXPECTED_OUTPUT[name] in printed, printed[-3000:]
  # Every figure a cell shows arrived as an image (the loss curve, the grids).
  for cell in code:
    if "plt.show()" in cell.source:
      assert has_image(cell), f"no image from the cell:\n{cell.source}"
  EXTRA_CHECKS.get(name, lambda nb, values: None)(nb, values)


def test_every_notebook_has_smoke_parameters_and_one_parameters_cell(tmp_path):
  assert {"quickstart", "sampling_and_guidance", "pretrained_mar"} <= set(NOTEBOOK_NAMES)
  for name in NOTEBOOK_NAMES:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}.ipynb: {len(tagged)} cells tagged 'parameters'"
    assigned = set(re.findall(r"^([A-Z_][A-Z0-9_]*) =", tagged[0].source, re.M))
    overridden = set(smoke_parameters(name, tmp_path, "DATA_DIR"))
    assert overridden <= assigned, f"{name}.ipynb does not define {overridden - assigned}"
    assert name in EXPECTED_OUTPUT
    # The first code cell sets up Colab (and finds the repository) before anything else.
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert '"google.colab" in sys.modules' in first_code.source


def _builder(name: str):
  path = NOTEBOOKS / f"build_{name}.py"
  assert path.is_file(), f"notebooks/{name}.ipynb has no builder notebooks/build_{name}.py"
  sys.path.insert(0, str(NOTEBOOKS))  # the builders import notebooks/notebook_builder.py
  try:
    spec = importlib.util.spec_from_file_location(f"build_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(NOTEBOOKS))
  return module


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_committed_notebook_is_what_its_builder_writes_without_outputs(name):
  module = _builder(name)
  import notebook_builder  # noqa: E402  (loaded by the builder, from notebooks/)

  committed = (NOTEBOOKS / f"{name}.ipynb").read_text()
  assert committed == notebook_builder.dumps(notebook_builder.notebook(module.CELLS)), (
      f"notebooks/{name}.ipynb differs from its builder: run python notebooks/build_{name}.py")
  for cell in json.loads(committed)["cells"]:
    assert not cell.get("outputs") and cell.get("execution_count") is None
