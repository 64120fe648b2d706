"""What a person reads: progress reports that stay readable in a log, the start-up summary, and
errors that name the offending field or path and say how to fix it."""
import os
import re
import subprocess
import sys

import pytest

from arjax import registry
from arjax.config import schema as configs
from arjax.util import progress
from conftest import REPO_ROOT


def smoke(**overrides):
  config = configs.load(str(REPO_ROOT / "configs" / "digits.py") + ":smoke")
  for dotted, value in overrides.items():
    section, field = dotted.split("__")
    config[section][field] = value
  return config


# -----------------------------------------------------------------------------
# Progress reports.


def test_progress_in_a_log_file_is_whole_lines_with_count_rate_and_postfix(monkeypatch, capsys):
  monkeypatch.setenv(progress.MODE_ENV, "lines")
  monkeypatch.setenv(progress.SECONDS_ENV, "0")
  report = progress.bar(4, desc="train", unit="step")
  assert isinstance(report, progress.LogLines)
  for _ in range(4):
    report.update(1)
    report.set_postfix({"loss": "0.5000"})
  report.close()
  lines = capsys.readouterr().err.splitlines()
  # At once: the loop has begun. The first step carries the compile: its time is said apart
  # and no rate counts it.
  assert lines[0] == "train: 0/4 steps (0%), starting"
  assert re.fullmatch(r"train: first step done after \d+\.\d s \(compiling included\)", lines[1])
  assert lines[2].startswith("train: 2/4 steps (50%), ")
  assert "steps/s" in lines[2] and "eta" in lines[2]
  assert lines[-1].startswith("train: 4/4 steps (100%)") and lines[-1].endswith("loss 0.5000")
  assert len(lines) == 5


def test_progress_mode_follows_the_terminal_and_the_environment(monkeypatch):
  monkeypatch.delenv(progress.MODE_ENV, raising=False)
  # pytest's captured stderr is not a terminal.
  assert progress.mode() == "lines"
  monkeypatch.setenv(progress.MODE_ENV, "bars")
  with pytest.raises(ValueError, match=r"\$ARJAX_PROGRESS='bars': must be one of"):
    progress.mode()


# -----------------------------------------------------------------------------
# The start-up summary of `train`.


def test_train_says_what_it_runs_on_before_compiling_and_whether_it_resumes(
    tmp_path, data_dir, capsys):
  from arjax.training import loop as train

  config = smoke(data__data_dir=data_dir, train__sample_every=0)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir, stop_after=1)
  out, err = capsys.readouterr()
  summary = out[out.index("arjax train"):]
  assert "8 cpu devices (cpu) in 1 process; mesh data 8 x fsdp 1 x tensor 1" in summary
  assert "parameters  46.5k" in summary
  assert "MFLOP per train step" in summary
  assert "split 'train': 1347 examples; batch 16 x 4 steps = 0.0475 epochs" in summary
  assert f"workdir     {workdir}: fresh start (no checkpoint)" in summary
  assert "\r" not in err  # stderr is no terminal here: progress comes as whole lines

  train.train_and_evaluate(config, workdir, stop_after=1)
  out, _ = capsys.readouterr()
  assert f"resuming from checkpoint step 1 in {workdir}/checkpoints" in out


# -----------------------------------------------------------------------------
# Errors with the fix in them.


def test_an_override_naming_no_field_fails_with_the_nearest_field_and_no_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "arjax", "train", "--config=configs/digits.py:smoke",
       f"--workdir={tmp_path}", "--config.model.dept=3"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  assert ("error: --config.model.dept: config.model has no field 'dept'; did you mean "
          "--config.model.depth?") in result.stderr
  assert os.listdir(tmp_path) == []


def test_an_unknown_key_in_a_config_names_the_nearest_field():
  config = smoke()
  config.model.dept = 4
  with pytest.raises(configs.ConfigError, match=r"config.model.dept: unknown key \(did you mean "
                     r"config.model.depth\?\)"):
    registry.validate(config)


def test_a_batch_the_devices_do_not_divide_names_the_field_and_the_multiples_that_fit():
  from arjax.training.experiment import Experiment

  with pytest.raises(configs.ConfigError) as e:
    Experiment(smoke(train__global_batch_size=12, mesh__shape=(1, 8, 1)))
  message = str(e.value)
  assert "config.train.global_batch_size=12" in message
  assert "a multiple of 8 (nearest: 8 or 16)" in message and "config.mesh.shape" in message


def test_a_mesh_for_other_devices_says_how_to_fill_the_devices_present():
  from arjax.parallel import sharding

  with pytest.raises(configs.ConfigError, match=r"needs 16 devices, 8 are present: give one axis "
                     r"-1 .* --config.mesh.shape='\(-1,1,1\)'"):
    sharding.mesh_shape((8, 2, 1), 8)


def test_a_dataset_not_prepared_says_how_to_prepare_it_or_where_to_point(tmp_path):
  from arjax.data import pipeline

  with pytest.raises(FileNotFoundError) as e:
    pipeline.prepare("mnist", str(tmp_path))
  message = str(e.value)
  assert f"tfds build mnist --file_format=array_record --data_dir={tmp_path}" in message
  assert "--config.data.data_dir=DIR or $ARJAX_DATA_DIR=DIR" in message


def test_sample_and_eval_on_an_empty_workdir_say_which_command_to_run_first(tmp_path, data_dir):
  from arjax.commands import eval as evaluate_cli
  from arjax.commands import sample as generate
  from arjax.training.experiment import Experiment

  workdir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"holds no checkpoint: train first \(python -m "
                     rf"arjax train --config=\.\.\. --workdir={workdir}\)"):
    generate.restore_params(Experiment(smoke()), workdir, use_ema=True)
  with pytest.raises(FileNotFoundError) as e:
    evaluate_cli.run(smoke(data__data_dir=data_dir), workdir)
  message = str(e.value)
  assert f"python -m arjax train --config=CONFIG --workdir={workdir}" in message
  assert f"python -m arjax sample --config=CONFIG --workdir={workdir}" in message
  # A workdir that was trained only needs `sample`.
  os.makedirs(os.path.join(workdir, "checkpoints", "4"))
  with pytest.raises(FileNotFoundError) as e:
    evaluate_cli.run(smoke(data__data_dir=data_dir), workdir)
  assert "train" not in str(e.value).split("does not exist")[1]
