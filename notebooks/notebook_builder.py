"""What every notebook builder in notebooks/ shares: the Colab set-up cell, cells, writing.

Each `build_<name>.py` holds one notebook's cells as strings and calls `write` to produce
`<name>.ipynb` (nbformat 4, no outputs) when run (`python notebooks/build_<name>.py`), so a
notebook's code is reviewed and diffed as Python. tests/test_notebooks.py executes every notebook
with the cell tagged "parameters" overridden (papermill's convention) and checks that the
committed files are what the builders write.
"""
import json
import os

# The repository Colab clones. Colab opens a notebook from GitHub but not the repository around
# it, and the configs/ the notebooks read live there, not in the installed package.
ARJAX_GIT = "https://github.com/OWNER/arjax.git"

SETUP = f"""\
# In Colab: clone arjax (the configs and notebooks come with the repository) and install it.
# Elsewhere (Jupyter in a checkout, after `pip install -e .` or `make install`): nothing to do.
import os
import subprocess
import sys

ARJAX_GIT = "{ARJAX_GIT}"
if "google.colab" in sys.modules:
  if not os.path.isdir("/content/arjax"):
    subprocess.run(["git", "clone", "--depth=1", ARJAX_GIT, "/content/arjax"], check=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "/content/arjax"], check=True)
  os.chdir("/content/arjax/notebooks")

# The repository root: Jupyter runs a notebook in its folder (notebooks/); also accept the root.
REPO = next((p for p in (os.getcwd(), os.path.dirname(os.getcwd()))
             if os.path.isfile(os.path.join(p, "configs", "digits.py"))), None)
if REPO is None:
  raise FileNotFoundError(f"configs/digits.py is neither in {{os.getcwd()}} nor in its parent: "
                          "start Jupyter in the arjax repository or its notebooks/ folder")

# On a CPU runtime, keep freed host memory in the process, as `python -m arjax` does (before
# JAX runs anything; see arjax/parallel/host_allocator.py): a train step is up to 2x faster.
from arjax.parallel import host_allocator
host_allocator.keep_freed_memory()"""

PARAMETERS_TAG = "parameters"


def cell(kind: str, text: str, tags=()) -> dict:
  out = {"cell_type": kind, "metadata": {"tags": list(tags)} if tags else {},
         "source": text.splitlines(keepends=True)}
  if kind == "code":
    out.update(execution_count=None, outputs=[])
  return out


def markdown(text: str) -> dict:
  return cell("markdown", text)


def code(text: str) -> dict:
  return cell("code", text)


def parameters(text: str) -> dict:
  """The one cell a test (or papermill) overrides: plain assignments, nothing derived."""
  return cell("code", text, tags=[PARAMETERS_TAG])


def notebook(cells: list) -> dict:
  cells = [dict(c, id=f"cell-{i}") for i, c in enumerate(cells)]  # nbformat 4.5: stable ids
  return {
      "nbformat": 4,
      "nbformat_minor": 5,
      "metadata": {
          "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
          "language_info": {"name": "python"},
      },
      "cells": cells,
  }


def dumps(nb: dict) -> str:
  return json.dumps(nb, indent=1) + "\n"


def write(name: str, cells: list) -> str:
  """Writes notebooks/<name>.ipynb; returns its path."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.ipynb")
  with open(path, "w") as f:
    f.write(dumps(notebook(cells)))
  return path
