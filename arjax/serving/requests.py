"""`POST /generate`'s body: its fields, defaults and checks, before anything waits or traces.

    count        images, 1 .. MAX_COUNT (default 16: the page's 4 x 4 grid)
    label        one class id for every image, or
    labels       a list of class ids, cycled over the images (not both)
    cfg_scale    classifier-free guidance, >= 0 (1 = none)
    cfg_schedule 'constant' or 'linear' (the ramp 1 -> cfg_scale over the generation order)
    temperature  > 0
    num_steps    the head's steps per token, 1 .. MAX_STEPS (each value compiles once)
    seed         in [0, 2**31): image i is image i of `python -m arjax sample` with this seed
    timeout_s    seconds from submission until the request is ended (default and most: the
                 server's --request_timeout)
    stream       true: the reply streams each image as it finishes (NDJSON); false: a job id

Numbers may come as JSON numbers or as the strings an HTML input holds. A bad field is a
`RequestError` naming it (a 400); the checks are the sampler's own (`check_request`,
`check_num_steps`), run on the host.
"""
import math

import numpy as np

from arjax.sampling import base as sampling

MAX_COUNT = 256     # images of one request; more is a batch job for `python -m arjax sample`
MAX_STEPS = 1000    # each new value compiles a program; a bound keeps a typo from costing minutes
DEFAULT_COUNT = 16
FIELDS = ("count", "label", "labels", "cfg_scale", "cfg_schedule", "temperature", "num_steps",
          "seed", "timeout_s", "stream")


class RequestError(ValueError):
  """A request the server cannot honour; `field` names the offending field."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


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
  if isinstance(value, float) and not math.isfinite(value):
    raise RequestError(field, f"{field}={value!r}: expected a finite number")
  if integer and isinstance(value, float):
    if not value.is_integer():
      raise RequestError(field, f"{field}={value!r}: expected an integer")
    value = int(value)
  return value


def _labels(body: dict, count: int, num_classes: int, default: int) -> np.ndarray:
  if "label" in body and "labels" in body:
    raise RequestError("labels", "labels: give either label (one class) or labels (a list), "
                       "not both")
  if "labels" in body:
    listed = body["labels"]
    if not isinstance(listed, list) or not listed:
      raise RequestError("labels", f"labels={listed!r}: expected a non-empty list of class ids")
    if len(listed) > MAX_COUNT:
      raise RequestError("labels", f"labels: {len(listed)} entries; at most {MAX_COUNT}")
    ids = [_number({"labels": v}, "labels", None, integer=True) for v in listed]
  else:
    ids = [_number(body, "label", default, integer=True)]
  field = "labels" if "labels" in body else "label"
  for k in ids:
    if not 0 <= k < num_classes:
      raise RequestError(field, f"{field}={k}: a class id in [0, {num_classes}) "
                         "(config.data.num_classes)")
  return np.resize(np.asarray(ids, np.int64), count)


def parse(body, *, defaults: dict, num_classes: int, head, max_timeout_s: float) -> dict:
  """The request's fields, defaulted and checked; RequestError names the first bad one.

  `defaults` holds the config's `config.sample.*` values under the request's field names.
  Returns {'labels' [count], 'seed', 'cfg_scale', 'cfg_schedule', 'temperature',
  'num_steps', 'timeout_s', 'stream'}.
  """
  if not isinstance(body, dict):
    raise RequestError("body", "the request body must be a JSON object")
  unknown = sorted(set(body) - set(FIELDS))
  if unknown:
    raise RequestError(unknown[0], f"{unknown[0]}: unknown field; known: " + ", ".join(FIELDS))
  d = defaults
  count = _number(body, "count", DEFAULT_COUNT, integer=True)
  if not 1 <= count <= MAX_COUNT:
    raise RequestError("count", f"count={count}: images per request in [1, {MAX_COUNT}]")
  request = {
      "labels": _labels(body, count, num_classes, d["label"]),
      "cfg_scale": float(_number(body, "cfg_scale", d["cfg_scale"], integer=False)),
      "cfg_schedule": body.get("cfg_schedule", d["cfg_schedule"]),
      "temperature": float(_number(body, "temperature", d["temperature"], integer=False)),
      "num_steps": _number(body, "num_steps", d["num_steps"], integer=True),
      "seed": _number(body, "seed", d["seed"], integer=True),
      "timeout_s": float(_number(body, "timeout_s", max_timeout_s, integer=False)),
      "stream": body.get("stream", False),
  }
  if request["cfg_schedule"] not in ("constant", "linear"):
    raise RequestError("cfg_schedule", f"cfg_schedule={request['cfg_schedule']!r}: "
                       "known: 'constant', 'linear'")
  if not 0 <= request["seed"] < 2**31:
    raise RequestError("seed", f"seed={request['seed']}: must lie in [0, 2**31)")
  if request["num_steps"] > MAX_STEPS:
    raise RequestError("num_steps", f"num_steps={request['num_steps']}: at most {MAX_STEPS} "
                       "here (each value compiles a program of its own)")
  if not 0 < request["timeout_s"] <= max_timeout_s:
    raise RequestError("timeout_s", f"timeout_s={request['timeout_s']:g}: seconds in "
                       f"(0, {max_timeout_s:g}] (--request_timeout)")
  if not isinstance(request["stream"], bool):
    raise RequestError("stream", f"stream={request['stream']!r}: expected true or false")
  try:
    sampling.check_num_steps(request["num_steps"], head)
    sampling.check_request(request["labels"], num_classes=num_classes,
                           cfg_scale=request["cfg_scale"], temperature=request["temperature"],
                           first_index=0)
  except ValueError as e:  # messages start with the argument's name, which is the field's
    field = next((f for f in request if str(e).startswith(f)), "labels")
    raise RequestError(field, str(e)) from None
  return request


def describe(request: dict) -> dict:
  """The parsed request as JSON (the reply echoes it)."""
  out = dict(request)
  out["labels"] = [int(k) for k in request["labels"]]
  return out
