"""Preemption notices: SIGTERM is observed at step boundaries, on one process and on several.

The end-to-end behaviour (a real `arjax train` gets SIGTERM, saves the step it reached, exits 0
and resumes from it) is in tests/test_crash_resume.py.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from arjax.training.preemption import PreemptionNotice
from conftest import REPO_ROOT


def test_sigterm_is_noticed_at_the_next_check_and_the_handler_is_restored():
  before = signal.getsignal(signal.SIGTERM)
  with PreemptionNotice() as notice:
    assert not notice.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)  # the process lives on: the handler only takes note
    assert notice.reached(2) and notice.reached(3)
  assert signal.getsignal(signal.SIGTERM) is before


# Two processes joined by jax.distributed, stepping at different speeds; SIGTERM reaches only
# process 1. JAX's preemption service must make both stop at one and the same step.
_WORKER = """
import sys, time
import jax
process_id, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=process_id)
from arjax.training.preemption import PreemptionNotice
with PreemptionNotice() as notice:
  print("ready", flush=True)
  for step in range(1, 100_000):
    if notice.reached(step):
      print("stopping at", step, flush=True)
      break
    time.sleep(0.01 * (1 + process_id))
jax.distributed.shutdown()
"""


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_on_several_processes_all_stop_at_the_same_step_when_one_gets_sigterm():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONUNBUFFERED="1")
  port = str(free_port())
  workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(i), port], cwd=REPO_ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
  try:
    for worker in workers:
      assert worker.stdout.readline().strip() == "ready", worker.stderr.read()
    time.sleep(0.5)  # both are stepping
    workers[1].send_signal(signal.SIGTERM)
    outputs = [worker.communicate(timeout=120) for worker in workers]
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
  for worker, (out, err) in zip(workers, outputs):
    assert worker.returncode == 0, err
  stops = [out.split()[-1] for out, _ in outputs]
  assert stops[0] == stops[1], outputs
  assert int(stops[0]) > 1
