"""The server's counters and their `GET /metrics` page in the Prometheus text format (0.0.4).

Latency is submission to the last image (queueing included) of requests that finished `done`,
over the last `window` of them; images/s counts images finished in the last `rate_window_s`
seconds (the `arjax_images_total` counter is there for Prometheus' own `rate()`).
"""
import collections
import threading
import time

import numpy as np


class ServerMetrics:
  def __init__(self, window: int = 1000, rate_window_s: float = 30.0):
    self._lock = threading.Lock()
    self._latencies = collections.deque(maxlen=window)
    self._image_times = collections.deque()
    self.rate_window_s = rate_window_s
    self.images_total = 0
    self.latency_sum = 0.0
    self.requests = collections.Counter()   # outcome -> count (done, rejected, ...)
    self.started = time.monotonic()

  def image_done(self, now=None) -> None:
    with self._lock:
      self.images_total += 1
      self._image_times.append(time.monotonic() if now is None else now)

  def request_ended(self, outcome: str, latency=None) -> None:
    with self._lock:
      self.requests[outcome] += 1
      if outcome == "done" and latency is not None:
        self._latencies.append(latency)
        self.latency_sum += latency

  def images_per_second(self) -> float:
    with self._lock:
      now = time.monotonic()
      while self._image_times and self._image_times[0] < now - self.rate_window_s:
        self._image_times.popleft()
      span = min(self.rate_window_s, now - self.started)
      return len(self._image_times) / span if span > 0 else 0.0

  def latency_quantiles(self):
    with self._lock:
      if not self._latencies:
        return {0.5: float("nan"), 0.95: float("nan")}
      values = np.asarray(self._latencies)
      return {q: float(np.quantile(values, q)) for q in (0.5, 0.95)}

  def render(self, *, queue_length: int, live_slots: int, slots: int, traces: int,
             engine: str) -> str:
    """The page: one HELP and TYPE line per metric, then its samples."""
    quantiles = self.latency_quantiles()
    lines = []

    def metric(name, kind, text, samples):
      lines.append(f"# HELP {name} {text}")
      lines.append(f"# TYPE {name} {kind}")
      for labels, value in samples:
        lines.append(f"{name}{labels} {value}")

    metric("arjax_queue_length", "gauge", "Requests waiting for their first slot.",
           [("", queue_length)])
    metric("arjax_live_slots", "gauge", "Batch slots drawing an image now.", [("", live_slots)])
    metric("arjax_slots", "gauge", "Batch slots of the engine.",
           [(f'{{engine="{engine}"}}', slots)])
    metric("arjax_images_total", "counter", "Images finished.", [("", self.images_total)])
    metric("arjax_images_per_second", "gauge",
           f"Images finished per second over the last {self.rate_window_s:g} s.",
           [("", f"{self.images_per_second():.4f}")])
    with self._lock:
      count, total = len(self._latencies), self.latency_sum
      outcomes = sorted(self.requests.items())
    metric("arjax_request_latency_seconds", "summary",
           "Submission to last image of finished requests (recent window).",
           [(f'{{quantile="{q}"}}', f"{v:.6f}") for q, v in quantiles.items()]
           + [("_sum", f"{total:.6f}"), ("_count", count)])
    metric("arjax_requests_total", "counter", "Requests by how they ended.",
           [(f'{{outcome="{o}"}}', n) for o, n in outcomes] or [('{outcome="done"}', 0)])
    metric("arjax_traces_total", "counter", "Programs JAX traced (each is a compilation "
           "or a compilation-cache hit).", [("", traces)])
    # The summary's `_sum` / `_count` rows go in as name suffixes (the "labels" slot).
    return "\n".join(lines) + "\n"
