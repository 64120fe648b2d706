"""Progress reports a person can read: a bar on a terminal, a line now and then in a log file.

Data preparation, training, sampling, latent caching and evaluation report through `bar(...)`.
Only process 0 of a multi-host job reports. Where stderr is a terminal, the report is a tqdm
bar. Where it is not (a log file, a scheduler's capture, a pipe), a bar's carriage returns
would pile up into one endless line, so the report becomes a plain line every
`ARJAX_PROGRESS_SECONDS` seconds (default 30), with one at the start, one after the first unit
(which carries the compile) and one at the end:

    train: 400/1600 steps (25%), 3.85 steps/s, eta 5m12s, loss 0.4321, img/s 493

`ARJAX_PROGRESS=bar|lines|off` forces a mode. Everything here runs on the host, between jitted
calls: reporting never adds a device sync (the caller decides what it has already fetched).
"""
import os
import sys
import time
from typing import Optional

import tqdm

MODE_ENV = "ARJAX_PROGRESS"
SECONDS_ENV = "ARJAX_PROGRESS_SECONDS"
MODES = ("bar", "lines", "off")
DEFAULT_SECONDS = 30.0


def mode() -> str:
  """'bar' on a terminal, 'lines' elsewhere, unless $ARJAX_PROGRESS says otherwise."""
  forced = os.environ.get(MODE_ENV, "").strip().lower()
  if forced:
    if forced not in MODES:
      raise ValueError(f"${MODE_ENV}={forced!r}: must be one of {MODES}")
    return forced
  return "bar" if sys.stderr.isatty() else "lines"


def _interval() -> float:
  raw = os.environ.get(SECONDS_ENV)
  try:
    return DEFAULT_SECONDS if raw is None else max(0.0, float(raw))
  except ValueError:
    raise ValueError(f"${SECONDS_ENV}={raw!r}: expected a number of seconds") from None


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class LogLines:
  """The subset of tqdm's interface the loops use, reporting as occasional whole lines."""

  def __init__(self, total: Optional[int], desc: str, unit: str, initial: int = 0,
               interval: float = DEFAULT_SECONDS, file=None):
    self.total, self.desc, self.unit, self.n = total, desc, unit, initial
    self.interval, self.file = interval, file or sys.stderr
    self.postfix = ""
    self._last_time, self._last_n = time.perf_counter(), initial
    self._closed = self._started = False
    # Said at once, as a terminal bar shows at once: a log says the loop has begun (and where
    # a resumed run begins) without waiting a whole interval.
    print(self.line() + ", starting", file=self.file, flush=True)

  @property
  def units(self) -> str:
    return self.unit + ("es" if self.unit.endswith(("s", "sh", "ch", "x")) else "s")

  def set_postfix(self, values=None, **more) -> None:
    self.postfix = ", ".join(f"{k} {v}" for k, v in {**(values or {}), **more}.items())

  def update(self, n: int = 1) -> None:
    self.n += n
    now = time.perf_counter()
    if not self._started:
      # Rates count from the end of the first unit, which carries the compile: say how long
      # it took, apart, so that a slow first step in a log reads as compiling, not a hang.
      self._started = True
      if self.n != self.total:
        print(f"{self.desc}: first {self.unit} done after {now - self._last_time:.1f} s "
              "(compiling included)", file=self.file, flush=True)
        self._last_time, self._last_n = now, self.n
        return
    if now - self._last_time >= self.interval or self.n == self.total:
      self._report()

  def line(self, now: Optional[float] = None) -> str:
    """The report as of now: count, share, rate since the last line, time left, postfix."""
    now = time.perf_counter() if now is None else now
    parts = [f"{self.desc}: {self.n}/{self.total} {self.units}" if self.total else
             f"{self.desc}: {self.n} {self.units}"]
    if self.total:
      parts[0] += f" ({100 * self.n / self.total:.0f}%)"
    elapsed, done = now - self._last_time, self.n - self._last_n
    if done > 0 and elapsed > 0:
      rate = done / elapsed
      parts.append(f"{rate:.3g} {self.units}/s")
      if self.total and self.n < self.total:
        parts.append(f"eta {_duration((self.total - self.n) / rate)}")
    if self.postfix:
      parts.append(self.postfix)
    return ", ".join(parts)

  def _report(self) -> None:
    now = time.perf_counter()
    print(self.line(now), file=self.file, flush=True)
    self._last_time, self._last_n = now, self.n

  def write(self, message: str) -> None:
    print(message, flush=True)

  def close(self) -> None:
    if not self._closed and self.n != self._last_n:
      self._report()  # the final count, if the last update did not already say it
    self._closed = True

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __iter__(self):
    raise TypeError("LogLines is not iterable; use progress.iterate")


def bar(total: Optional[int], *, desc: str, unit: str = "it", initial: int = 0,
        enabled: bool = True):
  """A progress report of `total` units (see the module docstring); a silent one if not
  `enabled` (e.g. on processes other than 0) or in mode 'off'."""
  how = mode()
  if not enabled or how == "off":
    return tqdm.tqdm(total=total, disable=True)
  if how == "lines":
    return LogLines(total, desc, unit, initial=initial, interval=_interval())
  return tqdm.tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0)


def iterate(items, *, desc: str, unit: str = "it", enabled: bool = True):
  """Yields from `items` (a sized iterable), reporting one unit per item."""
  items = list(items) if not hasattr(items, "__len__") else items
  with bar(len(items), desc=desc, unit=unit, enabled=enabled) as report:
    for item in items:
      yield item
      report.update(1)
