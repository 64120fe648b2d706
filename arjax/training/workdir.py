"""The workdir: where a run keeps checkpoints, logs and samples, checked before it is written."""
import os
import shutil


class DiskSpaceError(OSError):
  """The workdir's filesystem has less free space than a run needs to write."""


def check_workdir(workdir: str) -> None:
  """Fails early (before any training) when the workdir cannot be written, or is a URL."""
  if "://" in workdir:
    # os.makedirs would make a local directory named 'gs:'; every host must see one path.
    raise OSError(f"--workdir={workdir}: arjax writes to file-system paths, not URLs; mount the "
                  "bucket (e.g. gcsfuse, as launch/tpu_pod.py does) and pass its local path")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise OSError(f"--workdir={workdir} is not writable: {e}") from e


def free_bytes(workdir: str) -> int:
  """Bytes an unprivileged process may still write on the filesystem that holds `workdir`
  (or would hold it: the nearest existing ancestor is asked when it does not exist yet)."""
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return shutil.disk_usage(path).free


def check_free_space(workdir: str, needed_bytes: int, *, what: str = "one checkpoint") -> int:
  """Fails early, writing nothing, when the workdir's filesystem has < `needed_bytes` free.

  `needed_bytes` is the caller's estimate of what it is about to write (for training,
  `arjax.training.state.state_nbytes(abstract_state)`: one checkpoint); `what` names it in the
  message. Returns the free bytes seen. Raises DiskSpaceError (an OSError) naming the
  workdir, the free bytes and the bytes needed.
  """
  if isinstance(needed_bytes, bool) or not isinstance(needed_bytes, int) or needed_bytes < 0:
    raise ValueError(f"needed_bytes={needed_bytes!r}: expected an integer >= 0")
  free = free_bytes(workdir)
  if free < needed_bytes:
    raise DiskSpaceError(
        f"--workdir={workdir}: its filesystem has {free} bytes free ({_human(free)}), but "
        f"{needed_bytes} bytes ({_human(needed_bytes)}) are needed for {what}; free some space "
        "or choose another --workdir")
  return free


def _human(num_bytes: int) -> str:
  value = float(num_bytes)
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if value < 1024 or unit == "TiB":
      return f"{value:.1f} {unit}" if unit != "B" else f"{num_bytes} B"
    value /= 1024
  raise AssertionError("unreachable")
