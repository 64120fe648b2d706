"""Preemption notices: SIGTERM asks training to checkpoint at the next step boundary and stop.

Schedulers (Kubernetes, Slurm, Cloud TPU maintenance) send SIGTERM some time
before they kill a job. One process: a handler records the signal and the loop
asks `reached(step)` after every step. Several processes (jax.distributed): the
signal may reach one host only, and every host must save the *same* step, so
the loop asks JAX's preemption sync point instead
(`multihost_utils.reached_preemption_sync_point`): the coordination service,
which `jax.distributed.initialize` starts with its preemption service
(`jax_enable_preemption_service`, on by default), catches SIGTERM on any host
and answers True on all hosts at the same step. No Python handler is installed
then: it would take SIGTERM away from that service.
"""
import logging
import signal
import threading

import jax


class PreemptionNotice:
  """`with PreemptionNotice() as notice: ... if notice.reached(step): save and stop`."""

  def __init__(self):
    self._received = threading.Event()
    self._previous_handler = None
    self._multihost = jax.process_count() > 1
    self._sync_point_available = True

  def __enter__(self) -> "PreemptionNotice":
    if self._multihost:
      return self
    if threading.current_thread() is not threading.main_thread():
      # Python delivers signals to the main thread only; a training loop elsewhere (a notebook
      # worker, a test thread) keeps SIGTERM's default action.
      logging.warning("training outside the main thread: SIGTERM will not checkpoint")
      return self
    self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._received.set()

  def reached(self, step: int) -> bool:
    """True when training should save `step` and stop. Call once per step, on every process,
    with the same step numbers (the multi-host sync point requires it)."""
    if not self._multihost:
      return self._received.is_set()
    if not self._sync_point_available:
      return False
    from jax.experimental import multihost_utils
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as e:  # jax_enable_preemption_service=False
      logging.warning("SIGTERM will not checkpoint: %s", e)
      self._sync_point_available = False
      return False
