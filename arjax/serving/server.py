"""`serve`: many requests at once over HTTP, drawn by continuous batching of decode steps.

    python -m arjax serve --workdir=DIR [--config=configs/X.py] [--port=8000] [--host=127.0.0.1]
        [--engine=slots|sequential|per_request] [--slots=32] [--queue_size=64] [--request_timeout=300]

Standard library only (`http.server`, one thread per connection). Loopback by default and no
authentication: anyone who can reach the port can use the model.

    GET    /            the demo page (demo_page.html)
    GET    /info        {"num_classes", "grid_size", "step", "engine", "slots", "defaults", ...}
    POST   /generate    the fields of arjax/serving/requests.py
                        -> 202 {"id", "url": "/jobs/<id>", "count", "request"}
                        -> with "stream": true, 200 NDJSON: {"id", "count", "status"}, then
                           {"index", "image"} per image as it finishes, then the job (below)
                        -> 400 {"error": message naming the field, "field": name}
                        -> 429 {"error"} when --queue_size requests wait already (Retry-After)
                        -> 503 {"error"} once shutting down
    GET    /jobs/<id>   {"id", "status", "count", "done", "images": [data URL or null],
                         "grid" (all done), "error", "latency_seconds", "compiled", "request"}
    DELETE /jobs/<id>   cancels it: its slots are free at the next step
    GET    /metrics     Prometheus text: queue length, live slots, images/s, p50/p95 latency

The engines (arjax/serving/engine.py): `slots` decodes every request's images in a fixed
number of batch slots, one compiled step for all, admitting new images at step boundaries;
`sequential` answers one request at a time in padded batches of 16 (the server before slots,
kept for comparison) and `per_request` one at a time in batches fitted to each (also the
fallback for families without `Family.slot_decoder`). Either way image i of a request with seed S is
image i of `python -m arjax sample --config.sample.seed=S` with the same class and settings.

A request ends when all of its images are drawn, when its `timeout_s` passes (status
`timed_out`, images so far kept), when it is cancelled (DELETE, or a streaming client that
disconnects), or at shutdown. SIGTERM (or Ctrl-C) stops taking requests (503), rejects the
queued ones (status `rejected`, and their streams are told), lets the running ones finish
within --shutdown_grace seconds, then exits.
"""
import base64
import collections
import http.server
import io
import json
import math
import os
import select
import signal
import socket
import threading

import numpy as np
from PIL import Image

from arjax.training import checkpoint
from arjax.util.image_grid import make_grid
from arjax.serving import engine as engine_lib
from arjax.serving import jobs as jobs_lib
from arjax.serving import metrics as metrics_lib
from arjax.serving import requests as requests_lib
from arjax.serving.requests import RequestError

GRID_SIZE = requests_lib.DEFAULT_COUNT  # the page's 4 x 4 grid
MAX_BODY_BYTES = 16384
KEPT_JOBS = 1024   # ended jobs kept for GET /jobs/<id>, oldest forgotten first
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_page.html")


def workdir_config(workdir: str):
  """The config a workdir was trained (or converted) with: DIR/config.json (`configs.load_json`)."""
  from arjax.config import schema as configs

  check_served_workdir(workdir)
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--workdir={workdir} holds no config.json (written by `train` and "
                            f"`convert`): pass the config it was trained with, --config=configs/X.py")
  return configs.load_json(path)


def check_served_workdir(workdir: str) -> None:
  """A workdir that does not exist or holds no checkpoint fails here, before any compiling."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir={workdir} does not exist: train first "
                            f"(python -m arjax train --config=... --workdir={workdir})")
  if not checkpoint.committed_steps(checkpoint.checkpoint_dir(workdir)):
    raise FileNotFoundError(f"--workdir={workdir} holds no checkpoint: train first "
                            f"(python -m arjax train --config=... --workdir={workdir})")


def png(image) -> bytes:
  """uint8 [H, W, C] -> PNG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  return buffer.getvalue()


def grid_png(images) -> bytes:
  """uint8 [N, H, W, C] -> a square-ish PNG grid, small images upscaled to ~64 px cells."""
  n, h = images.shape[:2]
  rows = max(1, int(math.sqrt(n)))
  return png(make_grid(images, num_rows=rows, upscale=max(1, 64 // h)))


def data_url(data: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


class Service:
  """A workdir's parameters behind an engine, and the jobs it has been given."""

  def __init__(self, exp, workdir: str, settings: engine_lib.EngineSettings, log=print):
    check_served_workdir(workdir)
    self.exp, self.workdir, self.settings = exp, workdir, settings
    s = exp.config.sample
    self.params, self.step = checkpoint.restore_params(exp, workdir, s.use_ema)
    self.num_classes = exp.config.data.num_classes
    self.defaults = {"label": 0, "count": GRID_SIZE, "cfg_scale": s.cfg_scale,
                     "cfg_schedule": s.cfg_schedule, "temperature": s.temperature,
                     "num_steps": s.num_steps, "seed": s.seed}
    self.metrics = metrics_lib.ServerMetrics()
    self.traces = engine_lib.TraceCounter()
    self.engine = engine_lib.make_engine(exp, self.params, settings, self.metrics, self.traces,
                                         log=log)
    self._jobs = collections.OrderedDict()   # id -> Job, oldest first
    self._jobs_lock = threading.Lock()

  def info(self) -> dict:
    return {"num_classes": self.num_classes, "grid_size": GRID_SIZE, "step": self.step,
            "workdir": os.path.abspath(self.workdir), "family": self.exp.config.model.family,
            "image_size": self.exp.config.data.image_size,
            "use_ema": bool(self.exp.config.sample.use_ema),
            "max_steps": requests_lib.MAX_STEPS, "max_count": requests_lib.MAX_COUNT,
            "engine": self.engine.name, "slots": self.engine.num_slots(),
            "queue_size": self.settings.queue_size, "defaults": self.defaults}

  def parse(self, body) -> dict:
    return requests_lib.parse(body, defaults=self.defaults, num_classes=self.num_classes,
                              head=self.exp.head, max_timeout_s=self.settings.request_timeout_s)

  def warm_up(self) -> float:
    d = self.defaults
    return self.engine.warm_up((d["label"], d["seed"], d["cfg_scale"], d["cfg_schedule"],
                                d["temperature"]))

  def submit(self, request: dict) -> jobs_lib.Job:
    """Queues a parsed request (QueueFull, ShuttingDown)."""
    job = self.engine.new_job(
        labels=request["labels"], seed=request["seed"], cfg_scale=request["cfg_scale"],
        cfg_schedule=request["cfg_schedule"], temperature=request["temperature"],
        num_steps=request["num_steps"], timeout_s=request["timeout_s"])
    job.request = requests_lib.describe(request)
    self.engine.submit(job)
    with self._jobs_lock:
      self._jobs[job.id] = job
      while len(self._jobs) > KEPT_JOBS:
        oldest = next(iter(self._jobs.values()))
        if not oldest.is_final():
          break
        self._jobs.popitem(last=False)
    return job

  def job(self, job_id: str):
    with self._jobs_lock:
      return self._jobs.get(job_id)

  def job_json(self, job: jobs_lib.Job) -> dict:
    with job.changed:
      images = list(job.images)
      status, error, done = job.status, job.error, job.num_done
      latency, compiled = job.latency(), job.compiled
      queued = None if job.started is None else job.started - job.submitted
    reply = {"id": job.id, "status": status, "count": job.count, "done": done,
             "images": [None if im is None else data_url(png(im)) for im in images],
             "error": error, "latency_seconds": latency, "queued_seconds": queued,
             "compiled": compiled, "request": job.request}
    if status == jobs_lib.DONE:
      reply["grid"] = data_url(grid_png(np.stack(images)))
    return reply

  def metrics_text(self) -> str:
    return self.metrics.render(queue_length=self.engine.queue_length(),
                               live_slots=self.engine.live_slots(),
                               slots=self.engine.num_slots(), traces=self.traces.count,
                               engine=self.engine.name)


def _client_gone(connection) -> bool:
  """Whether the peer closed its end (a readable socket with nothing to read)."""
  try:
    readable, _, _ = select.select([connection], [], [], 0)
    if not readable:
      return False
    return connection.recv(1, socket.MSG_PEEK) == b""
  except (OSError, ValueError):
    return True


def make_handler(service: Service):
  """The request handler class of a server answering for `service`."""
  with open(PAGE, "rb") as f:
    page = f.read()

  class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "arjax-serve"
    timeout = 60  # a client that sends nothing holds a thread no longer than this

    def log_request(self, code="-", size="-"):
      pass  # one line per poll would drown the log; errors (log_error) are still printed

    def _send(self, status: int, body: bytes, content_type: str, headers=()):
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(body)))
      self.send_header("Cache-Control", "no-store")
      for name, value in headers:
        self.send_header(name, value)
      self.end_headers()
      self.wfile.write(body)

    def _json(self, status: int, reply: dict, headers=()):
      self._send(status, json.dumps(reply).encode(), "application/json", headers)

    def do_GET(self):  # noqa: N802 (http.server's naming)
      if self.path in ("/", "/index.html"):
        self._send(200, page, "text/html; charset=utf-8")
      elif self.path == "/info":
        self._json(200, service.info())
      elif self.path == "/metrics":
        self._send(200, service.metrics_text().encode(), "text/plain; version=0.0.4")
      elif self.path.startswith("/jobs/"):
        job = service.job(self.path[len("/jobs/"):])
        if job is None:
          self._json(404, {"error": f"{self.path}: no such job (ended jobs are kept for the "
                           f"last {KEPT_JOBS})"})
        else:
          self._json(200, service.job_json(job))
      else:
        self._json(404, {"error": f"{self.path}: not found; the page is /"})

    def do_DELETE(self):  # noqa: N802
      job = service.job(self.path[len("/jobs/"):]) if self.path.startswith("/jobs/") else None
      if job is None:
        self._json(404, {"error": f"{self.path}: no such job"})
        return
      service.engine.cancel(job)
      self._json(200, service.job_json(job))

    def _body(self):
      try:
        length = int(self.headers.get("Content-Length") or 0)
      except ValueError:
        raise RequestError("body", "Content-Length is not a number") from None
      if length > MAX_BODY_BYTES:
        raise RequestError("body", f"the request body is {length} bytes; at most "
                           f"{MAX_BODY_BYTES}")
      try:
        return json.loads(self.rfile.read(length) or b"{}")
      except ValueError as e:
        raise RequestError("body", f"the request body is not JSON: {e}") from None

    def do_POST(self):  # noqa: N802
      if self.path != "/generate":
        self._json(404, {"error": f"{self.path}: not found; POST /generate"})
        return
      try:
        request = service.parse(self._body())
      except RequestError as e:
        self._json(400, {"error": str(e), "field": e.field})
        return
      try:
        job = service.submit(request)
      except engine_lib.QueueFull as e:
        service.metrics.request_ended("queue_full")
        self._json(429, {"error": str(e)}, headers=[("Retry-After", "1")])
        return
      except engine_lib.ShuttingDown as e:
        self._json(503, {"error": str(e)})
        return
      if not request["stream"]:
        self._json(202, {"id": job.id, "url": f"/jobs/{job.id}", "count": job.count,
                         "request": job.request})
        return
      self._stream(job)

    def _stream(self, job):
      """NDJSON: a line when the job is taken, one per image as it finishes, the job last.
      A client that goes away cancels the job (its slots free at the next step)."""
      self.send_response(200)
      self.send_header("Content-Type", "application/x-ndjson")
      self.send_header("Cache-Control", "no-store")
      self.end_headers()  # HTTP/1.0: the body ends when the connection closes
      sent = set()
      try:
        self._line({"id": job.id, "count": job.count, "status": job.status})
        while True:
          with job.changed:
            if not job.is_final() and all(
                job.images[i] is None or i in sent for i in range(job.count)):
              job.changed.wait(0.2)
            fresh = [(i, im) for i, im in enumerate(job.images) if im is not None and i not in sent]
            final = job.is_final()
          for i, image in fresh:
            self._line({"index": i, "image": data_url(png(image))})
            sent.add(i)
          if final:
            reply = service.job_json(job)
            del reply["images"]  # streamed already
            self._line(reply)
            return
          if _client_gone(self.connection):
            raise ConnectionError("the client closed the connection")
      except (ConnectionError, OSError) as e:
        service.engine.cancel(job, error=f"the client went away ({e})")

    def _line(self, reply: dict):
      self.wfile.write(json.dumps(reply).encode() + b"\n")
      self.wfile.flush()

  return Handler


class Server(http.server.ThreadingHTTPServer):
  # Connections waiting to be accepted: a burst of clients must not overflow the default 5
  # while the engine thread holds the interpreter.
  request_queue_size = 128


def run(exp, workdir: str, *, host: str = "127.0.0.1", port: int = 8000,
        settings: engine_lib.EngineSettings = None) -> None:
  """Restores the workdir, compiles the default request, serves until SIGTERM / Ctrl-C."""
  settings = settings or engine_lib.EngineSettings()
  service = Service(exp, workdir, settings)
  try:
    server = Server((host, port), make_handler(service))
  except OSError as e:
    raise OSError(f"--host={host} --port={port}: cannot listen there ({e.strerror or e}); "
                  "pick another --port (0 = any free one)") from None
  server.daemon_threads = False  # server_close() waits for the streams to end
  stopping = threading.Event()

  def stop(signum, frame):
    del frame
    if stopping.is_set():
      return
    stopping.set()
    print(f"serve: {signal.Signals(signum).name}: shutting down", flush=True)

    def drain():
      service.engine.shutdown(log=lambda m: print(m, flush=True))
      server.shutdown()  # serve_forever returns once the engine is done

    threading.Thread(target=drain, name="shutdown", daemon=True).start()

  try:
    print(f"step {service.step} of {os.path.abspath(workdir)} restored; compiling the "
          f"{service.engine.name} engine for the config's default request...", flush=True)
    seconds = service.warm_up()
    service.engine.start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host_name, port_number = server.server_address[:2]
    print(f"engine {service.engine.name} ({service.engine.num_slots()} slots) compiled in "
          f"{seconds:.1f} s\narjax demo page: http://{host_name}:{port_number}/  "
          "(SIGTERM or Ctrl-C stops)", flush=True)
    server.serve_forever()
  finally:
    server.server_close()
    print("serve: stopped", flush=True)
