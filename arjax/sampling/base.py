"""What every family's sampler shares: the call, request checks, CFG ramps, per-image seeds.

`ImageSampler` is the base class of every family's sampler. Its `__call__` is the one sampling
call of arjax (`images = sampler(params, labels, rng, cfg_scale=, cfg_schedule_name=,
temperature=, first_index=)`): it checks the request on the host before anything is traced
(`check_request`: a bad request costs no compilation and names its argument), keeps one
compiled program per guidance setting (and, inside jit's own cache, per batch size), and gives
every image its index in the request, from which all of its randomness comes (`image_keys`:
fold_in of the request's key and that index), so an image does not depend on how a request is
split into batches. A family writes only what differs: its CFG scale per step and the jitted
body that turns labels into images.
"""
import abc
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from arjax.heads import noise as noise_draws
from arjax.parallel import sharding
from arjax.sampling import step_schedule


def cfg_schedule(scale: float, schedule: str, num_tokens: int) -> np.ndarray:
  """CFG scale per token position: constant, or a linear ramp 1 -> scale (MAR's 'linear')."""
  if schedule == "constant":
    return np.full((num_tokens,), scale, np.float32)
  if schedule == "linear":
    return (1.0 + (scale - 1.0) * (np.arange(num_tokens) + 1) / num_tokens).astype(np.float32)
  raise ValueError(f"cfg_schedule={schedule!r}; known: 'constant', 'linear'")

def check_request(labels, *, num_classes: int, cfg_scale, temperature, first_index) -> None:
  """Raises ValueError naming the argument of a sampling request that cannot be honoured.

  Called by `ImageSampler.__call__` (and the demo server) on the host, before tracing: a bad request costs no compilation.
  The null class (`num_classes` in the causal model's class table; MAR's `fake_latent`) is
  not a valid request: it is what the samplers put in the unconditional half of a CFG batch.
  """
  if isinstance(labels, jax.core.Tracer):
    raise ValueError("labels: must be a concrete array of class ids (the sampler jits itself; "
                     "call it outside jax.jit)")
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels: expected a 1-D array of class ids, got shape {labels.shape}")
  if labels.size == 0:
    raise ValueError("labels: empty request (0 images); pass at least one class id")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels: expected integer class ids, got dtype {labels.dtype}")
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    raise ValueError(f"labels: class ids must lie in [0, {num_classes}); got {labels[bad[0]]} at "
                     f"index {bad[0]} ({bad.size} out of range)")
  for name, value, ok, demand in (
      ("cfg_scale", cfg_scale, lambda v: v >= 0.0, ">= 0 (1 = no guidance)"),
      ("temperature", temperature, lambda v: v > 0.0, "> 0")):
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == ():
      value = value.item()  # a 0-d array is a number; a traced one fails here, on the host
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
      raise ValueError(f"{name}={value!r}: expected a number")
    if not (math.isfinite(value) and ok(value)):
      raise ValueError(f"{name}={value!r}: must be finite and {demand}")
  if (isinstance(first_index, bool) or not isinstance(first_index, (int, np.integer))
      or first_index < 0):
    raise ValueError(f"first_index={first_index!r}: must be an integer >= 0")

def check_num_steps(num_steps, head, name: str = "num_steps") -> None:
  """The head's sampling steps: an integer > 0, or for the DDPM head also None (its default
  respacing) or a respacing string such as '100' or 'ddim50'."""
  respaced = hasattr(head, "gen_diffusion")
  if isinstance(num_steps, (int, np.integer)) and not isinstance(num_steps, bool):
    if num_steps <= 0:
      raise ValueError(f"{name}={num_steps}: must be > 0")
    return
  if respaced and (num_steps is None or isinstance(num_steps, str)):
    return
  raise ValueError(f"{name}={num_steps!r}: expected an integer > 0"
                   + (" (or a respacing string, or None)" if respaced else ""))

def image_keys(rng, image_ids):
  """One key per image, fold_in(rng, image index): all that is random about an image."""
  return noise_draws.fold_in_each(rng, image_ids)

def head_with_solver(head, solver: str, diffusion_scale=None):
  """The head with `sample.solver` (and the SDE's `sample.diffusion_scale`) applied where it
  has them (the flow head's ODE / SDE solver; the DDPM head's steps are fixed by its schedule;
  a family without a head passes None)."""
  if not dataclasses.is_dataclass(head):
    return head
  fields = {f.name for f in dataclasses.fields(head)}
  settings = {"solver": solver, "diffusion_scale": diffusion_scale}
  settings = {k: v for k, v in settings.items() if k in fields and v is not None}
  return dataclasses.replace(head, **settings) if settings else head


def sampler_settings(sample_cfg) -> dict:
  """The `ImageSampler` fields that `config.sample` sets for every family (keyword arguments:
  num_steps, solver, cfg_interval, the DiSA schedule and the SDE's diffusion scale)."""
  return dict(num_steps=sample_cfg.num_steps, solver=sample_cfg.solver,
              cfg_interval=tuple(sample_cfg.cfg_interval),
              head_step_schedule=step_schedule.parse(sample_cfg.head_step_schedule),
              head_steps_end=sample_cfg.head_steps_end,
              diffusion_scale=sample_cfg.diffusion_scale)


@dataclasses.dataclass
class ImageSampler(abc.ABC):
  """labels -> images; a family's sampler subclasses it (see the module docstring).

  The fields every sampler has; a subclass (a dataclass too) adds its own after them, keyword
  arguments like these. `self.head_for_sampling` is `head` with `solver` applied.
  """
  model: Any
  head: Any
  tokenizer: Any
  _: dataclasses.KW_ONLY
  num_steps: Any                     # the head's steps per token (int; DDPM: also a respacing)
  solver: str = "heun"
  cfg_interval: tuple = (0.0, 1.0)
  clip_tokens: bool = True           # sampled tokens clipped into the tokenizer's value range
  # DiSA: the head's steps along the generation order (`arjax.sampling.step_schedule`).
  head_step_schedule: Any = "constant"
  head_steps_end: Any = None
  diffusion_scale: Any = None        # the flow head's SDE coefficient (None: the head's own)

  def __post_init__(self):
    check_num_steps(self.num_steps, self.head)
    step_schedule.check(self.head_step_schedule, self.head_steps_end, self.num_steps)
    self.head_for_sampling = head_with_solver(self.head, self.solver, self.diffusion_scale)
    self._programs = {}       # guided (bool) -> the jitted program
    self._activations = None  # (mesh, rules) once `shard_activations` is called

  @property
  def num_classes(self) -> int:
    """Valid class ids are 0 .. num_classes - 1 (by default the backbone's)."""
    return self.model.backbone.num_classes

  def head_steps(self, num_units: int) -> tuple:
    """The head's step count for each of the `num_units` units of the generation order
    (positions, iterations, entities): `sample.num_steps` everywhere unless a DiSA schedule
    anneals it (`arjax.sampling.step_schedule`)."""
    steps = step_schedule.head_steps(self.head_step_schedule, self.num_steps,
                                     self.head_steps_end, num_units)
    for n in set(steps):
      check_num_steps(n, self.head, "sample.head_step_schedule")
    return steps

  @property
  def value_range(self):
    """Where sampled tokens are clipped (None: nowhere)."""
    return self.tokenizer.value_range if self.clip_tokens else None

  @abc.abstractmethod
  def guidance_scales(self, cfg_scale: float, cfg_schedule_name: str) -> np.ndarray:
    """The CFG scale of every step of one call (host numpy; an argument of the program, so a
    new scale does not recompile)."""

  @abc.abstractmethod
  def sample_images(self, params, labels, rng, scales, temperature, image_ids, *, guided: bool):
    """The jitted body: labels int [B] -> images [B, H, W, C]; row b is image image_ids[b] of
    the request; `guided` (static) doubles the batch with the null class."""

  def shard_activations(self, mesh, rules) -> "ImageSampler":
    """Traces the programs inside `parallel.sharding.activation_rules(mesh, rules)`, so the
    backbone's activations are sharded as the rules say (the batch, with CFG's null rows, split
    over the batch axes where it divides them). `Experiment.sampler()` calls it."""
    self._activations = (mesh, tuple(rules))
    self._programs = {}
    return self

  def __call__(self, params, labels, rng, *, cfg_scale=1.0, cfg_schedule_name="constant",
               temperature=1.0, first_index=0):
    """labels int [B] -> images float32 [B, H, W, C] in [-1, 1] (unclipped).

    Row b is image `first_index + b` of the request: its noise is drawn from that index, so
    sampling a request in batches, each with the `first_index` of its first image, gives
    the images of one big batch.
    """
    check_request(labels, num_classes=self.num_classes, cfg_scale=cfg_scale,
                  temperature=temperature, first_index=first_index)
    guided = cfg_scale != 1.0  # a ramp to 1 is the constant 1; MAR: `if not cfg == 1.0`
    scales = self.guidance_scales(cfg_scale, cfg_schedule_name)
    programs = self._programs
    if guided not in programs:
      body = functools.partial(self.sample_images, guided=guided)
      if self._activations is not None:  # the batch is known at trace time: labels' rows
        rows = lambda params, labels, *_: labels.shape[0] * (2 if guided else 1)
        body = sharding.shard_activations(body, *self._activations, batch_size=rows)
      programs[guided] = jax.jit(body)
    labels = jnp.asarray(labels, jnp.int32)
    image_ids = jnp.int32(first_index) + jnp.arange(labels.shape[0], dtype=jnp.int32)
    return programs[guided](params, labels, rng, scales, jnp.float32(temperature), image_ids)
