"""The launchers in launch/: the commands they render for a few topologies, their input errors,
and that --dry-run only prints while a real run executes exactly what the dry run printed.

gcloud, git and sbatch are not installed here; the subprocess tests put stand-ins that record
their argv (and stdin) first on PATH, so "nothing ran" and "this ran" are facts, not assumptions.
The TPU workers' bucket-mount lines run here the same way, with sudo and gcsfuse as stand-ins.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "launch"))
import commands  # noqa: E402
import slurm  # noqa: E402
import tpu_pod  # noqa: E402

LaunchError = commands.LaunchError
CONFIG = "configs/imagenet256_mar_base.py"


def tpu_plan(*args):
  steps, dry_run = tpu_pod.plan(list(args))
  return steps


def pod_flags(name="arjax-b", zone="us-east5-a"):
  return [f"--name={name}", f"--zone={zone}"]


def script_of(step):
  """The shell script an `ssh --worker=all --command=...` step runs on every worker."""
  [command] = [a for a in step.argv if a.startswith("--command=")]
  return command[len("--command="):]


def line_with(text, needle):
  [line] = [l for l in text.splitlines() if needle in l]
  return line


# ---- TPU pods ----

# What every worker runs to mount the bucket (here gs://bkt), in setup and again before train.
MOUNT_BKT = [
    'command -v gcsfuse >/dev/null 2>&1 || { echo "$(hostname): gcsfuse is not installed; '
    'run the setup sub-command" >&2; exit 1; }',
    "if ! mountpoint -q /gcs/bkt; then",
    '  if grep -qsF " /gcs/bkt " /proc/mounts; then sudo umount -l /gcs/bkt; fi',
    "  sudo mkdir -p /gcs/bkt",
    '  sudo chown "$(id -u):$(id -g)" /gcs/bkt',
    "  gcsfuse --implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=60 bkt /gcs/bkt",
    '  echo "$(hostname): mounted gs://bkt at /gcs/bkt"',
    "fi",
]
INSTALL_GCSFUSE = [
    "if ! command -v gcsfuse >/dev/null 2>&1; then",
    '  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
    'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" '
    "| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null",
    "  sudo curl -fsSL -o /usr/share/keyrings/cloud.google.asc "
    "https://packages.cloud.google.com/apt/doc/apt-key.gpg",
    "  sudo apt-get -o DPkg::Lock::Timeout=600 update -q",
    "  sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q gcsfuse",
    "fi",
]


def lines_from(text, first_line, count):
  """`count` lines of `text` starting at the line equal to `first_line`."""
  lines = text.splitlines()
  start = lines.index(first_line)
  return lines[start:start + count]


def test_v4_8_single_host_create_then_train():
  [create] = tpu_plan("create", *pod_flags("arjax-v4", "us-central2-b"), "--accelerator-type=v4-8")
  assert create.argv == ["gcloud", "compute", "tpus", "tpu-vm", "create", "arjax-v4",
                         "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base",
                         "--zone=us-central2-b"]

  [train] = tpu_plan("train", *pod_flags("arjax-v4", "us-central2-b"), "--bucket=gs://bkt/",
                     "--config=configs/digits.py:smoke")
  assert train.argv[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "arjax-v4",
                            "--worker=all"]
  assert train.argv[-1] == "--zone=us-central2-b"
  # The workdir is named after the TPU on the bucket (trailing '/' of --bucket dropped), and
  # arjax gets it, and the data dir, as paths under the bucket's mount.
  start = line_with(script_of(train), "setsid nohup")
  assert start.startswith("ARJAX_DATA_DIR=/gcs/bkt/tensorflow_datasets setsid nohup "
                          '"$HOME/arjax-venv/bin/python" -m arjax train '
                          "--config=configs/digits.py:smoke --workdir=/gcs/bkt/workdirs/arjax-v4 ")
  assert start.endswith('>> "$HOME/arjax-logs/train-worker$W.log" 2>&1 < /dev/null &')
  assert "://" not in start


def test_v5p_32_up_creates_sets_up_and_trains_on_all_workers(tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the tarball goes
  steps = tpu_plan("up", *pod_flags(), "--project=my-project", "--accelerator-type=v5p-32",
                   "--spot", "--bucket=gs://my-arjax", f"--config={CONFIG}",
                   "--config.train.num_steps=1000", "--config.sample.cfg_scale=2.9",
                   "--config.tokenizer.checkpoint=/gcs/my-arjax/weights/kl16")
  create, archive, scp, setup, train = steps
  assert create.argv == ["gcloud", "compute", "tpus", "tpu-vm", "create", "arjax-b",
                         "--accelerator-type=v5p-32", "--version=v2-alpha-tpuv5",
                         "--zone=us-east5-a", "--project=my-project", "--spot"]
  tarball = str(tmp_path / "arjax-arjax-b.tar.gz")
  assert archive.argv == ["git", "-C", str(REPO_ROOT), "archive", "--format=tar.gz",
                          f"--output={tarball}", "HEAD"]
  assert scp.argv == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                      "arjax-b:arjax.tar.gz", "--worker=all", "--zone=us-east5-a",
                      "--project=my-project"]
  for step in (setup, train):
    assert step.argv[4:7] == ["ssh", "arjax-b", "--worker=all"]
    assert step.argv[-2:] == ["--zone=us-east5-a", "--project=my-project"]

  setup_script = script_of(setup)
  assert 'tar -xzf "$HOME/arjax.tar.gz" -C "$HOME/arjax"' in setup_script
  assert 'uv venv --seed --python 3.11 "$HOME/arjax-venv"' in setup_script
  assert '-m pip install --quiet -e "$HOME/arjax" "jax[tpu]"' in setup_script
  assert ("  gcsfuse --implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=60 "
          "my-arjax /gcs/my-arjax") in setup_script.splitlines()

  train_script = script_of(train)
  command = shlex.split(line_with(train_script, "setsid nohup"))
  assert command[:3] == ["ARJAX_DATA_DIR=/gcs/my-arjax/tensorflow_datasets", "setsid", "nohup"]
  # No distributed flags: on a TPU VM arjax lets JAX find the other workers.
  assert command[3:command.index(">>")] == [
      "$HOME/arjax-venv/bin/python", "-m", "arjax", "train", f"--config={CONFIG}",
      "--workdir=/gcs/my-arjax/workdirs/arjax-b", "--config.train.num_steps=1000",
      "--config.sample.cfg_scale=2.9", "--config.tokenizer.checkpoint=/gcs/my-arjax/weights/kl16"]
  assert 'echo $! > "$HOME/arjax-logs/train.pid"' in train_script
  assert "agent-worker-number" in line_with(train_script, "W=")


def test_setup_installs_gcsfuse_then_mounts_the_bucket_on_every_worker():
  [setup] = tpu_plan("setup", *pod_flags(), "--repo=https://github.com/me/arjax.git",
                     "--bucket=gs://bkt/team")
  script = script_of(setup)
  # Installed from Google's apt repository only where missing, after arjax and jax[tpu].
  assert lines_from(script, INSTALL_GCSFUSE[0], len(INSTALL_GCSFUSE)) == INSTALL_GCSFUSE
  # The whole bucket is mounted at /gcs/BUCKET, whatever --bucket's prefix.
  assert lines_from(script, MOUNT_BKT[0], len(MOUNT_BKT)) == MOUNT_BKT
  lines = script.splitlines()
  pip = lines.index('"$HOME/arjax-venv/bin/python" -m pip install --quiet -e "$HOME/arjax" '
                    '"jax[tpu]"')
  assert pip < lines.index(INSTALL_GCSFUSE[0]) < lines.index(MOUNT_BKT[0])
  assert "gs://bkt at /gcs/bkt" in setup.why


def test_train_remounts_a_missing_mount_before_it_starts_arjax():
  [train] = tpu_plan("train", *pod_flags(), "--bucket=gs://bkt", f"--config={CONFIG}")
  lines = script_of(train).splitlines()
  # A preempted-and-recreated or rebooted VM has lost its mount: train checks it, and mounts it
  # the same way setup does, before anything reads the workdir.
  mount = lines.index(MOUNT_BKT[0])
  assert lines[mount:mount + len(MOUNT_BKT)] == MOUNT_BKT
  assert lines.index("set -e") < mount
  assert mount + len(MOUNT_BKT) <= lines.index('cd "$HOME/arjax"')
  assert mount < lines.index(line_with(script_of(train), "setsid nohup"))
  assert INSTALL_GCSFUSE[0] not in lines  # installing is setup's job


@pytest.fixture
def worker_bin(tmp_path):
  """Runs the mount lines of a rendered train script here, on a PATH where sudo and gcsfuse
  record their argv in calls.jsonl instead of acting, `mountpoint` answers as told and the
  rest are the real tools."""
  bin_dir, log = tmp_path / "worker_bin", tmp_path / "calls.jsonl"
  bin_dir.mkdir()
  for name in ("sudo", "gcsfuse"):
    (bin_dir / name).write_text(STAND_IN.format(python=sys.executable, log=str(log)))
    (bin_dir / name).chmod(0o755)
  for name in ("grep", "hostname", "id"):
    (bin_dir / name).symlink_to(shutil.which(name))

  def run_mount_lines(mounted, with_gcsfuse=True):
    (bin_dir / "mountpoint").write_text(f"#!/bin/sh\nexit {0 if mounted else 32}\n")
    (bin_dir / "mountpoint").chmod(0o755)
    if not with_gcsfuse:
      (bin_dir / "gcsfuse").unlink()
    [train] = tpu_plan("train", *pod_flags(), "--bucket=gs://bkt", f"--config={CONFIG}")
    mount_lines = lines_from(script_of(train), MOUNT_BKT[0], len(MOUNT_BKT))
    result = subprocess.run([shutil.which("bash"), "-c", "set -e\n" + "\n".join(mount_lines)],
                            env={"PATH": str(bin_dir)}, capture_output=True, text=True)
    calls = [json.loads(l)["argv"] for l in log.read_text().splitlines()] if log.exists() else []
    return result, calls
  return run_mount_lines


def test_the_mount_lines_mount_the_bucket_only_where_it_is_missing(worker_bin):
  result, calls = worker_bin(mounted=True)
  assert result.returncode == 0, result.stderr
  assert calls == []

  result, calls = worker_bin(mounted=False)
  assert result.returncode == 0, result.stderr
  assert calls == [
      ["sudo", "mkdir", "-p", "/gcs/bkt"],
      ["sudo", "chown", f"{os.getuid()}:{os.getgid()}", "/gcs/bkt"],
      ["gcsfuse", "--implicit-dirs", "--rename-dir-limit=200000",
       "--metadata-cache-ttl-secs=60", "bkt", "/gcs/bkt"]]
  assert "mounted gs://bkt at /gcs/bkt" in result.stdout


def test_the_mount_lines_stop_the_script_where_gcsfuse_is_missing(worker_bin):
  result, calls = worker_bin(mounted=False, with_gcsfuse=False)
  assert result.returncode == 1
  assert "gcsfuse is not installed; run the setup sub-command" in result.stderr
  assert calls == []


def test_explicit_workdir_and_data_dir_in_the_bucket_and_quoted_overrides():
  [train] = tpu_plan("train", *pod_flags(), "--bucket=gs://bkt/team", "--workdir=gs://bkt/runs/b/",
                     "--data-dir=gs://bkt/tfds", f"--config={CONFIG}",
                     "--config.sample.note=two words, 'quoted' $HOME")
  command = shlex.split(line_with(script_of(train), "setsid nohup"))
  assert command[0] == "ARJAX_DATA_DIR=/gcs/bkt/tfds"
  assert "--workdir=/gcs/bkt/runs/b" in command
  # The value reaches arjax exactly as given: no word splitting, no expansion on the worker.
  assert "--config.sample.note=two words, 'quoted' $HOME" in command
  # Defaults follow --bucket's prefix; the mount is the whole bucket.
  [train] = tpu_plan("train", *pod_flags(), "--bucket=gs://bkt/team", f"--config={CONFIG}")
  command = shlex.split(line_with(script_of(train), "setsid nohup"))
  assert command[0] == "ARJAX_DATA_DIR=/gcs/bkt/team/tensorflow_datasets"
  assert "--workdir=/gcs/bkt/team/workdirs/arjax-b" in command
  assert "  sudo mkdir -p /gcs/bkt" in script_of(train).splitlines()


def test_git_url_is_cloned_on_the_workers_instead_of_shipped():
  [setup] = tpu_plan("setup", *pod_flags(), "--repo=https://github.com/me/arjax.git",
                     "--ref=v0.2", "--python-version=3.12", "--bucket=gs://bkt")
  script = script_of(setup)
  assert ('git clone --quiet https://github.com/me/arjax.git "$HOME/arjax" && '
          'git -C "$HOME/arjax" checkout --quiet v0.2') in script
  assert "--python 3.12" in script


def test_logs_tail_every_worker_or_collect_them_through_the_bucket():
  [tail] = tpu_plan("logs", *pod_flags(), "--lines=20")
  assert tail.argv[4:7] == ["ssh", "arjax-b", "--worker=all"]
  assert 'tail -n 20 "$f"' in script_of(tail)

  # `gcloud storage` with the workdir's URL: collecting needs no mount on the workers.
  upload, mkdir, download = tpu_plan("logs", *pod_flags(), "--bucket=gs://bkt",
                                     "--collect=out/logs")
  assert upload.argv[6] == "--worker=all"
  assert script_of(upload) == ('gcloud storage cp "$HOME/arjax-logs"/train-worker*.log '
                               "gs://bkt/workdirs/arjax-b/logs/")
  assert mkdir.argv == ["mkdir", "-p", "out/logs"]
  assert download.argv == ["gcloud", "storage", "cp", "gs://bkt/workdirs/arjax-b/logs/*",
                           "out/logs"]


def test_stop_delete_and_upload_data(tmp_path):
  [stop] = tpu_plan("stop", *pod_flags())
  assert 'kill -TERM -- "-$(cat "$HOME/arjax-logs/train.pid")"' in script_of(stop)
  [delete] = tpu_plan("delete", *pod_flags(), "--project=p-123456")
  assert delete.argv == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "arjax-b", "--quiet",
                         "--zone=us-east5-a", "--project=p-123456"]
  [upload] = tpu_plan("upload-data", f"--local-data-dir={tmp_path}", "--bucket=gs://bkt")
  assert upload.argv == ["gcloud", "storage", "rsync", "--recursive", str(tmp_path),
                         "gs://bkt/tensorflow_datasets"]


def test_remote_scripts_are_valid_shell():
  steps = tpu_plan("up", *pod_flags(), "--accelerator-type=v5p-32", "--bucket=gs://my_bkt.v2/a",
                   "--workdir=gs://my_bkt.v2/my runs/b", f"--config={CONFIG}",
                   "--config.x.y=a 'b' \"c\"")
  steps += tpu_plan("logs", *pod_flags()) + tpu_plan("stop", *pod_flags())
  steps += tpu_plan("logs", *pod_flags(), "--bucket=gs://my_bkt.v2", "--collect=out")
  for step in steps:
    if step.argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]:
      result = subprocess.run(["bash", "-n", "-c", script_of(step)], capture_output=True, text=True)
      assert result.returncode == 0, (script_of(step), result.stderr)


@pytest.mark.parametrize("args, message", [
    (["train", "--zone=us-east5-a", "--bucket=gs://bkt", f"--config={CONFIG}"],
     "--name is required"),
    (["create", "--name=Arjax_B", "--zone=us-east5-a", "--accelerator-type=v4-8"],
     "--name=Arjax_B"),
    (["create", "--name=a", "--accelerator-type=v4-8"], "--zone is required"),
    (["create", "--name=a", "--zone=us-east5", "--accelerator-type=v4-8"], "--zone=us-east5:"),
    (["create", "--name=a", "--zone=us-east5-a"], "--accelerator-type is required"),
    (["create", "--name=a", "--zone=us-east5-a", "--accelerator-type=v5p32"],
     "--accelerator-type=v5p32: expected GENERATION-COUNT"),
    (["create", "--name=a", "--zone=us-east5-a", "--accelerator-type=v4-12"],
     "--accelerator-type=v4-12: v4 sizes count TensorCores in multiples of 8"),
    (["create", "--name=a", "--zone=us-east5-a", "--accelerator-type=v4-8", "--project=X"],
     "--project=X"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=my-bucket", f"--config={CONFIG}"],
     "--bucket=my-bucket: must be gs://BUCKET"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt/../other",
      f"--config={CONFIG}"], "--bucket=gs://bkt/../other: empty, '.' and '..' path segments"),
    (["train", "--name=a", "--zone=us-east5-a", f"--config={CONFIG}"], "--bucket is required"),
    (["train", "--name=a", "--zone=us-east5-a", "--workdir=gs://bkt/run", f"--config={CONFIG}"],
     "--bucket is required"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt", "--workdir=/tmp/run",
      f"--config={CONFIG}"], "--workdir=/tmp/run: must be a gs:// path in --bucket=gs://bkt"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt",
      "--workdir=gs://other/runs/b", f"--config={CONFIG}"],
     "--workdir=gs://other/runs/b: outside --bucket=gs://bkt; only gs://bkt is mounted on the "
     "workers (at /gcs/bkt)"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt",
      "--workdir=gs://bkt-2/runs/b", f"--config={CONFIG}"], "--workdir=gs://bkt-2/runs/b: outside"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt",
      "--workdir=gs://bkt/../other/b", f"--config={CONFIG}"],
     "--workdir=gs://bkt/../other/b: empty, '.' and '..' path segments are not allowed"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt",
      "--workdir=gs://bkt//runs", f"--config={CONFIG}"], "--workdir=gs://bkt//runs: empty"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt",
      "--workdir=/gcs/bkt/runs/b", f"--config={CONFIG}"],
     "--workdir=/gcs/bkt/runs/b: give the gs:// URL (gs://bkt/runs/b)"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt", "--data-dir=/data",
      f"--config={CONFIG}"], "--data-dir=/data: must be a gs:// path"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt", "--data-dir=gs://data/tfds",
      f"--config={CONFIG}"], "--data-dir=gs://data/tfds: outside --bucket=gs://bkt"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt", f"--config={CONFIG}",
      "--config.tokenizer.checkpoint=gs://bkt/weights/kl16"],
     "--config.tokenizer.checkpoint=gs://bkt/weights/kl16: arjax reads local paths, not gs:// "
     "URLs; pass --config.tokenizer.checkpoint=/gcs/bkt/weights/kl16"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt", f"--config={CONFIG}",
      "--config.tokenizer.checkpoint=gs://weights/kl16"], "only gs://bkt is mounted"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt"], "--config is required"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt", "--config=configs/nope.py"],
     "--config=configs/nope.py: no file configs/nope.py"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt",
      f"--config={REPO_ROOT}/{CONFIG}"], "relative to the repo root"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt", "--config=configs/digits"],
     "ending in .py"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt", f"--config={CONFIG}",
      "--config.model.depth", "4"], "--config.model.depth: config overrides are passed as"),
    (["train", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt", f"--config={CONFIG}",
      "--workers=4"], "unrecognized argument '--workers=4'"),
    (["delete", "--name=a", "--zone=us-east5-a", "--config.x=1"],
     "unrecognized arguments for delete"),
    (["setup", "--name=a", "--zone=us-east5-a", "--repo=/no/such/dir", "--bucket=gs://bkt"],
     "--repo=/no/such/dir"),
    (["setup", "--name=a", "--zone=us-east5-a", "--python-version=3", "--bucket=gs://bkt"],
     "--python-version=3"),
    (["setup", "--name=a", "--zone=us-east5-a"], "--bucket is required"),
    (["logs", "--name=a", "--zone=us-east5-a", "--lines=0"], "--lines=0"),
    (["logs", "--name=a", "--zone=us-east5-a", "--collect=out"], "--bucket is required"),
    (["logs", "--name=a", "--zone=us-east5-a", "--bucket=gs://bkt", "--workdir=gs://x/run",
      "--collect=out"], "--workdir=gs://x/run: outside --bucket=gs://bkt"),
    (["upload-data", "--local-data-dir=.", "--bucket=gs://bkt", "--data-dir=gs://data/tfds"],
     "--data-dir=gs://data/tfds: outside --bucket=gs://bkt"),
])
def test_tpu_input_errors_name_the_flag(args, message):
  with pytest.raises(LaunchError) as error:
    tpu_plan(*args)
  assert message in str(error.value)


@pytest.mark.parametrize("bad_flag", ["--bucket=b", "--workdir=gs://elsewhere/run"])
def test_up_checks_every_flag_before_creating_anything(bad_flag):
  # A bad bucket or workdir must fail `up` before the (billed) create, not after it.
  with pytest.raises(LaunchError, match=bad_flag.split("=")[0]):
    tpu_plan("up", *pod_flags(), "--accelerator-type=v5p-32", "--bucket=gs://bkt", bad_flag,
             f"--config={CONFIG}")


# ---- SLURM ----

def slurm_job(*args, workdir="/shared/runs/b"):
  job, dry_run = slurm.job_from_args([f"--workdir={workdir}", f"--config={CONFIG}", *args])
  return job


def sbatch_directives(script):
  return [l[len("#SBATCH "):] for l in script.splitlines() if l.startswith("#SBATCH ")]


def test_one_node_eight_gpus_one_process_per_gpu():
  job = slurm_job("--nodes=1", "--gpus-per-node=8", "--tasks-per=gpu", "--time=04:00:00",
                  "--partition=h100", "--account=lab", "--config.train.num_steps=1000")
  assert job.num_processes == 8
  script = slurm.sbatch_script(job)
  assert sbatch_directives(script) == [
      "--job-name=arjax", "--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=8",
      "--time=04:00:00", "--partition=h100", "--account=lab",
      "--output=/shared/runs/b/logs/%x-%j.out"]
  assert slurm.srun_argv(job) == [
      "srun", "--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=8", "--gpu-bind=none",
      "--kill-on-bad-exit=1", "--output=/shared/runs/b/logs/%x-%j-task%t.log",
      "python", "-m", "arjax", "train", f"--config={CONFIG}", "--workdir=/shared/runs/b",
      "--config.train.num_steps=1000"]
  # Each process must see all GPUs of its node: JAX picks GPU number SLURM_LOCALID.
  assert "--gpus-per-task" not in script
  assert "export JAX_LOCAL_DEVICE_IDS" not in script


def test_two_nodes_one_process_per_host_drives_all_eight_gpus():
  job = slurm_job("--nodes=2", "--gpus-per-node=8", "--tasks-per=host", "--cpus-per-task=32")
  assert job.num_processes == 2
  script = slurm.sbatch_script(job)
  assert sbatch_directives(script)[:5] == [
      "--job-name=arjax", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8",
      "--cpus-per-task=32"]
  assert slurm.srun_argv(job)[:6] == [
      "srun", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-task=8", "--cpus-per-task=32",
      "--kill-on-bad-exit=1"]
  lines = script.splitlines()
  export = lines.index("export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7")
  assert export < lines.index("srun \\")


def test_venv_setup_lines_data_dir_and_log_dir(tmp_path):
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "activate").write_text("")
  job = slurm_job(f"--venv={venv}", "--setup=module load cuda/12.4",
                  "--setup=export NCCL_DEBUG=WARN",
                  "--data-dir=/shared/tfds", "--log-dir=/shared/logs", "--job-name=mar-b",
                  "--exclusive", "--qos=high", workdir="/shared/runs/b/")
  script = slurm.sbatch_script(job)
  assert "--exclusive" in sbatch_directives(script)
  assert "--output=/shared/logs/%x-%j.out" in sbatch_directives(script)
  body = script.splitlines()
  order = [body.index(l) for l in ("module load cuda/12.4", "export NCCL_DEBUG=WARN",
                                   f"source {venv}/bin/activate", f"cd {REPO_ROOT}",
                                   "export ARJAX_DATA_DIR=/shared/tfds", "srun \\")]
  assert order == sorted(order)
  assert "--output=/shared/logs/%x-%j-task%t.log" in slurm.srun_argv(job)
  assert "--workdir=/shared/runs/b" in slurm.srun_argv(job)


def test_container_mounts_repo_workdir_and_data():
  job = slurm_job("--container=nvcr.io/nvidia/jax:25.04-py3", "--data-dir=/shared/tfds",
                  "--container-mounts=/scratch:/scratch")
  srun = slurm.srun_argv(job)
  assert "--container-image=nvcr.io/nvidia/jax:25.04-py3" in srun
  assert (f"--container-mounts={REPO_ROOT}:{REPO_ROOT},/shared/runs/b:/shared/runs/b,"
          "/shared/tfds:/shared/tfds,/scratch:/scratch") in srun
  assert f"--container-workdir={REPO_ROOT}" in srun


def test_sbatch_scripts_are_valid_bash():
  for args in (["--tasks-per=gpu"], ["--tasks-per=host", "--config.x=a 'b' $c"]):
    script = slurm.sbatch_script(slurm_job(*args))
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert result.returncode == 0, (script, result.stderr)


def test_jax_slurm_detection_uses_the_gpus_the_script_gives_each_process(tmp_path):
  """What the two layouts rely on, checked against the installed JAX: with srun's environment
  and no arguments, jax.distributed.initialize() restricts a process to GPU SLURM_LOCALID, and
  JAX_LOCAL_DEVICE_IDS (exported by the per-host script) lifts that to all of the node's GPUs."""
  per_host = slurm.sbatch_script(slurm_job("--tasks-per=host", "--gpus-per-node=8"))
  device_ids = line_with(per_host, "export JAX_LOCAL_DEVICE_IDS=").split("=", 1)[1]
  probe = textwrap.dedent("""
      import os, sys
      import jax
      os.environ.update(SLURM_JOB_ID="71", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="1",
                        SLURM_PROCID="0")
      for local_id, device_ids in [("0", None), ("0", sys.argv[1]), ("5", None)]:
        os.environ["SLURM_LOCALID"] = local_id
        os.environ.pop("JAX_LOCAL_DEVICE_IDS", None)
        if device_ids:
          os.environ["JAX_LOCAL_DEVICE_IDS"] = device_ids
        jax.distributed.initialize()  # as arjax does under SLURM
        print(jax.config.values["jax_cuda_visible_devices"])
        jax.distributed.shutdown()
  """)
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  result = subprocess.run([sys.executable, "-c", probe, device_ids], capture_output=True,
                          text=True, env=dict(env, JAX_PLATFORMS="cpu"), timeout=120)
  assert result.returncode == 0, result.stderr
  # per host without the export: GPU 0 only; with it: all 8; per GPU: the task's own GPU.
  assert result.stdout.split() == ["0", "0,1,2,3,4,5,6,7", "5"]


@pytest.mark.parametrize("args, message", [
    (["--nodes=0"], "--nodes=0: must be at least 1"),
    (["--gpus-per-node=0"], "--gpus-per-node=0"),
    (["--cpus-per-task=0"], "--cpus-per-task=0"),
    (["--time=1 day"], "--time=1 day: expected"),
    (["--partition=gpu queue"], "--partition=gpu queue"),
    (["--job-name=my job"], "--job-name=my job"),
    (["--venv=/no/such/venv"], "--venv=/no/such/venv: no bin/activate"),
    (["--container-mounts=/a:/a"], "--container-mounts needs --container"),
    (["--container=img", "--container-mounts=/a"], "--container-mounts=/a: expected SRC:DST"),
    (["--repo=/no/such/repo"], "--repo=/no/such/repo"),
    (["--config=configs/nope.py"], "--config=configs/nope.py: no file"),
    (["--config.model.depth", "4"], "--config.model.depth: config overrides"),
    (["--ntasks=8"], "unrecognized argument '--ntasks=8'"),
])
def test_slurm_input_errors_name_the_flag(args, message):
  with pytest.raises(LaunchError) as error:
    slurm.job_from_args(["--workdir=/shared/runs/b", f"--config={CONFIG}", *args])
  assert message in str(error.value)


@pytest.mark.parametrize("args, message", [
    ([f"--config={CONFIG}"], "--workdir is required"),
    (["--workdir=gs://bkt/run", f"--config={CONFIG}"], "--log-dir is required"),
    (["--workdir=/shared/runs/b", f"--config={CONFIG}", "--log-dir=gs://bkt/logs"],
     "--log-dir=gs://"),
    (["--workdir=/shared/my runs/b", f"--config={CONFIG}"], "whitespace"),
    (["--workdir=/shared/runs/b"], "--config is required"),
])
def test_slurm_paths_are_checked(args, message):
  with pytest.raises(LaunchError) as error:
    slurm.job_from_args(args)
  assert message in str(error.value)


# ---- the command lines, as processes ----

STAND_IN = """#!{python}
import json, os, sys
record = {{"argv": [os.path.basename(sys.argv[0])] + sys.argv[1:]}}
if record["argv"][0] == "sbatch":
  record["stdin"] = sys.stdin.read()
  print("4242")
with open({log!r}, "a") as f:
  f.write(json.dumps(record) + "\\n")
"""


@pytest.fixture
def stand_ins(tmp_path):
  """A PATH whose gcloud, git, sbatch, srun, ssh, scp and tar record each call in calls.jsonl."""
  bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
  bin_dir.mkdir()
  for name in ("gcloud", "git", "sbatch", "srun", "ssh", "scp", "tar"):
    (bin_dir / name).write_text(STAND_IN.format(python=sys.executable, log=str(log)))
    (bin_dir / name).chmod(0o755)
  (tmp_path / "tmp").mkdir()
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
             TMPDIR=str(tmp_path / "tmp"))

  def calls():
    if not log.exists():
      return []
    return [json.loads(line) for line in log.read_text().splitlines()]
  return env, calls


def launcher(script, *args, env):
  return subprocess.run([sys.executable, str(REPO_ROOT / "launch" / script), *args], env=env,
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


TPU_UP = ["up", "--name=arjax-b", "--zone=us-east5-a", "--accelerator-type=v5p-32",
          "--bucket=gs://my-arjax", f"--config={CONFIG}", "--config.train.num_steps=1000"]


def slurm_args(workdir):
  return ["--nodes=2", "--tasks-per=host", f"--workdir={workdir}", f"--config={CONFIG}",
          "--config.train.num_steps=1000"]


def test_dry_runs_print_every_command_and_run_nothing(tmp_path, stand_ins):
  env, calls = stand_ins
  out = launcher("tpu_pod.py", *TPU_UP, "--dry-run", env=env)
  assert out.returncode == 0, out.stderr
  printed = [l for l in out.stdout.splitlines() if l.startswith(("gcloud ", "git "))]
  assert [l.split()[:5] for l in printed] == [
      ["gcloud", "compute", "tpus", "tpu-vm", "create"],
      ["git", "-C", str(REPO_ROOT), "archive", "--format=tar.gz"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  assert "--config.train.num_steps=1000" in out.stdout
  assert "--workdir=/gcs/my-arjax/workdirs/arjax-b" in out.stdout
  assert out.stdout.count("gcsfuse --implicit-dirs --rename-dir-limit=200000 "
                          "--metadata-cache-ttl-secs=60 my-arjax /gcs/my-arjax") == 2

  workdir = tmp_path / "run"
  out = launcher("slurm.py", *slurm_args(workdir), "--dry-run", env=env)
  assert out.returncode == 0, out.stderr
  assert f"mkdir -p {workdir}/logs\n" in out.stdout
  assert "sbatch --parsable <<'ARJAX_EOF'\n#!/bin/bash\n" in out.stdout
  assert "--gpus-per-task=8" in out.stdout

  assert calls() == []
  assert not workdir.exists()
  assert os.listdir(tmp_path / "tmp") == []  # no tarball either


def test_real_runs_execute_exactly_the_dry_run_plan(tmp_path, stand_ins, monkeypatch):
  env, calls = stand_ins
  out = launcher("tpu_pod.py", *TPU_UP, env=env)
  assert out.returncode == 0, out.stderr
  monkeypatch.setattr(tempfile, "tempdir", env["TMPDIR"])
  assert [c["argv"] for c in calls()] == [s.argv for s in tpu_plan(*TPU_UP)]

  workdir = tmp_path / "run"
  out = launcher("slurm.py", *slurm_args(workdir), env=env)
  assert out.returncode == 0, out.stderr
  job, _ = slurm.job_from_args(slurm_args(workdir))
  [*_, sbatch] = calls()
  assert sbatch == {"argv": ["sbatch", "--parsable"], "stdin": slurm.sbatch_script(job)}
  assert (workdir / "logs").is_dir()  # made by the real mkdir, before sbatch
  assert "submitted job 4242" in out.stdout
  assert f"{workdir}/logs/arjax-4242-task<N>.log" in out.stdout


def test_a_failing_step_stops_the_plan_and_the_exit_code_says_so(tmp_path, stand_ins):
  env, calls = stand_ins
  failing = tmp_path / "bin" / "gcloud"
  failing.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(3)\n")
  out = launcher("tpu_pod.py", *TPU_UP, env=env)
  assert out.returncode != 0
  assert "step 1 (create TPU VM arjax-b" in out.stderr and "exit code 3" in out.stderr
  assert calls() == []  # git archive, after the failed create, never ran


def test_bad_flags_fail_in_the_command_line_before_anything_runs(stand_ins):
  env, calls = stand_ins
  out = launcher("tpu_pod.py", "up", "--name=arjax-b", "--accelerator-type=v5p-32",
                 "--bucket=gs://bkt", f"--config={CONFIG}", env=env)
  assert out.returncode == 1
  assert out.stderr.strip() == ("error: --zone is required, e.g. --zone=us-east5-a "
                                "(where your TPU quota is)")
  out = launcher("tpu_pod.py", *TPU_UP, "--workdir=gs://elsewhere/run", env=env)
  assert out.returncode == 1
  assert out.stderr.startswith("error: --workdir=gs://elsewhere/run: outside "
                               "--bucket=gs://my-arjax; only gs://my-arjax is mounted")
  out = launcher("slurm.py", "--nodes=2", "--time=forever", "--workdir=/x", f"--config={CONFIG}",
                 env=env)
  assert out.returncode == 1 and "--time=forever" in out.stderr
  assert calls() == []
