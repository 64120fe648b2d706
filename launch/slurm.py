"""Train arjax on a SLURM GPU cluster: renders an sbatch script and submits it.

  python launch/slurm.py --nodes=2 --gpus-per-node=8 --tasks-per=gpu --time=24:00:00 \
      --partition=h100 --venv=$HOME/arjax-venv --workdir=/shared/runs/mar_b \
      --config=configs/imagenet256_mar_base.py --config.train.num_steps=1000 [--dry-run]

The job's one `srun` step starts `python -m arjax train` in every task; arjax calls
`jax.distributed.initialize()` and JAX's SLURM detection reads the coordinator (the first
node), the process count and each process id from srun's environment. Two layouts:

  --tasks-per=gpu   one process per GPU (nodes x gpus-per-node processes). Every process sees
                    all GPUs of its node and JAX gives process SLURM_LOCALID the GPU of that index,
                    so no per-task GPU binding (`--gpus-per-task=1` would hide the GPU it wants).
  --tasks-per=host  one process per node, driving all its GPUs (`--gpus-per-task=G`). JAX's SLURM
                    detection would give it only GPU SLURM_LOCALID = 0, so the script sets
                    JAX_LOCAL_DEVICE_IDS=0,...,G-1.

Logs: the batch script's own output in LOG_DIR/JOBNAME-JOBID.out, each task's in
LOG_DIR/JOBNAME-JOBID-task<N>.log (LOG_DIR defaults to WORKDIR/logs). --dry-run prints the
commands and the script and runs nothing. See launch/README.md.
"""
import argparse
import dataclasses
import os
import re
import shlex
import sys
from typing import List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from commands import (REPO_ROOT, LaunchError, Step, check_config, parse_overrides,  # noqa: E402
                      run_plan, train_argv)

_TIME = re.compile(r"^([0-9]+-)?[0-9]+(:[0-9]{1,2}){0,2}$")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.,-]+$")
_JOB_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclasses.dataclass(frozen=True)
class Job:
  """Everything the sbatch script says; paths are absolute (or URLs)."""
  nodes: int
  gpus_per_node: int
  tasks_per: str  # 'gpu' or 'host'
  repo: str
  config: str
  workdir: str
  log_dir: str
  overrides: tuple = ()
  job_name: str = "arjax"
  time: Optional[str] = None
  partition: Optional[str] = None
  account: Optional[str] = None
  qos: Optional[str] = None
  cpus_per_task: Optional[int] = None
  exclusive: bool = False
  venv: Optional[str] = None
  container: Optional[str] = None
  container_mounts: tuple = ()
  setup: tuple = ()
  data_dir: Optional[str] = None
  python: str = "python"

  @property
  def tasks_per_node(self) -> int:
    return self.gpus_per_node if self.tasks_per == "gpu" else 1

  @property
  def num_processes(self) -> int:
    return self.nodes * self.tasks_per_node


def _is_local(path: str) -> bool:
  return "://" not in path


def srun_options(job: Job) -> List[str]:
  """srun and its options: task layout, GPU visibility, per-task logs, container."""
  argv = ["srun", f"--nodes={job.nodes}", f"--ntasks-per-node={job.tasks_per_node}"]
  if job.tasks_per == "gpu":
    # Every task sees all GPUs of its node; JAX picks GPU number SLURM_LOCALID for each.
    argv += [f"--gpus-per-node={job.gpus_per_node}", "--gpu-bind=none"]
  else:
    argv += [f"--gpus-per-task={job.gpus_per_node}"]
  if job.cpus_per_task:
    # srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05).
    argv.append(f"--cpus-per-task={job.cpus_per_task}")
  # One failed process would leave the others waiting in a collective until the time limit.
  argv.append("--kill-on-bad-exit=1")
  argv.append(f"--output={job.log_dir}/%x-%j-task%t.log")
  if job.container:
    mounts = [f"{p}:{p}" for p in (job.repo, job.workdir, job.data_dir) if p and _is_local(p)]
    mounts += list(job.container_mounts)
    argv += [f"--container-image={job.container}", f"--container-mounts={','.join(mounts)}",
             f"--container-workdir={job.repo}"]
  return argv


def srun_argv(job: Job) -> List[str]:
  """The job step: srun starting the training command in every task."""
  return srun_options(job) + train_argv(job.python, job.config, job.workdir, job.overrides)


def sbatch_script(job: Job) -> str:
  """The batch script, as sbatch will read it."""
  layout = (f"one process per GPU ({job.num_processes} processes)" if job.tasks_per == "gpu"
            else f"one process per node driving its {job.gpus_per_node} GPUs "
                 f"({job.num_processes} processes)")
  directives = [f"--job-name={job.job_name}", f"--nodes={job.nodes}",
                f"--ntasks-per-node={job.tasks_per_node}", f"--gpus-per-node={job.gpus_per_node}"]
  if job.cpus_per_task:
    directives.append(f"--cpus-per-task={job.cpus_per_task}")
  for flag, value in (("time", job.time), ("partition", job.partition),
                      ("account", job.account), ("qos", job.qos)):
    if value:
      directives.append(f"--{flag}={value}")
  if job.exclusive:
    directives.append("--exclusive")
  directives.append(f"--output={job.log_dir}/%x-%j.out")

  lines = ["#!/bin/bash",
           f"# arjax training on {job.nodes} node(s) x {job.gpus_per_node} GPU(s), {layout}.",
           "# Rendered by launch/slurm.py."]
  lines += [f"#SBATCH {d}" for d in directives]
  lines += ["set -eo pipefail", ""]
  lines += list(job.setup)
  if job.venv:
    lines.append(f"source {_quote(job.venv)}/bin/activate")
  lines.append(f"cd {_quote(job.repo)}")
  if _is_local(job.workdir):
    lines.append(f"mkdir -p {_quote(job.workdir)}")
  if job.data_dir:
    lines.append(f"export ARJAX_DATA_DIR={_quote(job.data_dir)}")
  if job.tasks_per == "host":
    lines += ["# One process per node uses all its GPUs. Without this JAX's SLURM detection would "
              "give it",
              "# only GPU number SLURM_LOCALID, which is 0 for every process.",
              "export JAX_LOCAL_DEVICE_IDS=" + ",".join(str(i) for i in range(job.gpus_per_node))]
  else:
    lines += ["# One process per GPU: each sees all GPUs of its node (no per-task binding) and "
              "JAX's SLURM",
              "# detection gives process SLURM_LOCALID the GPU with that index."]
  lines += [
      f'echo "job $SLURM_JOB_ID: {job.num_processes} processes on $SLURM_JOB_NODELIST"',
      # One option a line, then the command every task runs.
      " \\\n    ".join([shlex.quote(a) for a in srun_options(job)]
                         + [shlex.join(train_argv(job.python, job.config, job.workdir,
                                                  job.overrides))]),
  ]
  return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
  return shlex.quote(text)


def submit_steps(job: Job) -> List[Step]:
  steps = []
  if _is_local(job.log_dir):
    # sbatch does not create the directory of --output; without it the job dies silently.
    steps.append(Step(["mkdir", "-p", job.log_dir], f"make the log directory {job.log_dir}"))
  steps.append(Step(["sbatch", "--parsable"], f"submit the job (script on stdin); logs in "
                    f"{job.log_dir}", stdin=sbatch_script(job)))
  return steps


# ---- flags and their checks ----

def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python launch/slurm.py", allow_abbrev=False,
                                   description=__doc__.split("\n\n")[0] + " See launch/README.md.")
  parser.add_argument("--nodes", type=int, default=1, help="nodes to allocate.")
  parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs used on each node.")
  parser.add_argument("--tasks-per", choices=("gpu", "host"), default="gpu",
                      help="one process per GPU (JAX's SLURM default) or one per node.")
  parser.add_argument("--time", help="time limit, e.g. 24:00:00 or 2-00:00:00.")
  parser.add_argument("--partition", help="SLURM partition.")
  parser.add_argument("--account", help="SLURM account to charge.")
  parser.add_argument("--qos", help="SLURM quality of service.")
  parser.add_argument("--job-name", default="arjax",
                      help="job name (log file names start with it).")
  parser.add_argument("--cpus-per-task", type=int, help="CPU cores per process (data loading).")
  parser.add_argument("--exclusive", action="store_true", help="whole nodes only.")
  env = parser.add_mutually_exclusive_group()
  env.add_argument("--venv", help="virtual environment with arjax installed "
                   "(`pip install -e . 'jax[cuda12]'`), activated in the script.")
  env.add_argument("--container", help="container image for pyxis/enroot (srun "
                   "--container-image); it must hold arjax's dependencies.")
  parser.add_argument("--container-mounts", action="append", default=[],
                      help="extra SRC:DST mount for --container (repeatable); the repo, workdir "
                      "and data dir are mounted at their own paths.")
  parser.add_argument("--setup", action="append", default=[], metavar="LINE",
                      help="shell line run before srun, e.g. 'module load cuda/12.4' "
                      "(repeatable, in order).")
  parser.add_argument("--repo", default=REPO_ROOT, help="the arjax checkout on the shared "
                      "filesystem; the job runs from there. Default: this checkout.")
  parser.add_argument("--python", default="python", help="interpreter inside the job.")
  parser.add_argument("--config", help="configs/X.py[:variant]. Extra --config.FIELD=VALUE "
                      "arguments are passed through to arjax.")
  parser.add_argument("--workdir", help="checkpoint directory on the shared filesystem; the same "
                      "workdir resumes from its newest checkpoint.")
  parser.add_argument("--data-dir", help="TFDS data dir (exported as ARJAX_DATA_DIR).")
  parser.add_argument("--log-dir", help="SLURM logs; default: WORKDIR/logs.")
  parser.add_argument("--dry-run", action="store_true",
                      help="print the commands and the sbatch script, run nothing.")
  return parser


def _absolute(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path)) if _is_local(path) else path.rstrip("/")


def _positive(flag: str, value: Optional[int]) -> None:
  if value is not None and value < 1:
    raise LaunchError(f"{flag}={value}: must be at least 1")


def job_from_args(argv: Sequence[str]):
  """Parses and checks the flags; returns (Job, dry_run). Raises LaunchError on bad input."""
  args, extra = build_parser().parse_known_args(argv)
  overrides = parse_overrides(extra)
  _positive("--nodes", args.nodes)
  _positive("--gpus-per-node", args.gpus_per_node)
  _positive("--cpus-per-task", args.cpus_per_task)
  if args.time is not None and not _TIME.match(args.time):
    raise LaunchError(f"--time={args.time}: expected MINUTES, HH:MM:SS or DAYS-HH:MM:SS")
  for flag in ("partition", "account", "qos"):
    value = getattr(args, flag)
    if value is not None and not _SLURM_NAME.match(value):
      raise LaunchError(f"--{flag}={value}: letters, digits, '_', '.', '-' and ',' only")
  if not _JOB_NAME.match(args.job_name):
    raise LaunchError(f"--job-name={args.job_name}: letters, digits, '_', '.' and '-' only")

  repo = _absolute(args.repo)
  if not os.path.isfile(os.path.join(repo, "arjax", "__main__.py")):
    raise LaunchError(f"--repo={args.repo}: no arjax checkout there (arjax/__main__.py); the "
                      "job runs from the repo on the shared filesystem")
  config = check_config(args.config, repo, relative=False)
  if args.venv is not None and not os.path.isfile(os.path.join(_absolute(args.venv), "bin",
                                                              "activate")):
    raise LaunchError(f"--venv={args.venv}: no bin/activate there")
  for mount in args.container_mounts:
    if ":" not in mount:
      raise LaunchError(f"--container-mounts={mount}: expected SRC:DST")
  if args.container_mounts and not args.container:
    raise LaunchError("--container-mounts needs --container")
  if not args.workdir:
    raise LaunchError("--workdir is required: the checkpoint directory on the shared filesystem "
                      "(the same workdir resumes)")
  workdir = _absolute(args.workdir)
  if args.log_dir is not None:
    log_dir = _absolute(args.log_dir)
  elif _is_local(workdir):
    log_dir = f"{workdir}/logs"
  else:
    raise LaunchError(f"--log-dir is required with --workdir={args.workdir}: SLURM writes its logs "
                      "to a local (shared) filesystem")
  if not _is_local(log_dir):
    raise LaunchError(f"--log-dir={args.log_dir}: SLURM writes logs to a filesystem path, "
                      "not a URL")
  if re.search(r"\s", log_dir):
    # #SBATCH lines are split on whitespace, with no quoting.
    raise LaunchError(f"log directory {log_dir!r} (--log-dir, default WORKDIR/logs) contains "
                      "whitespace, which #SBATCH --output cannot carry")
  job = Job(
      nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per=args.tasks_per, repo=repo,
      config=config, workdir=workdir, log_dir=log_dir, overrides=tuple(overrides),
      job_name=args.job_name, time=args.time, partition=args.partition, account=args.account,
      qos=args.qos, cpus_per_task=args.cpus_per_task, exclusive=args.exclusive,
      venv=_absolute(args.venv) if args.venv else None, container=args.container,
      container_mounts=tuple(args.container_mounts), setup=tuple(args.setup),
      data_dir=_absolute(args.data_dir) if args.data_dir else None, python=args.python)
  return job, args.dry_run


def main(argv: Optional[Sequence[str]] = None) -> None:
  try:
    job, dry_run = job_from_args(sys.argv[1:] if argv is None else argv)
  except LaunchError as e:
    sys.exit(f"error: {e}")
  outputs = run_plan(submit_steps(job), dry_run)
  if not dry_run:
    job_id = outputs[-1].strip().split(";")[0]
    print(f"submitted job {job_id}: {job.num_processes} processes on {job.nodes} node(s)\n"
          f"job log:   {job.log_dir}/{job.job_name}-{job_id}.out\n"
          f"task logs: {job.log_dir}/{job.job_name}-{job_id}-task<N>.log\n"
          f"checkpoints: {job.workdir}/checkpoints (resubmit the same command to resume)")


if __name__ == "__main__":
  main()
