"""What every family's sampler shares: request checks, CFG ramps, per-image seeds, solvers.

A sampler is called with concrete labels and numbers; `check_request` judges them on the
host before anything is traced, so a bad request costs no compilation and names its
argument. Every image's randomness comes from `image_keys` (fold_in of the request's key and
the image's index), so an image does not depend on how a request is split into batches.
"""
import dataclasses
import math

import jax
import numpy as np

from arjax.heads import noise as noise_draws


def cfg_schedule(scale: float, schedule: str, num_tokens: int) -> np.ndarray:
  """CFG scale per token position: constant, or a linear ramp 1 -> scale (MAR's 'linear')."""
  if schedule == "constant":
    return np.full((num_tokens,), scale, np.float32)
  if schedule == "linear":
    return (1.0 + (scale - 1.0) * (np.arange(num_tokens) + 1) / num_tokens).astype(np.float32)
  raise ValueError(f"cfg_schedule={schedule!r}; known: 'constant', 'linear'")

def check_request(labels, *, num_classes: int, cfg_scale, temperature, first_index) -> None:
  """Raises ValueError naming the argument of a sampling request that cannot be honoured.

  Called by both samplers on the host, before tracing: a bad request costs no compilation.
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

def head_with_solver(head, solver: str):
  """The head with `sample.solver` applied where it has one (the flow head's ODE solver;
  the DDPM head's steps are fixed by its schedule)."""
  if any(f.name == "solver" for f in dataclasses.fields(head)):
    return dataclasses.replace(head, solver=solver)
  return head
