"""`serve`: a local demo page that samples class grids from a trained workdir.

    python -m arjax serve --workdir=DIR [--config=configs/X.py] [--port=8000] [--host=127.0.0.1]

Standard library only (`http.server`): one static page (`demo_page.html`, vanilla JS) and a
JSON endpoint.

    GET  /          the page
    GET  /info      {"num_classes", "grid_size", "step", "defaults": {field: value}, ...}
    POST /generate  {"label", "cfg_scale", "cfg_schedule", "temperature", "num_steps", "seed"}
                    -> 200 {"image": "data:image/png;base64,...", "sampling_seconds", "compiled", ...}
                    -> 400 {"error": message naming the field, "field": name}

Fields left out take the config's `config.sample.*` values; numbers may come as JSON numbers or
as the strings an HTML input holds. Each reply carries its sampling time in the JSON and in a
`Server-Timing: sample;dur=<ms>` header.

Sampling is `generate`'s: the parameters of the workdir's newest checkpoint (EMA ones when
`config.sample.use_ema`), `Experiment.sampler()` and the same call, so image i of a grid with
seed S is image i of `python -m arjax sample` with `--config.sample.seed=S` and that class.
Every request is one batch of `grid_size` images of one class: one compiled program per
(num_steps, guidance on/off), traced once; other scales, temperatures and seeds reuse it (the
reply's `compiled` says whether JAX traced anything for it). Requests are sampled one at a time
(one device set); the server answers other requests, such as the page, meanwhile.
"""
import base64
import collections
import dataclasses
import http.server
import io
import json
import math
import os
import threading
import time

import jax
import numpy as np
from PIL import Image

from arjax.training import checkpoint
from arjax.sampling import base as sampling
from arjax.parallel import sharding
from arjax.data import pipeline
from arjax.util.image_grid import make_grid

GRID_SIZE = 16  # images per request: a 4 x 4 grid, one compiled batch size
MAX_STEPS = 1000  # each new value compiles a sampler; a bound keeps a typo from costing minutes
SAMPLER_CACHE = 8  # samplers (num_steps values) kept compiled at once
MAX_BODY_BYTES = 16384
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_page.html")
# Emitted by JAX each time it traces a function for a (new) jit cache entry.
_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


class RequestError(ValueError):
  """A request the demo cannot honour; `field` names the offending request field."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


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


def _number(body: dict, field: str, default, *, integer: bool):
  """The field's value as an int or float: a JSON number, or a string holding one."""
  value = body.get(field, default)
  if isinstance(value, str):
    text = value.strip()
    try:
      value = int(text)
    except ValueError:
      try:
        value = float(text)
      except ValueError:
        raise RequestError(field, f"{field}={value!r}: expected a number") from None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise RequestError(field, f"{field}={value!r}: expected a number")
  if integer:
    if isinstance(value, float):
      if not value.is_integer():
        raise RequestError(field, f"{field}={value!r}: expected an integer")
      value = int(value)
  return value


class DemoModel:
  """A workdir's parameters and the config's sampler, answering one grid per request."""

  def __init__(self, exp, workdir: str, grid_size: int = GRID_SIZE):
    check_served_workdir(workdir)
    self.exp, self.workdir, self.grid_size = exp, workdir, grid_size
    s = exp.config.sample
    self.params, self.step = checkpoint.restore_params(exp, workdir, s.use_ema)
    self.num_classes = exp.config.data.num_classes
    self.defaults = {"label": 0, "cfg_scale": s.cfg_scale, "cfg_schedule": s.cfg_schedule,
                     "temperature": s.temperature, "num_steps": s.num_steps, "seed": s.seed}
    self._samplers = collections.OrderedDict()  # num_steps -> sampler, least recently used first
    self._lock = threading.Lock()  # one request on the devices at a time
    self._traces = 0
    jax.monitoring.register_event_duration_secs_listener(self._count_traces)

  def _count_traces(self, event, duration, **kwargs):
    del duration, kwargs
    if event == _TRACE_EVENT:
      self._traces += 1

  def info(self) -> dict:
    return {"num_classes": self.num_classes, "grid_size": self.grid_size, "step": self.step,
            "workdir": os.path.abspath(self.workdir), "family": self.exp.config.model.family,
            "image_size": self.exp.config.data.image_size,
            "use_ema": bool(self.exp.config.sample.use_ema), "max_steps": MAX_STEPS,
            "defaults": self.defaults}

  def parse(self, body) -> dict:
    """The request's fields, defaulted and checked; RequestError names the first bad one.

    The sampler's own checks (`sampling.check_request`, `check_num_steps`) run here, before
    the request waits for the devices.
    """
    if not isinstance(body, dict):
      raise RequestError("body", "the request body must be a JSON object")
    unknown = sorted(set(body) - set(self.defaults))
    if unknown:
      raise RequestError(unknown[0], f"{unknown[0]}: unknown field; known: "
                         + ", ".join(self.defaults))
    d = self.defaults
    request = {
        "label": _number(body, "label", d["label"], integer=True),
        "cfg_scale": float(_number(body, "cfg_scale", d["cfg_scale"], integer=False)),
        "cfg_schedule": body.get("cfg_schedule", d["cfg_schedule"]),
        "temperature": float(_number(body, "temperature", d["temperature"], integer=False)),
        "num_steps": _number(body, "num_steps", d["num_steps"], integer=True),
        "seed": _number(body, "seed", d["seed"], integer=True),
    }
    if not 0 <= request["label"] < self.num_classes:
      raise RequestError("label", f"label={request['label']}: a class id in "
                         f"[0, {self.num_classes}) (config.data.num_classes)")
    if request["cfg_schedule"] not in ("constant", "linear"):
      raise RequestError("cfg_schedule", f"cfg_schedule={request['cfg_schedule']!r}: "
                         "known: 'constant', 'linear'")
    if not 0 <= request["seed"] < 2**31:
      raise RequestError("seed", f"seed={request['seed']}: must lie in [0, 2**31)")
    if request["num_steps"] > MAX_STEPS:
      raise RequestError("num_steps", f"num_steps={request['num_steps']}: at most {MAX_STEPS} "
                         "here (each value compiles a sampler of its own)")
    try:
      sampling.check_num_steps(request["num_steps"], self.exp.head)
      sampling.check_request(self._labels(request), num_classes=self.num_classes,
                             cfg_scale=request["cfg_scale"], temperature=request["temperature"],
                             first_index=0)
    except ValueError as e:  # messages start with the argument's name, which is the field's
      field = next((f for f in request if str(e).startswith(f)), "label")
      raise RequestError(field, str(e)) from None
    return request

  def _labels(self, request) -> np.ndarray:
    return np.full((self.grid_size,), request["label"], np.int64)

  def _sampler(self, num_steps: int):
    """`Experiment.sampler()` with the request's steps; each keeps its jitted programs."""
    if num_steps not in self._samplers:
      sampler = self.exp.sampler()
      if sampler.num_steps != num_steps:
        sampler = dataclasses.replace(sampler, num_steps=num_steps)
      self._samplers[num_steps] = sampler
      while len(self._samplers) > SAMPLER_CACHE:
        self._samplers.popitem(last=False)
    self._samplers.move_to_end(num_steps)
    return self._samplers[num_steps]

  def generate(self, request: dict) -> dict:
    """A parsed request -> uint8 images [grid_size, H, W, C], seconds, whether JAX traced."""
    with self._lock:
      traces = self._traces
      start = time.perf_counter()
      sampler = self._sampler(request["num_steps"])
      images = sampler(self.params, self._labels(request), jax.random.PRNGKey(request["seed"]),
                       first_index=0, cfg_scale=request["cfg_scale"],
                       cfg_schedule_name=request["cfg_schedule"],
                       temperature=request["temperature"])
      images = pipeline.denormalize(sharding.to_host(images))  # waits for the device
      seconds = time.perf_counter() - start
      compiled = self._traces != traces
    return {"images": images, "sampling_seconds": seconds, "compiled": compiled}


def grid_png(images: np.ndarray) -> bytes:
  """uint8 [N, H, W, C] -> a square-ish PNG grid, small images upscaled to ~64 px cells."""
  n, h = images.shape[:2]
  rows = max(1, int(math.sqrt(n)))
  grid = make_grid(images, num_rows=rows, upscale=max(1, 64 // h))
  buffer = io.BytesIO()
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG")
  return buffer.getvalue()


def make_handler(model: DemoModel):
  """The request handler class of a server answering for `model`."""
  with open(PAGE, "rb") as f:
    page = f.read()

  class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "arjax-demo"

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
        self._json(200, model.info())
      else:
        self._json(404, {"error": f"{self.path}: not found; the page is /"})

    def do_POST(self):  # noqa: N802
      if self.path != "/generate":
        self._json(404, {"error": f"{self.path}: not found; POST /generate"})
        return
      try:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
          raise RequestError("body", f"the request body is {length} bytes; at most "
                             f"{MAX_BODY_BYTES}")
        try:
          body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as e:
          raise RequestError("body", f"the request body is not JSON: {e}") from None
        request = model.parse(body)
      except RequestError as e:
        self._json(400, {"error": str(e), "field": e.field})
        return
      try:
        result = model.generate(request)
      except Exception as e:  # pylint: disable=broad-except  (reported; the server stays up)
        self._json(500, {"error": f"sampling failed: {type(e).__name__}: {e}"})
        raise
      png = grid_png(result["images"])
      seconds = result["sampling_seconds"]
      self._json(200, {
          "image": "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
          "sampling_seconds": seconds, "compiled": result["compiled"],
          "num_images": len(result["images"]), "step": model.step, "request": request,
      }, headers=[("Server-Timing", f"sample;dur={seconds * 1000:.1f}")])

  return Handler


def run(exp, workdir: str, *, host: str = "127.0.0.1", port: int = 8000,
        grid_size: int = GRID_SIZE) -> None:
  """Restores the workdir, compiles the default request, serves until interrupted."""
  model = DemoModel(exp, workdir, grid_size)
  try:
    server = http.server.ThreadingHTTPServer((host, port), make_handler(model))
  except OSError as e:
    raise OSError(f"--host={host} --port={port}: cannot listen there ({e.strerror or e}); "
                  "pick another --port (0 = any free one)") from None
  server.daemon_threads = True
  try:
    # The default request compiles here, so that the page's first click is fast.
    print(f"step {model.step} of {os.path.abspath(workdir)} restored; compiling the sampler "
          "for the config's default request...", flush=True)
    warm = model.generate(model.parse({}))
    host_name, port_number = server.server_address[:2]
    print(f"sampler compiled in {warm['sampling_seconds']:.1f} s\n"
          f"arjax demo page: http://{host_name}:{port_number}/  (Ctrl-C stops)", flush=True)
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
