"""Train arjax on a Cloud TPU VM slice (single host or pod) through `gcloud compute tpus tpu-vm`.

  python launch/tpu_pod.py up --name=arjax-b --zone=us-east5-a --accelerator-type=v5p-32 \
      --bucket=gs://my-bucket --config=configs/imagenet256_mar_base.py --config.train.num_steps=1000
  python launch/tpu_pod.py logs --name=arjax-b --zone=us-east5-a
  python launch/tpu_pod.py delete --name=arjax-b --zone=us-east5-a

Sub-commands: create (the TPU VM), setup (repo + venv with jax[tpu] on every worker, and the
bucket mounted there with Cloud Storage FUSE), train (start `python -m arjax train` under nohup on
every worker, remounting the bucket first if the mount is gone), logs (tail each worker's log, or
--collect them through the bucket), stop, delete, upload-data (a local TFDS dir to the bucket)
and up (= create, setup, train). Every command runs on all workers (`--worker=all`): a pod is one
SPMD program, and arjax's `jax.distributed.initialize()` finds the other workers by itself.

arjax reads and writes local paths only, so the user names gs:// URLs (--bucket, --workdir,
--data-dir) and arjax gets their paths under the mount: gs://BUCKET/x is /gcs/BUCKET/x on every
worker. Checkpoints and data live on the bucket, so a deleted or preempted slice loses nothing but
its logs; training on the same --workdir resumes from the newest checkpoint. --dry-run prints
every command in order and runs nothing. See launch/README.md.
"""
import argparse
import dataclasses
import os
import re
import shlex
import sys
import tempfile
from typing import List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from commands import (REPO_ROOT, LaunchError, Step, check_config, parse_overrides,  # noqa: E402
                      run_plan, train_argv)

# Where things live on each worker (its home directory; every worker has its own disk).
REMOTE_REPO = "$HOME/arjax"
REMOTE_VENV = "$HOME/arjax-venv"
REMOTE_LOGS = "$HOME/arjax-logs"
REMOTE_ARCHIVE = "arjax.tar.gz"  # relative to the home directory, as scp wants it
PID_FILE = f"{REMOTE_LOGS}/train.pid"
# Each worker's own index in the slice, from the TPU VM's metadata server (JAX reads it too).
WORKER_INDEX = ("$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/"
                "computeMetadata/v1/instance/attributes/agent-worker-number)")

# The runtime (OS image) to use with JAX, per TPU generation (cloud.google.com/tpu/docs/runtimes).
DEFAULT_RUNTIME = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# v2/v3/v4/v5p types count TensorCores (8 per host); v5e (v5litepod) and v6e count chips.
_COUNTS_CORES = ("v2", "v3", "v4", "v5p")
_ACCELERATOR = re.compile(r"^(?P<generation>v2|v3|v4|v5p|v5litepod|v6e)-(?P<count>[1-9][0-9]*)$")
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
_PROJECT = re.compile(r"^([a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$")
_BUCKET = re.compile(r"^gs://(?P<name>[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9])(/[^\s]*)?$")
_GIT_URL = re.compile(r"^(https?://|ssh://|git://|file://|git@[^:]+:)")
_PYTHON_VERSION = re.compile(r"^3\.[0-9]+(\.[0-9]+)?$")
# JAX pinned in setup.cfg needs Python >= 3.11; TPU VM images ship 3.10, so uv provides one.
DEFAULT_PYTHON_VERSION = "3.11"

# Every worker mounts the bucket at MOUNT_ROOT/BUCKET with Cloud Storage FUSE (gcsfuse): arjax
# writes its workdir with os.makedirs/open and tensorboardX and reads TFDS data dirs as local
# paths, none of which understands gs:// URLs. Sources for each flag: launch/README.md.
MOUNT_ROOT = "/gcs"
GCSFUSE_FLAGS = (
    # Directories that exist only as prefixes of object names (everything uploaded by
    # `gcloud storage rsync` or `cp -r`: the data, the weights) are invisible without it.
    "--implicit-dirs",
    # Orbax finalizes a checkpoint by renaming its temporary directory. On a bucket without
    # hierarchical namespace gcsfuse renames a directory (object by object, not atomically) only
    # if it has fewer descendants than this; the default 0 refuses every directory rename.
    # 200000 is the value of gcsfuse's own aiml-checkpointing profile.
    "--rename-dir-limit=200000",
    # All workers write the same workdir; cached metadata is how stale one worker's view of the
    # others' files may get. Newer gcsfuse never expires it on v5p/v6e machine types by default.
    "--metadata-cache-ttl-secs=60",
)
# Google's apt repository for Cloud Storage FUSE and the key it is signed with.
GCSFUSE_APT_SOURCE = ("deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
                      "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main")
GCSFUSE_APT_KEY = "https://packages.cloud.google.com/apt/doc/apt-key.gpg"


@dataclasses.dataclass(frozen=True)
class Pod:
  """Which TPU VM the gcloud commands address."""
  name: str
  zone: str
  project: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Slice:
  """What `create` asks for."""
  accelerator_type: str
  version: str
  spot: bool = False
  preemptible: bool = False


@dataclasses.dataclass(frozen=True)
class Repo:
  """The code the workers run: a local checkout (shipped as `git archive` of ref) or a git URL."""
  source: str
  is_local: bool
  ref: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Bucket:
  """The Cloud Storage bucket the workers mount; `url` is --bucket (gs://NAME[/PREFIX])."""
  name: str
  url: str

  @property
  def mount_point(self) -> str:
    return f"{MOUNT_ROOT}/{self.name}"

  def local_path(self, url: str) -> str:
    """Where a worker sees gs://NAME/PATH: MOUNT_ROOT/NAME/PATH (`url` checked to be inside)."""
    return self.mount_point + url[len(f"gs://{self.name}"):]


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: config, overrides and where its checkpoints and data live (gs:// URLs)."""
  config: str
  bucket: Bucket
  workdir_url: str
  data_dir_url: str
  overrides: tuple = ()

  @property
  def workdir(self) -> str:
    return self.bucket.local_path(self.workdir_url)

  @property
  def data_dir(self) -> str:
    return self.bucket.local_path(self.data_dir_url)


# ---- command construction (pure) ----

def gcloud_tpu(verb: str, pod: Pod, *args: str) -> List[str]:
  argv = ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={pod.zone}"]
  if pod.project:
    argv.append(f"--project={pod.project}")
  return argv


def on_all_workers(pod: Pod, script: str) -> List[str]:
  """Runs a shell script on every worker of the slice at once."""
  return gcloud_tpu("ssh", pod, pod.name, "--worker=all", f"--command={script}")


def _refuse_if_training() -> str:
  # A second trainer on the same TPU fails on the TPU lock; a swapped repo under a running one
  # is worse. Say so on the worker that is busy.
  return (f'if [ -f "{PID_FILE}" ] && kill -0 "$(cat "{PID_FILE}")" 2>/dev/null; then '
          f'echo "$(hostname): arjax training is running (pid $(cat "{PID_FILE}")); '
          'run the stop sub-command first" >&2; exit 1; fi')


def create_steps(pod: Pod, tpu: Slice) -> List[Step]:
  argv = gcloud_tpu("create", pod, pod.name, f"--accelerator-type={tpu.accelerator_type}",
                    f"--version={tpu.version}")
  if tpu.spot:
    argv.append("--spot")
  if tpu.preemptible:
    argv.append("--preemptible")
  return [Step(argv, f"create TPU VM {pod.name} ({tpu.accelerator_type}, runtime {tpu.version})")]


def install_gcsfuse_lines() -> List[str]:
  """Installs gcsfuse from Google's apt repository, unless the worker has it already."""
  return [
      "if ! command -v gcsfuse >/dev/null 2>&1; then",
      f'  echo "{GCSFUSE_APT_SOURCE}" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null',
      # curl writes the key itself, so that a failed download stops the script (no pipefail).
      f"  sudo curl -fsSL -o /usr/share/keyrings/cloud.google.asc {GCSFUSE_APT_KEY}",
      # Wait for an apt run that holds the dpkg lock (unattended upgrades, often, on a fresh VM).
      "  sudo apt-get -o DPkg::Lock::Timeout=600 update -q",
      "  sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q gcsfuse",
      "fi",
  ]


def mount_lines(bucket: Bucket) -> List[str]:
  """Mounts the bucket at its mount point unless it is mounted (a restarted or new VM is not)."""
  mount = shlex.quote(bucket.mount_point)
  return [
      "command -v gcsfuse >/dev/null 2>&1 || { echo \"$(hostname): gcsfuse is not installed; "
      "run the setup sub-command\" >&2; exit 1; }",
      f"if ! mountpoint -q {mount}; then",
      # A mount whose gcsfuse process died stays listed but answers "Transport endpoint is not
      # connected"; it has to go before the bucket can be mounted there again.
      f'  if grep -qsF " {bucket.mount_point} " /proc/mounts; then sudo umount -l {mount}; fi',
      f"  sudo mkdir -p {mount}",
      # Mounted by the user who trains (no -o allow_other needed: no other user reads it).
      f'  sudo chown "$(id -u):$(id -g)" {mount}',
      f"  gcsfuse {' '.join(GCSFUSE_FLAGS)} {shlex.quote(bucket.name)} {mount}",
      f'  echo "$(hostname): mounted gs://{bucket.name} at {bucket.mount_point}"',
      "fi",
  ]


def setup_steps(pod: Pod, repo: Repo, python_version: str, archive: str,
                bucket: Bucket) -> List[Step]:
  """Copies the repo to every worker and installs it with jax[tpu] into a venv there (made once);
  installs gcsfuse there and mounts the bucket."""
  steps = []
  if repo.is_local:
    ref = repo.ref or "HEAD"
    steps.append(Step(["git", "-C", repo.source, "archive", "--format=tar.gz",
                       f"--output={archive}", ref],
                      f"pack the committed tree of {repo.source} at {ref}"))
    steps.append(Step(gcloud_tpu("scp", pod, archive, f"{pod.name}:{REMOTE_ARCHIVE}",
                                 "--worker=all"), "copy it to every worker"))
    fetch = (f'rm -rf "{REMOTE_REPO}" && mkdir -p "{REMOTE_REPO}" && '
             f'tar -xzf "$HOME/{REMOTE_ARCHIVE}" -C "{REMOTE_REPO}"')
  else:
    fetch = (f'rm -rf "{REMOTE_REPO}" && '
             f'git clone --quiet {shlex.quote(repo.source)} "{REMOTE_REPO}"')
    if repo.ref:
      fetch += f' && git -C "{REMOTE_REPO}" checkout --quiet {shlex.quote(repo.ref)}'
  python = f"{REMOTE_VENV}/bin/python"
  script = "\n".join([
      "set -e",
      _refuse_if_training(),
      fetch,
      # uv brings its own Python build, whatever the image has.
      'export PATH="$HOME/.local/bin:$PATH"',
      "command -v uv >/dev/null 2>&1 || curl -LsSf https://astral.sh/uv/install.sh | sh",
      f'[ -x "{python}" ] || uv venv --seed --python {python_version} "{REMOTE_VENV}"',
      f'"{python}" -m pip install --quiet --upgrade pip',
      f'"{python}" -m pip install --quiet -e "{REMOTE_REPO}" "jax[tpu]"',
      *install_gcsfuse_lines(),
      *mount_lines(bucket),
      # All workers run this together, as a pod must; each reports what it sees.
      f'SEEN=$("{python}" -c "import jax; print(jax.__version__, jax.local_device_count(), '
      f'jax.device_count())")',
      'echo "$(hostname): jax, local devices, all devices: $SEEN"',
  ])
  steps.append(Step(on_all_workers(pod, script),
                    f"on every worker: fetch the repo into {REMOTE_REPO}, install it with jax[tpu] "
                    f"into {REMOTE_VENV} (Python {python_version}), install gcsfuse and mount "
                    f"gs://{bucket.name} at {bucket.mount_point}"))
  return steps


def train_script(run: Run) -> str:
  """What each worker runs to start training in the background, logging to its own file."""
  # The venv's python is double-quoted so that $HOME expands on the worker.
  argv = train_argv("python", run.config, run.workdir, run.overrides)[1:]
  command = f'"{REMOTE_VENV}/bin/python" {shlex.join(argv)}'
  log = f"{REMOTE_LOGS}/train-worker$W.log"
  return "\n".join([
      "set -e",
      f'mkdir -p "{REMOTE_LOGS}"',
      _refuse_if_training(),
      *mount_lines(run.bucket),
      f'cd "{REMOTE_REPO}"',
      f"W={WORKER_INDEX}",
      f'echo "=== $(date -u +%FT%TZ) worker $W: arjax train starts" >> "{log}"',
      # setsid + nohup: the trainer outlives this ssh session, in its own process group (which
      # stop kills); its stdin/stdout/stderr are redirected so that ssh returns at once.
      f'ARJAX_DATA_DIR={shlex.quote(run.data_dir)} setsid nohup {command} '
      f'>> "{log}" 2>&1 < /dev/null &',
      f'echo $! > "{PID_FILE}"',
      f'echo "worker $W: training started (pid $!), log {log}"',
  ])


def train_steps(pod: Pod, run: Run) -> List[Step]:
  return [Step(on_all_workers(pod, train_script(run)),
               f"on every worker: mount {run.bucket.mount_point} if needed, start training in "
               f"the background, workdir {run.workdir} ({run.workdir_url})")]


def logs_steps(pod: Pod, lines: int, collect_dir: Optional[str],
               workdir: Optional[str]) -> List[Step]:
  """Tails every worker's log (lines prefixed by the worker), or copies them all through gs://.

  `workdir` is the gs:// URL: `gcloud storage` on the workers needs no mount, so logs can be
  collected even from a worker whose mount is gone.
  """
  if collect_dir is None:
    script = (f'for f in "{REMOTE_LOGS}"/train-worker*.log; do [ -f "$f" ] || continue; '
              f'tail -n {lines} "$f" | sed "s/^/[$(basename "$f" .log)] /"; done')
    return [Step(on_all_workers(pod, script), f"last {lines} lines of every worker's log")]
  remote = f"{workdir}/logs/"
  return [
      Step(on_all_workers(pod, f'gcloud storage cp "{REMOTE_LOGS}"/train-worker*.log '
                                f'{shlex.quote(remote)}'),
           f"every worker uploads its log to {remote}"),
      Step(["mkdir", "-p", collect_dir], f"make {collect_dir}"),
      Step(["gcloud", "storage", "cp", f"{remote}*", collect_dir],
           f"download all workers' logs into {collect_dir}"),
  ]


def stop_steps(pod: Pod) -> List[Step]:
  script = (f'if [ -f "{PID_FILE}" ] && kill -0 "$(cat "{PID_FILE}")" 2>/dev/null; then '
            f'kill -TERM -- "-$(cat "{PID_FILE}")" && echo "$(hostname): stopped"; '
            'else echo "$(hostname): no training running"; fi')
  return [Step(on_all_workers(pod, script), "on every worker: stop the training process group")]


def delete_steps(pod: Pod) -> List[Step]:
  return [Step(gcloud_tpu("delete", pod, pod.name, "--quiet"),
               f"delete TPU VM {pod.name} (the bucket, with checkpoints, is kept)")]


def upload_data_steps(local_data_dir: str, data_dir: str) -> List[Step]:
  return [Step(["gcloud", "storage", "rsync", "--recursive", local_data_dir, data_dir],
               f"copy the prepared TFDS data in {local_data_dir} to {data_dir}")]


# ---- flags and their checks ----

def _add_pod_flags(parser):
  parser.add_argument("--name", help="TPU VM name (lowercase letters, digits, hyphens).")
  parser.add_argument("--zone", help="zone of the TPU, e.g. us-east5-a (v5p), us-central2-b (v4).")
  parser.add_argument("--project", help="Google Cloud project; default: gcloud's configured one.")
  parser.add_argument("--dry-run", action="store_true",
                      help="print every command, in order, and run nothing.")


def _add_create_flags(parser):
  parser.add_argument("--accelerator-type", help="e.g. v4-8, v5p-32, v5litepod-16, v6e-8.")
  parser.add_argument("--version", help="TPU runtime; default: the JAX runtime of the generation "
                      f"({', '.join(f'{k}: {v}' for k, v in DEFAULT_RUNTIME.items())}).")
  capacity = parser.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true", help="Spot capacity (can be preempted).")
  capacity.add_argument("--preemptible", action="store_true", help="preemptible capacity.")


def _add_setup_flags(parser):
  parser.add_argument("--repo", default=REPO_ROOT,
                      help="git URL, or a local checkout shipped as `git archive` of --ref "
                      "(committed files only); default: this checkout.")
  parser.add_argument("--ref", help="branch, tag or commit to run; default: HEAD / the default "
                      "branch.")
  parser.add_argument("--python-version", default=DEFAULT_PYTHON_VERSION,
                      help="Python of the workers' venv (installed by uv).")


def _add_bucket_flag(parser):
  parser.add_argument("--bucket", help="gs://BUCKET[/PREFIX] holding workdirs and data; every "
                      f"worker mounts BUCKET at {MOUNT_ROOT}/BUCKET with Cloud Storage FUSE.")


def _add_run_flags(parser, with_config=True):
  _add_bucket_flag(parser)
  parser.add_argument("--workdir", help="gs://BUCKET/... checkpoint directory, inside --bucket's "
                      f"bucket (arjax gets its path under {MOUNT_ROOT}/BUCKET); default: "
                      "BUCKET/workdirs/NAME. Same workdir = resume.")
  parser.add_argument("--data-dir", help="gs://BUCKET/... TFDS data dir, inside --bucket's bucket "
                      "(ARJAX_DATA_DIR on the workers is its path under the mount); default: "
                      "BUCKET/tensorflow_datasets.")
  if with_config:
    parser.add_argument("--config", help="configs/X.py[:variant], relative to the repo root. "
                        "Extra --config.FIELD=VALUE arguments are passed through to arjax.")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python launch/tpu_pod.py", allow_abbrev=False,
      description=__doc__.split("\n\n")[0] + " See launch/README.md.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True

  def add(name, help_text):
    command = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
    _add_pod_flags(command)
    return command

  _add_create_flags(add("create", "create the TPU VM slice."))
  setup = add("setup", "copy the repo to every worker, install it with jax[tpu], install "
              "gcsfuse and mount the bucket.")
  _add_setup_flags(setup)
  _add_bucket_flag(setup)
  train = add("train", "start training on every worker (background, per-worker log).")
  _add_run_flags(train)
  train.add_argument("--repo", default=REPO_ROOT, help="checkout to check --config against "
                     "(skipped for a git URL).")
  up = add("up", "create + setup + train.")
  _add_create_flags(up)
  _add_setup_flags(up)
  _add_run_flags(up)
  logs = add("logs", "show the end of every worker's log, or --collect them all.")
  logs.add_argument("--lines", type=int, default=50, help="lines per worker.")
  logs.add_argument("--collect", metavar="LOCAL_DIR", help="upload every worker's log to "
                    "WORKDIR/logs/ and download them into LOCAL_DIR.")
  _add_run_flags(logs, with_config=False)
  add("stop", "stop training on every worker (the TPU VM stays).")
  add("delete", "delete the TPU VM (the bucket stays).")
  upload = sub.add_parser("upload-data", help="rsync a local prepared TFDS dir to the bucket.",
                          allow_abbrev=False)
  upload.add_argument("--local-data-dir", help="local TFDS data dir (datasets prepared as "
                      "ArrayRecord).")
  _add_run_flags(upload, with_config=False)
  upload.add_argument("--dry-run", action="store_true", help="print the command, run nothing.")
  return parser


def _pod(args) -> Pod:
  if not args.name:
    raise LaunchError("--name is required: the TPU VM's name, e.g. --name=arjax-v5p")
  if not _NAME.match(args.name):
    raise LaunchError(f"--name={args.name}: use lowercase letters, digits and hyphens, starting "
                      "with a letter, at most 63 characters")
  if not args.zone:
    raise LaunchError("--zone is required, e.g. --zone=us-east5-a (where your TPU quota is)")
  if not _ZONE.match(args.zone):
    raise LaunchError(f"--zone={args.zone}: expected a zone such as us-east5-a or europe-west4-b")
  if args.project is not None and not _PROJECT.match(args.project):
    raise LaunchError(f"--project={args.project}: not a Google Cloud project id")
  return Pod(args.name, args.zone, args.project)


def _slice(args) -> Slice:
  if not args.accelerator_type:
    raise LaunchError("--accelerator-type is required, e.g. --accelerator-type=v5p-32")
  match = _ACCELERATOR.match(args.accelerator_type)
  if match is None:
    raise LaunchError(f"--accelerator-type={args.accelerator_type}: expected GENERATION-COUNT with "
                      f"GENERATION one of {', '.join(DEFAULT_RUNTIME)}, e.g. v4-8, v5p-32, v6e-16")
  generation, count = match.group("generation"), int(match.group("count"))
  if generation in _COUNTS_CORES and count % 8:
    raise LaunchError(f"--accelerator-type={args.accelerator_type}: {generation} sizes count "
                      "TensorCores in multiples of 8 (v4-8, v4-16, v5p-32, ...)")
  return Slice(args.accelerator_type, args.version or DEFAULT_RUNTIME[generation],
               spot=args.spot, preemptible=args.preemptible)


def _repo(args) -> Repo:
  source = args.repo
  if _GIT_URL.match(source):
    return Repo(source, is_local=False, ref=getattr(args, "ref", None))
  if not os.path.isdir(source):
    raise LaunchError(f"--repo={source}: neither a local directory nor a git URL "
                      "(https://, ssh://, git@host:...)")
  if not os.path.exists(os.path.join(source, ".git")):
    raise LaunchError(f"--repo={source}: not a git checkout (it is shipped with `git archive`)")
  if not os.path.isfile(os.path.join(source, "arjax", "__main__.py")):
    raise LaunchError(f"--repo={source}: no arjax/__main__.py there; point it at the arjax repo")
  return Repo(os.path.abspath(source), is_local=True, ref=getattr(args, "ref", None))


def _bucket(args) -> Bucket:
  if args.bucket is None:
    raise LaunchError("--bucket is required, e.g. --bucket=gs://my-arjax: every worker mounts it "
                      f"at {MOUNT_ROOT}/BUCKET, and the workdir and data live there")
  url = args.bucket.rstrip("/")
  match = _BUCKET.match(url)
  if match is None:
    raise LaunchError(f"--bucket={args.bucket}: must be gs://BUCKET or gs://BUCKET/PREFIX "
                      "(bucket names: lowercase letters, digits, -, _ and .)")
  bucket = Bucket(match.group("name"), url)
  _check_segments("--bucket", args.bucket, url, bucket)
  return bucket


def _check_segments(flag: str, value: str, url: str, bucket: Bucket) -> None:
  # gs://b/../c would be /gcs/b/../c = /gcs/c on the workers: outside the mount.
  path = url[len(f"gs://{bucket.name}"):]
  if any(part in ("", ".", "..") for part in path.split("/")[1:]):
    raise LaunchError(f"{flag}={value}: empty, '.' and '..' path segments are not allowed; the "
                      f"path must name a directory inside gs://{bucket.name}")


def _in_bucket(flag: str, value: str, bucket: Bucket) -> str:
  """A gs:// URL inside the mounted bucket (trailing '/' dropped); anything else is refused."""
  if value.startswith(MOUNT_ROOT + "/"):
    raise LaunchError(f"{flag}={value}: give the gs:// URL (gs://{value[len(MOUNT_ROOT) + 1:]}); "
                      f"the launcher passes arjax its path under {MOUNT_ROOT} itself")
  url = value.rstrip("/")
  if not url.startswith("gs://"):
    raise LaunchError(f"{flag}={value}: must be a gs:// path in --bucket={bucket.url}; every "
                      "worker of a pod reads and writes it, and local disks are per worker")
  name = url[len("gs://"):].split("/")[0]
  if name != bucket.name:
    raise LaunchError(f"{flag}={value}: outside --bucket={bucket.url}; only gs://{bucket.name} is "
                      f"mounted on the workers (at {bucket.mount_point}), so use a gs://"
                      f"{bucket.name}/... path or --bucket=gs://{name}")
  _check_segments(flag, value, url, bucket)
  return url


def _workdir(args, pod: Pod, bucket: Bucket) -> str:
  if args.workdir:
    return _in_bucket("--workdir", args.workdir, bucket)
  return f"{bucket.url}/workdirs/{pod.name}"


def _data_dir(args, bucket: Bucket) -> str:
  if args.data_dir:
    return _in_bucket("--data-dir", args.data_dir, bucket)
  return f"{bucket.url}/tensorflow_datasets"


def _check_override_paths(overrides: Sequence[str], bucket: Bucket) -> None:
  """arjax opens config paths (e.g. tokenizer.checkpoint) as local files: gs:// would fail there."""
  for override in overrides:
    field, value = override.split("=", 1)
    if not value.startswith("gs://"):
      continue
    url = value.rstrip("/")
    if url == f"gs://{bucket.name}" or url.startswith(f"gs://{bucket.name}/"):
      hint = f"pass {field}={bucket.local_path(url)}, where every worker sees it"
    else:
      hint = (f"only gs://{bucket.name} is mounted on the workers (at {bucket.mount_point}); "
              "copy it there")
    raise LaunchError(f"{override}: arjax reads local paths, not gs:// URLs; {hint}")


def _run(args, pod: Pod, overrides: List[str]) -> Run:
  repo = _repo(args)
  config = check_config(args.config, repo.source if repo.is_local else None, relative=True)
  bucket = _bucket(args)
  _check_override_paths(overrides, bucket)
  return Run(config, bucket, _workdir(args, pod, bucket), _data_dir(args, bucket),
             tuple(overrides))


def _python_version(args) -> str:
  if not _PYTHON_VERSION.match(args.python_version):
    raise LaunchError(f"--python-version={args.python_version}: expected e.g. 3.11")
  return args.python_version


def _archive_path(pod: Pod) -> str:
  return os.path.join(tempfile.gettempdir(), f"arjax-{pod.name}.tar.gz")


def plan(argv: Sequence[str]):
  """Parses and checks the flags; returns (steps, dry_run). Raises LaunchError on bad input."""
  args, extra = build_parser().parse_known_args(argv)
  passes_overrides = args.command in ("train", "up")
  if extra and not passes_overrides:
    raise LaunchError(f"unrecognized arguments for {args.command}: {' '.join(extra)}")
  overrides = parse_overrides(extra) if passes_overrides else []
  if args.command == "upload-data":
    if not args.local_data_dir or not os.path.isdir(args.local_data_dir):
      raise LaunchError(f"--local-data-dir={args.local_data_dir}: not a local directory")
    return (upload_data_steps(os.path.abspath(args.local_data_dir), _data_dir(args, _bucket(args))),
            args.dry_run)

  pod = _pod(args)
  if args.command == "create":
    return create_steps(pod, _slice(args)), args.dry_run
  if args.command == "setup":
    return (setup_steps(pod, _repo(args), _python_version(args), _archive_path(pod), _bucket(args)),
            args.dry_run)
  if args.command == "train":
    return train_steps(pod, _run(args, pod, overrides)), args.dry_run
  if args.command == "up":
    # Every check before the first command: a typo must not leave a paid-for idle slice.
    tpu, repo, python_version = _slice(args), _repo(args), _python_version(args)
    run = _run(args, pod, overrides)
    return (create_steps(pod, tpu)
            + setup_steps(pod, repo, python_version, _archive_path(pod), run.bucket)
            + train_steps(pod, run)), args.dry_run
  if args.command == "logs":
    if args.lines <= 0:
      raise LaunchError(f"--lines={args.lines}: must be positive")
    workdir = _workdir(args, pod, _bucket(args)) if args.collect else None
    return logs_steps(pod, args.lines, args.collect, workdir), args.dry_run
  if args.command == "stop":
    return stop_steps(pod), args.dry_run
  assert args.command == "delete", args.command
  return delete_steps(pod), args.dry_run


def main(argv: Optional[Sequence[str]] = None) -> None:
  try:
    steps, dry_run = plan(sys.argv[1:] if argv is None else argv)
  except LaunchError as e:
    sys.exit(f"error: {e}")
  run_plan(steps, dry_run)


if __name__ == "__main__":
  main()
