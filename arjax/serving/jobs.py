"""A generation job: one `POST /generate`, its images as they finish, and how it ended.

The engines fill `images` and move `status` through

    queued -> running -> done
           \\          \\-> timed_out | cancelled | failed | rejected   (final; images so far kept)
            \\-> rejected (queue full at shutdown) | timed_out | cancelled

under the engine's lock; readers (the HTTP handlers) wait on `changed`, which shares it.
"""
import dataclasses
import itertools
import threading
import time
from typing import List, Optional

import numpy as np

QUEUED, RUNNING, DONE = "queued", "running", "done"
TIMED_OUT, CANCELLED, FAILED, REJECTED = "timed_out", "cancelled", "failed", "rejected"
FINAL = (DONE, TIMED_OUT, CANCELLED, FAILED, REJECTED)

_ids = itertools.count(1)


@dataclasses.dataclass(eq=False)
class Job:
  """One request: image i has class labels[i] and is image i of the request with key
  PRNGKey(seed), as `python -m arjax sample` numbers them."""
  labels: np.ndarray          # int [count]
  seed: int
  cfg_scale: float
  cfg_schedule: str
  temperature: float
  num_steps: int
  timeout_s: float
  changed: threading.Condition  # the engine's lock, notified on every change
  id: str = dataclasses.field(default_factory=lambda: f"j{next(_ids)}")
  submitted: float = dataclasses.field(default_factory=time.monotonic)
  status: str = QUEUED
  error: Optional[str] = None
  images: List[Optional[np.ndarray]] = None   # uint8 [H, W, C] per image, None until drawn
  next_index: int = 0          # the next image to start (slot engine)
  num_done: int = 0
  started: Optional[float] = None
  finished: Optional[float] = None
  traces_at_start: int = 0
  compiled: bool = False       # JAX traced a program while this job ran
  request: Optional[dict] = None  # the parsed request as JSON, echoed in replies

  def __post_init__(self):
    self.images = [None] * len(self.labels)

  @property
  def count(self) -> int:
    return len(self.labels)

  @property
  def deadline(self) -> float:
    return self.submitted + self.timeout_s

  def is_final(self) -> bool:
    return self.status in FINAL

  def finish(self, status: str, error: Optional[str] = None) -> None:
    """Ends the job (the caller holds the lock) and wakes its readers."""
    if self.is_final():
      return
    self.status, self.error, self.finished = status, error, time.monotonic()
    self.changed.notify_all()

  def latency(self) -> Optional[float]:
    """Seconds from submission to the end."""
    return None if self.finished is None else self.finished - self.submitted
