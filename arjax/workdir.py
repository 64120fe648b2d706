"""The workdir: where a run keeps checkpoints, logs and samples."""
import os


def check_workdir(workdir: str) -> None:
  """Fails early (before any training) when the workdir cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise OSError(f"--workdir={workdir} is not writable: {e}") from e
