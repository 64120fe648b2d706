"""What both launchers share: the `python -m arjax train` command line and how a plan runs.

A plan is an ordered list of steps; each step is one command (an argv list, never
a shell string on this machine) with an optional text fed to its stdin. With
--dry-run a plan is printed as shell lines a user could paste, and nothing runs.
Stdlib only: the launchers run on laptops and login nodes that have no arjax
environment.
"""
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from typing import List, Optional, Sequence

# The checkout this file lives in: the default --repo, and where --config is checked.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_OVERRIDE = re.compile(r"^--config(\.[A-Za-z_][A-Za-z0-9_]*)+=")
_CONFIG_SPEC = re.compile(r"^(?P<path>[^:]+\.py)(?::(?P<variant>.*))?$")


class LaunchError(ValueError):
  """A bad launcher flag, named in the message; raised before anything runs."""


@dataclasses.dataclass(frozen=True)
class Step:
  """One command of a plan: argv, a line saying what it is for, and optional stdin text."""
  argv: List[str]
  why: str
  stdin: Optional[str] = None


def parse_overrides(extra_args: Sequence[str]) -> List[str]:
  """Keeps `--config.FIELD=VALUE` arguments (passed through to arjax); anything else fails."""
  overrides = []
  for arg in extra_args:
    if _OVERRIDE.match(arg):
      overrides.append(arg)
    elif arg.startswith("--config."):
      raise LaunchError(f"{arg}: config overrides are passed as --config.FIELD=VALUE, in one "
                        "argument with '='")
    else:
      raise LaunchError(f"unrecognized argument {arg!r} (config overrides are "
                        "--config.FIELD=VALUE)")
  return overrides


def check_config(spec: Optional[str], repo_dir: Optional[str], relative: bool) -> str:
  """`--config=configs/X.py[:variant]`: well formed, and present in `repo_dir` if one is given.

  `relative` demands a path relative to the repo root, for machines where the repo
  lives somewhere else than here (TPU workers).
  """
  if not spec:
    raise LaunchError("--config is required, e.g. --config=configs/imagenet256_mar_base.py")
  match = _CONFIG_SPEC.match(spec)
  if match is None:
    raise LaunchError(f"--config={spec}: expected a config file path ending in .py, "
                      "optionally followed by :variant")
  path = match.group("path")
  if relative and os.path.isabs(path):
    raise LaunchError(f"--config={spec}: give the path relative to the repo root "
                      "(e.g. configs/X.py); the workers run it from their copy of the repo")
  if repo_dir is not None and not os.path.isfile(os.path.join(repo_dir, path)):
    raise LaunchError(f"--config={spec}: no file {path} in the repo {repo_dir}")
  return spec


def train_argv(python: str, config: str, workdir: str, overrides: Sequence[str]) -> List[str]:
  """The training command every process runs; arjax finds its peers by itself (see README)."""
  return [python, "-m", "arjax", "train", f"--config={config}", f"--workdir={workdir}",
          *overrides]


def format_plan(steps: Sequence[Step]) -> str:
  """The plan as shell lines, in order, each after a comment saying what it does."""
  lines = []
  for step in steps:
    lines.append(f"# {step.why}")
    command = shlex.join(step.argv)
    if step.stdin is None:
      lines.append(command)
    else:
      # A quoted heredoc: the shell passes the text verbatim, as the launcher does.
      lines.append(f"{command} <<'ARJAX_EOF'\n{step.stdin.rstrip(chr(10))}\nARJAX_EOF")
  return "\n".join(lines) + "\n"


def run_plan(steps: Sequence[Step], dry_run: bool) -> List[str]:
  """Prints the plan (dry run) or runs its steps in order, stopping at the first failure.

  Returns each step's stdout when it was fed stdin (sbatch's job id), else ''.
  """
  if dry_run:
    sys.stdout.write(format_plan(steps))
    return []
  outputs = []
  for index, step in enumerate(steps, 1):
    print(f"[{index}/{len(steps)}] {step.why}\n+ {shlex.join(step.argv)}", flush=True)
    try:
      if step.stdin is None:
        result = subprocess.run(step.argv)
        outputs.append("")
      else:
        result = subprocess.run(step.argv, input=step.stdin, text=True, stdout=subprocess.PIPE)
        sys.stdout.write(result.stdout)
        outputs.append(result.stdout)
    except FileNotFoundError:
      raise SystemExit(f"error: step {index} ({step.why}): {step.argv[0]} is not installed "
                       "or not on PATH")
    if result.returncode != 0:
      raise SystemExit(f"error: step {index} ({step.why}) failed with exit code "
                       f"{result.returncode}; later steps were not run")
  return outputs
