"""Joining JAX's multi-host runtime: one SPMD program over every process of a job.

`initialize` is called once, by the command line, before any other JAX call.
Where the coordinates come from, in order:

  1. flags `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`
     (all three, or none);
  2. the same as environment variables ARJAX_COORDINATOR_ADDRESS,
     ARJAX_NUM_PROCESSES, ARJAX_PROCESS_ID (what `launch/` sets when it must);
  3. auto-detection, by JAX's own cluster detection, on a TPU pod VM (more than
     one worker) and under SLURM with more than one task (`srun`);
  4. otherwise a single process: nothing is initialised.

On CPU, collectives between processes go through gloo (`jax_cpu_collectives_
implementation`), which is how the tests run several processes on one box.
After initialisation every process sees all devices of the job in
`jax.devices()`, and its own in `jax.local_devices()`.
"""
import dataclasses
import os
from typing import Mapping, Optional

ENV_PREFIX = "ARJAX_"


class SetupError(ValueError):
  """The multi-host coordinates given by flags or environment are incomplete or malformed."""


@dataclasses.dataclass(frozen=True)
class Coordinates:
  """Where this process stands in the job; `None` fields are left to JAX's cluster detection."""
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  how: str = "single process"

  @property
  def joins_a_job(self) -> bool:
    return self.how != "single process" and self.num_processes != 1


def _env_int(env: Mapping[str, str], name: str) -> Optional[int]:
  value = env.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise SetupError(f"environment variable {name}={value!r}: expected an integer") from None


def resolve(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None, env: Optional[Mapping[str, str]] = None
            ) -> Coordinates:
  """The coordinates this process should join with (see the module docstring), checked."""
  env = os.environ if env is None else env
  fields = ("coordinator_address", "num_processes", "process_id")
  explicit = dict(zip(fields, (coordinator_address, num_processes, process_id)))
  source, spell = "flags", lambda field: "--" + field
  if all(v is None for v in explicit.values()):
    explicit = {"coordinator_address": env.get(ENV_PREFIX + "COORDINATOR_ADDRESS") or None,
                "num_processes": _env_int(env, ENV_PREFIX + "NUM_PROCESSES"),
                "process_id": _env_int(env, ENV_PREFIX + "PROCESS_ID")}
    source, spell = "environment", lambda field: ENV_PREFIX + field.upper()
  given = [f for f in fields if explicit[f] is not None]
  if given:
    missing = [f for f in fields if explicit[f] is None]
    if missing:
      raise SetupError(
          f"multi-host set-up: {', '.join(map(spell, given))} given without "
          f"{', '.join(map(spell, missing))}: give all three (the coordinator's HOST:PORT, the "
          "number of processes, this process's id) or none")
    address, count, index = (explicit[f] for f in fields)
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      raise SetupError(f"{spell('coordinator_address')}={address!r}: expected HOST:PORT, "
                       "e.g. 10.0.0.2:1234")
    if count < 1:
      raise SetupError(f"{spell('num_processes')}={count}: must be >= 1")
    if not 0 <= index < count:
      raise SetupError(f"{spell('process_id')}={index}: must lie in [0, {count})")
    return Coordinates(address, count, index, how=f"{count} processes ({source})")
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return Coordinates(how="SLURM (auto-detected)")
  if _is_tpu_pod(env):
    return Coordinates(how="TPU pod (auto-detected)")
  return Coordinates()


def _is_tpu_pod(env: Mapping[str, str]) -> bool:
  # TPU VMs of a multi-host slice list every worker's address; one host lists one (or none).
  hostnames = env.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hostnames.split(",") if h]) > 1


def initialize(coords: Coordinates) -> None:
  """Joins the job described by `coords`; a single process initialises nothing."""
  if not coords.joins_a_job:
    return
  import jax

  # Needed for cross-process collectives on CPU; GPU and TPU backends ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coords.coordinator_address,
                             num_processes=coords.num_processes, process_id=coords.process_id)


def is_chief() -> bool:
  """Process 0 writes logs, images, TensorBoard and the config; every process checkpoints."""
  import jax
  return jax.process_index() == 0
