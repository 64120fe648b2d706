"""The serving engines: continuous batching in slots, and one request at a time.

`SlotEngine` (the default) is continuous batching of decode steps (Flover's temporal fusion
for AR models): a scheduler thread owns one `SlotDecoder` (arjax/sampling/slots.py) per head
step count, each a fixed number of slots. Between two steps it drops the slots of requests
that ended (timed out, cancelled: a client that went away), admits queued images into free
slots (FIFO; a request's images may spread over several steps' admissions), then runs ONE
compiled step that advances every slot by one unit (the narrowest of the decoder's compiled
widths that holds every live slot: new images take the lowest free slots), and hands every
image that took its last unit to its request at once; the slot is free for the next step. Shapes never change, so
requests coming and going compile nothing. An image depends on (class, seed, its index,
settings) only, so it is the image `python -m arjax sample` draws for the same.

`SequentialEngine` is the server before slots (`--engine=sequential`, and the fallback for a
family without `Family.slot_decoder`): one request at a time through the family's sampler,
in batches of `SEQUENTIAL_BATCH` images (the old 4 x 4 grid; a smaller request is padded to
it), one compiled program per guidance on/off. `--engine=per_request` is the same with each
batch the power of two that fits the request (one program per batch size and guidance):
per-request batching at its best, which the slot engine must also beat.
`benchmarks/serve_load.py` compares the three.

Both take `Job`s (arjax/serving/jobs.py) through `submit`, which refuses with `QueueFull` when
`queue_size` requests wait for their first image to start, and `shutdown`, which rejects
what has not started and finishes the rest within a grace time.
"""
import collections
import dataclasses
import threading
import time
import traceback

import jax
import numpy as np

from arjax.data import pipeline
from arjax.parallel import sharding
from arjax.sampling.slots import SlotsUnsupported
from arjax.serving import jobs as jobs_lib

SEQUENTIAL_BATCH = 16  # the old server's 4 x 4 grid: the largest batch of one sampler call
ENGINES = ("slots", "sequential", "per_request")
MAX_DECODERS = 4  # head-step counts with compiled slots at once (each is its own program)
# Emitted by JAX each time it traces a function for a (new) jit cache entry.
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


class QueueFull(RuntimeError):
  """`queue_size` requests are waiting already."""


class ShuttingDown(RuntimeError):
  """The server got SIGTERM: it takes no new work."""


class TraceCounter:
  """Counts JAX traces in this process (`TRACE_EVENT`): a steady count means no compiling."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration, kwargs
    if event == TRACE_EVENT:
      self.count += 1


@dataclasses.dataclass(frozen=True)
class EngineSettings:
  """`serve`'s engine flags, checked at start-up (ValueError naming the flag)."""
  engine: str = "slots"       # 'slots' | 'sequential' | 'per_request' (module docstring)
  slots: int = 32             # slots per head-step count (the slot engine's batch)
  queue_size: int = 64        # requests waiting for their first slot before a 429
  request_timeout_s: float = 300.0  # default and largest `timeout_s` of a request
  shutdown_grace_s: float = 60.0    # SIGTERM: how long running requests may take to finish

  def __post_init__(self):
    if self.engine not in ENGINES:
      raise ValueError(f"--engine={self.engine!r}: one of {', '.join(map(repr, ENGINES))}")
    for name, low in (("slots", 1), ("queue_size", 1)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"--{name}={value!r}: an integer >= {low}")
    if self.slots > 4096:
      raise ValueError(f"--slots={self.slots}: at most 4096 (each slot holds a KV cache)")
    for name, flag in (("request_timeout_s", "request_timeout"),
                       ("shutdown_grace_s", "shutdown_grace")):
      if not getattr(self, name) > 0:
        raise ValueError(f"--{flag}={getattr(self, name)!r}: seconds > 0")


class Engine:
  """What both engines share: the queue, its lock, submission, cancelling, shutdown."""
  name = ""

  def __init__(self, sampler, params, settings: EngineSettings, metrics, traces: TraceCounter):
    self.sampler, self.params, self.settings = sampler, params, settings
    self.metrics, self.traces = metrics, traces
    self.lock = threading.Condition()
    self.queue = collections.deque()   # jobs with images not yet started, FIFO
    self.stopping = False
    self.stopped = threading.Event()
    self._thread = None

  # --- called by HTTP handler threads ---

  def new_job(self, **request) -> jobs_lib.Job:
    return jobs_lib.Job(changed=self.lock, **request)

  def submit(self, job: jobs_lib.Job) -> None:
    with self.lock:
      if self.stopping:
        raise ShuttingDown("the server is shutting down (SIGTERM): it takes no new requests")
      if len(self.queue) >= self.settings.queue_size:
        raise QueueFull(f"the queue is full: {len(self.queue)} requests wait for a slot "
                        f"(--queue_size={self.settings.queue_size}); retry later")
      self.queue.append(job)
      self.lock.notify_all()

  def cancel(self, job: jobs_lib.Job, status=jobs_lib.CANCELLED, error=None) -> None:
    """Ends `job` now; its slots are free at the next step boundary."""
    with self.lock:
      self._end(job, status, error or "cancelled by the client")

  def queue_length(self) -> int:
    with self.lock:
      return len(self.queue)

  def live_slots(self) -> int:
    return 0

  def num_slots(self) -> int:
    return 0

  def shutdown(self, log=print) -> None:
    """Rejects every queued request, lets running ones finish within the grace time (then
    rejects them too, keeping their finished images), stops the scheduler."""
    with self.lock:
      self.stopping = True
      waiting = [job for job in self.queue if job.status == jobs_lib.QUEUED]
      for job in waiting:
        self._end(job, jobs_lib.REJECTED, "the server is shutting down (SIGTERM): this "
                  "request had not started; send it again to a running server")
      running = [job for job in self._running() if not job.is_final()]
      log(f"shutdown: rejected {len(waiting)} queued request(s); finishing {len(running)} "
          f"running (up to {self.settings.shutdown_grace_s:g} s)")
      self.lock.notify_all()
    if not self.stopped.wait(self.settings.shutdown_grace_s):
      with self.lock:
        late = [job for job in self._running() if not job.is_final()]
        for job in late:
          self._end(job, jobs_lib.REJECTED, "the server shut down before this request finished")
        log(f"shutdown: grace time over; rejected {len(late)} unfinished request(s)")
        self.lock.notify_all()
      self.stopped.wait(30)

  def start(self) -> None:
    self._thread = threading.Thread(target=self._serve, name=f"{self.name}-engine", daemon=True)
    self._thread.start()

  # --- the scheduler's side (holding the lock where it says so) ---

  def _running(self):
    raise NotImplementedError

  def _end(self, job, status, error=None) -> None:
    """Ends a job (lock held) and counts it."""
    if job.is_final():
      return
    if job in self.queue:
      self.queue.remove(job)
    job.finish(status, error)
    self.metrics.request_ended(status, job.latency())

  def _expire(self, now) -> None:
    """Ends the requests whose time is up (lock held)."""
    for job in list(self.queue) + list(self._running()):
      if not job.is_final() and now > job.deadline:
        self._end(job, jobs_lib.TIMED_OUT, f"timed out after {job.timeout_s:g} s "
                  f"({job.num_done} of {job.count} images done)")

  def _start(self, job) -> None:
    if job.status == jobs_lib.QUEUED:
      job.status, job.started, job.traces_at_start = (jobs_lib.RUNNING, time.monotonic(),
                                                      self.traces.count)
      job.changed.notify_all()

  def _deliver(self, job, index: int, image: np.ndarray) -> None:
    """Image `index` of `job` is drawn (lock held): its readers wake, the last one ends it."""
    if job.is_final():
      return
    job.images[index] = image
    job.num_done += 1
    self.metrics.image_done()
    if self.traces.count != job.traces_at_start:
      job.compiled = True
    if job.num_done == job.count:
      self._end(job, jobs_lib.DONE)
    else:
      job.changed.notify_all()

  def _serve(self):
    try:
      self._loop()
    except Exception as e:  # pylint: disable=broad-except  (every waiting request hears of it)
      traceback.print_exc()
      with self.lock:
        for job in list(self.queue) + list(self._running()):
          self._end(job, jobs_lib.FAILED, f"the engine failed: {type(e).__name__}: {e}")
        self.stopping = True
    finally:
      self.stopped.set()

  def _loop(self):
    raise NotImplementedError


class _Slots:
  """One decoder's slots: who owns each (job, image index) and how many steps it still needs."""

  def __init__(self, decoder):
    self.decoder = decoder
    # Committed to the parameters' device, as every state a program returns is: a state of
    # another placement would be traced again at its first admission.
    self.state = jax.device_put(decoder.init(), jax.local_devices()[0])
    self.owner = [None] * decoder.num_slots
    self.left = [0] * decoder.num_slots
    self.last_used = time.monotonic()

  def free(self):
    return [s for s, o in enumerate(self.owner) if o is None]

  def live(self) -> int:
    return sum(o is not None for o in self.owner)

  def width(self) -> int:
    """The narrowest compiled step holding every live slot."""
    highest = max((s for s, o in enumerate(self.owner) if o is not None), default=0)
    return next(w for w in self.decoder.step_widths if w > highest)


class SlotEngine(Engine):
  """Continuous batching in slots (the module docstring)."""
  name = "slots"

  def __init__(self, family, sampler, params, settings, metrics, traces):
    super().__init__(sampler, params, settings, metrics, traces)
    self.family = family
    # One device: the slots' states live there, and so do the parameters (on a simulated
    # multi-device CPU every replica would compute every slot).
    self.params = jax.device_put(params, jax.local_devices()[0])
    self.pools = collections.OrderedDict()   # num_steps -> _Slots
    self._make_decoder(sampler.num_steps)     # fails early for a family without slots

  def _make_decoder(self, num_steps: int):
    sampler = self.sampler
    if sampler.num_steps != num_steps:
      sampler = dataclasses.replace(sampler, num_steps=num_steps)
    return self.family.slot_decoder(sampler, self.settings.slots)

  def warm_up(self, labels_and_settings) -> float:
    """Compiles the default head-step count's admit, step and image programs (the first
    request would otherwise wait for them). Returns the seconds it took."""
    start = time.perf_counter()
    pool = self._pool(self.sampler.num_steps)
    d = pool.decoder
    label, seed, cfg_scale, schedule, temperature = labels_and_settings
    for _ in range(2):  # the second round checks that the first left nothing to trace
      pool.state = d.admit(self.params, pool.state, 0, label=label, seed=seed, index=0,
                           scales=d.guidance_scales(cfg_scale, schedule),
                           temperature=temperature)
      for width in d.step_widths:
        pool.state = d.step(self.params, pool.state, width)
      np.asarray(d.image(pool.state, 0))
    return time.perf_counter() - start

  def _pool(self, num_steps):
    if num_steps not in self.pools:
      idle = sorted((p.last_used, n) for n, p in self.pools.items() if p.live() == 0)
      idle = [n for _, n in idle]  # least recently stepped first
      if len(self.pools) >= MAX_DECODERS:
        if not idle:
          return None  # every decoder busy: the request waits for one to drain
        del self.pools[idle[0]]
      self.pools[num_steps] = _Slots(self._make_decoder(num_steps))
    return self.pools[num_steps]

  def live_slots(self) -> int:
    return sum(p.live() for p in list(self.pools.values()))

  def num_slots(self) -> int:
    return self.settings.slots

  def _running(self):
    owners = {o[0] for p in self.pools.values() for o in p.owner if o is not None}
    started = [job for job in self.queue if job.status == jobs_lib.RUNNING]
    return list(owners | set(started))

  def _plan(self):
    """Frees the slots of ended requests and assigns queued images to free slots (lock held).
    Returns [(pool, slot, job, index)] to admit."""
    for pool in self.pools.values():
      for slot, owner in enumerate(pool.owner):
        if owner is not None and owner[0].is_final():
          pool.owner[slot] = None  # ended (timeout, cancel): free for this step's admissions
    admissions = []
    for job in list(self.queue):
      if job.is_final():
        self.queue.remove(job)
        continue
      pool = self._pool(job.num_steps)
      if pool is None:
        continue
      free = pool.free()
      while free and job.next_index < job.count:
        slot = free.pop(0)
        pool.owner[slot] = (job, job.next_index)
        pool.left[slot] = pool.decoder.num_units
        admissions.append((pool, slot, job, job.next_index))
        job.next_index += 1
        self._start(job)
      if job.next_index == job.count:
        self.queue.remove(job)  # all of its images are in slots: no longer waiting
    return admissions

  def _loop(self):
    while True:
      with self.lock:
        self._expire(time.monotonic())
        admissions = self._plan()
        if self.stopping and not self.queue and not self.live_slots():
          return
        if not admissions and not self.live_slots():
          self.lock.wait(0.5)
          continue
      for pool, slot, job, index in admissions:
        d = pool.decoder
        pool.state = d.admit(self.params, pool.state, slot, label=int(job.labels[index]),
                             seed=job.seed, index=index,
                             scales=d.guidance_scales(job.cfg_scale, job.cfg_schedule),
                             temperature=job.temperature)
      finished = []
      for pool in list(self.pools.values()):
        if not pool.live():
          continue
        width = pool.width()
        pool.state = pool.decoder.step(self.params, pool.state, width)
        pool.last_used = time.monotonic()
        for slot, owner in enumerate(pool.owner[:width]):
          if owner is not None:
            pool.left[slot] -= 1
            if pool.left[slot] == 0:
              finished.append((pool, slot, owner))
      # Read the finished images outside the lock (this waits for the device).
      images = [(pool, slot, owner, pipeline.denormalize(np.asarray(
          pool.decoder.image(pool.state, slot)))) for pool, slot, owner in finished]
      with self.lock:
        for pool, slot, (job, index), image in images:
          if pool.owner[slot] == (job, index):
            pool.owner[slot] = None
          self._deliver(job, index, image)


class SequentialEngine(Engine):
  """One request at a time through the family's sampler (the module docstring)."""
  name = "sequential"

  def __init__(self, sampler, params, settings, metrics, traces):
    super().__init__(sampler, params, settings, metrics, traces)
    self.name = settings.engine  # 'sequential' (grid batches) or 'per_request' (fitted)
    self._samplers = collections.OrderedDict()  # num_steps -> sampler, least recent first
    self._current = None

  def _sampler(self, num_steps):
    if num_steps not in self._samplers:
      sampler = self.sampler
      if sampler.num_steps != num_steps:
        sampler = dataclasses.replace(sampler, num_steps=num_steps)
        if self.sampler._activations is not None:  # pylint: disable=protected-access
          sampler.shard_activations(*self.sampler._activations)  # pylint: disable=protected-access
      self._samplers[num_steps] = sampler
      while len(self._samplers) > MAX_DECODERS:
        self._samplers.popitem(last=False)
    self._samplers.move_to_end(num_steps)
    return self._samplers[num_steps]

  def warm_up(self, labels_and_settings) -> float:
    start = time.perf_counter()
    label, seed, cfg_scale, schedule, temperature = labels_and_settings
    images = self._sampler(self.sampler.num_steps)(
        self.params, np.full((SEQUENTIAL_BATCH,), label), jax.random.PRNGKey(seed),
        cfg_scale=cfg_scale, cfg_schedule_name=schedule, temperature=temperature)
    sharding.to_host(images)
    return time.perf_counter() - start

  def live_slots(self) -> int:
    job = self._current
    return 0 if job is None or job.is_final() else min(job.count - job.num_done, SEQUENTIAL_BATCH)

  def num_slots(self) -> int:
    return SEQUENTIAL_BATCH

  def _running(self):
    return [] if self._current is None else [self._current]

  def _loop(self):
    while True:
      with self.lock:
        self._expire(time.monotonic())
        while self.queue and self.queue[0].is_final():
          self.queue.popleft()
        if not self.queue:
          if self.stopping:
            return
          self.lock.wait(0.5)
          continue
        job = self._current = self.queue.popleft()
        self._start(job)
      sampler = self._sampler(job.num_steps)
      rng = jax.random.PRNGKey(job.seed)
      for start in range(0, job.count, SEQUENTIAL_BATCH):
        with self.lock:
          self._expire(time.monotonic())
          if job.is_final():
            break
        chunk = job.labels[start:start + SEQUENTIAL_BATCH]
        batch = SEQUENTIAL_BATCH
        if self.name == "per_request":  # the power of two that fits
          batch = min(SEQUENTIAL_BATCH, 1 << (len(chunk) - 1).bit_length())
        images = sampler(self.params, np.resize(chunk, batch), rng, first_index=start,
                         cfg_scale=job.cfg_scale, cfg_schedule_name=job.cfg_schedule,
                         temperature=job.temperature)
        images = pipeline.denormalize(sharding.to_host(images))
        with self.lock:
          for i in range(len(chunk)):
            self._deliver(job, start + i, images[i])
      with self.lock:
        self._current = None


def make_engine(exp, params, settings: EngineSettings, metrics, traces, log=print) -> Engine:
  """The engine `settings.engine` names; 'slots' falls back to one request at a time, saying
  why, for a family (or sampler setting) that cannot decode in slots."""
  sampler = exp.sampler()
  if settings.engine == "slots":
    try:
      return SlotEngine(exp.family, sampler, params, settings, metrics, traces)
    except SlotsUnsupported as e:
      log(f"serve: {e}: serving one request at a time (--engine=per_request)")
      settings = dataclasses.replace(settings, engine="per_request")
  return SequentialEngine(sampler, params, settings, metrics, traces)
