"""Command line: python -m arjax train|sample|eval --config=configs/X.py --workdir=DIR

Config fields are overridden on the command line, e.g. `--config.model.depth=4`
or `--config.sample.cfg_scale=2.0`; unknown fields fail at start.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("train", "sample", "eval")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/digits.py[:smoke].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m arjax {{{'|'.join(COMMANDS)}}} --config=... --workdir=...")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  command, config, workdir = argv[1], _CONFIG.value, _WORKDIR.value
  logging.set_verbosity(logging.WARNING)

  from arjax import configs  # imported late: `--help` stays instant

  try:
    configs.validate(config)
    _run(command, config, workdir)
  except (configs.ConfigError, FileNotFoundError, OSError) as e:
    # Mistakes a user can fix: one line naming the field or path, no traceback.
    sys.exit(f"error: {e}")


def _run(command, config, workdir):
  import jax
  from arjax import train
  from arjax.train import Experiment

  if command == "train":
    state = train.train_and_evaluate(config, workdir)
    print(f"trained to step {int(jax.device_get(state.step))}; checkpoints in {workdir}/checkpoints")
  elif command == "sample":
    from arjax import generate
    result = generate.run(Experiment(config), workdir)
    print(f"{result['num_images']} samples from step {result['step']}: {result['npz']}\n"
          f"grid: {result['png']}")
  elif command == "eval":
    from arjax import evaluate_cli
    report = evaluate_cli.run(config, workdir)
    print(report)


if __name__ == "__main__":
  app.run(main)
