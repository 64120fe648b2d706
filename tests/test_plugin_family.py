"""A family is a plug-in: one registered from the test suite runs every command of the CLI.

tests/toy_family.py defines the "toy_bag" family (tokens independent given class and
position) and registers it with `registry.register_family`; nothing in arjax/ names it. The
CLI loads it from $ARJAX_PLUGINS, and train, sample, eval, bench and describe run on it
unchanged. docs/adding_a_family.md is written from the same file.
"""
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from arjax import registry
from arjax.config import schema as configs
from arjax.errors import ConfigError

from conftest import REPO_ROOT

TESTS = pathlib.Path(__file__).resolve().parent

CONFIG = f'''
import ml_collections
from arjax.config import schema


def get_config():
  config = schema.load({str(REPO_ROOT / "configs/digits.py:smoke")!r})
  config.model = ml_collections.ConfigDict(
      dict(family="toy_bag", width=32, label_drop=0.1, dtype="float32"))
  return config
'''


def _toy_config():
  import toy_family  # noqa: F401  (registers the family)
  config = configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))
  config.model = ml_collections.ConfigDict(
      dict(family="toy_bag", width=32, label_drop=0.1, dtype="float32"))
  return config


def arjax(*args, data_dir, plugins="toy_family"):
  # One CPU device (as tests/test_cli.py): a plug-in's commands need no mesh to be shown working.
  env = dict(os.environ, ARJAX_DATA_DIR=data_dir, PYTHONUNBUFFERED="1", ARJAX_PLUGINS=plugins,
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
  return subprocess.run([sys.executable, "-m", "arjax", *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_arjax_never_names_the_toy_family():
  for path in (REPO_ROOT / "arjax").rglob("*.py"):
    assert "toy_bag" not in path.read_text() and "toy_family" not in path.read_text(), path


def test_the_registered_family_gets_its_own_schema():
  config = _toy_config()
  registry.validate(config)
  config.model.depth = 3  # a causal field: unknown to this family
  with pytest.raises(ConfigError, match=r"config.model.depth: unknown key.*\['model.dtype', "
                                        r"'model.family', 'model.label_drop', 'model.width'\]"):
    registry.validate(config)
  del config.model["depth"]
  config.model.family = "toy_bagg"
  with pytest.raises(ConfigError, match=r"config.model.family='toy_bagg': must be one of "
                                        r"\['causal', 'mar', 'toy_bag', 'xar'\]"):
    registry.validate(config)


def test_a_plugin_module_that_does_not_import_is_named(tmp_path, data_dir):
  (tmp_path / "toy.py").write_text(CONFIG)
  out = arjax("describe", f"--config={tmp_path / 'toy.py'}", data_dir=data_dir,
              plugins="no_such_plugin_module")
  assert out.returncode != 0
  assert "error: ARJAX_PLUGINS: cannot import 'no_such_plugin_module'" in out.stderr


@pytest.mark.slow
def test_train_sample_eval_bench_describe_through_the_cli(tmp_path, data_dir):
  (tmp_path / "toy.py").write_text(CONFIG)
  config = f"--config={tmp_path / 'toy.py'}"
  workdir = f"--workdir={tmp_path / 'run'}"

  out = arjax("train", config, workdir, data_dir=data_dir)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "toy_bag family" in out.stdout and "trained to step 4" in out.stdout

  out = arjax("sample", config, workdir, data_dir=data_dir)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "20 samples from step 4" in out.stdout

  out = arjax("eval", config, workdir, data_dir=data_dir)
  assert out.returncode == 0, out.stdout + out.stderr
  metrics = json.loads((tmp_path / "run" / "eval.json").read_text())
  assert metrics["model"]["num_images"] == 20

  out = arjax("describe", config, data_dir=data_dir)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "toy_bag: MLP 32 over (class, position)" in out.stdout
  # Its FLOPs come from the jaxpr of its own step (it writes no accounting): the backbone of a
  # sampled image is its two 32 x 32 layers on 16 tokens, on both halves of the CFG batch.
  assert "backbone 131 kFLOP" in out.stdout

  for mode in ("train", "sample"):
    report = tmp_path / f"bench_{mode}.json"
    out = arjax("bench", config, f"--mode={mode}", "--repeats=1", "--warmup=0",
                f"--out={report}", data_dir=data_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(report.read_text())["flops_per_call"] > 0

  out = arjax("bench", config, "--mode=decode", "--repeats=1", data_dir=data_dir)
  assert out.returncode != 0 and "has none to time alone" in out.stderr
