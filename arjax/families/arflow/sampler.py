"""ARFlow's sampler: every integration step is one autoregressive step of the sequence.

One jitted program: a `lax.scan` over the K steps of the solver whose carry is (x, every
layer's retention state). Step k feeds the current image x at time t_k as the next image of the
sequence: the network sees it with full attention inside the image and the earlier, noisier
images x_0 .. x_{k-1} of the same trajectory through the state, returns its velocity, and
leaves the state with x_k's keys and values written in. So a K-step trajectory is a sequence of
K images (training sees N of them), and the whole memory between steps is the [H, Dh, Dh]
state per layer (`ArflowBackbone`). ARFlow's sample.py does the same with SiT's SDE sampler,
the model's `incremental_state` carried across the steps.

Solvers (`sample.solver`), on arjax's times (t = 1 noise):
  'euler'            the ODE dx/dt = v on t = linspace(1, 0, K + 1)
  'euler_maruyama'   the published sampler (SiT's SDE, ARFlow's default, 250 steps in the
                     paper): t = linspace(1, 0.04, K) then 0, drift (2 - t) v + x, noise
                     sqrt(2t) sqrt(|dt|) eps, the last step the mean alone (xAR's
                     `time_grid`, arjax/families/xar/sampler.py: the same SiT sampler).

CFG as published (ARFlow's `forward_with_cfg`): the rows doubled with the null class, the
unconditional rows fed the same x as the conditional ones (so each half keeps its own state),
v = v_u + w (v_c - v_u) at every step; w per step from `sample.cfg_schedule` (constant, as
published, or a linear ramp over the steps) where t lies in `sample.cfg_interval`. ARFlow's code
(after DiT) guides only the first 3 of the SD-VAE latent's 4 channels; here the whole velocity is
guided (a token's channels are patches of every latent channel). Temperature scales the initial
noise and the SDE's noise.

Per-image seeds: image b's draws come from `image_keys(rng, image_ids)[b]`, draw i from
fold_in(key, i) (i = 0 the initial noise, i >= 1 step i - 1's noise).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from arjax.families.arflow.model import ArflowModel
from arjax.families.xar.sampler import entity_scales, step_schedule_arrays
from arjax.sampling.base import ImageSampler, image_keys

SOLVERS = ("euler", "euler_maruyama")


def step_scales(cfg_scale: float, schedule: str, num_steps: int) -> np.ndarray:
  """CFG scale per step [K]: constant, or 'linear' from 1 at the first step to cfg at the last."""
  return entity_scales(cfg_scale, schedule, num_steps)


def image_draws(keys, num_tokens: int, token_dim: int):
  """draw(i) -> [B, T, D] standard normals, fold_in(key_b, i) for each image b."""
  def draw(i):
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, i),
                                                  (num_tokens, token_dim)))(keys)
  return draw


def sample_tokens(params, labels, draw, scales, temperature, *, model: ArflowModel, solver: str,
                  num_steps: int, guided: bool, cfg_interval=(0.0, 1.0), value_range=None,
                  trace: bool = False):
  """labels [B] -> tokens [B, T, D] (and, with `trace`, {'x': [K, B, T, D] the image fed at each
  step, 't': [K] its time, 'v': [K, rows, T, D] the raw velocities, rows [labels; null] when
  guided}). `scales` [K]: CFG per step; `draw(i)` the noise (module docstring)."""
  if solver not in SOLVERS:
    raise ValueError(f"solver={solver!r}; known: {SOLVERS}")
  backbone = model.backbone
  batch = labels.shape[0]
  null = jnp.full_like(labels, backbone.num_classes)
  row_labels = jnp.concatenate([labels, null]) if guided else labels
  rows = row_labels.shape[0]
  t_cur, _, dt, noise_scale = step_schedule_arrays(solver, num_steps)  # last step: the mean
  lo, hi = cfg_interval

  def step(carry, i):
    x, state = carry
    t = t_cur[i]
    inp = jnp.concatenate([x, x]) if guided else x
    v_raw, state = model.apply({"params": params}, inp[:, None], row_labels,
                               jnp.full((rows, 1), t, jnp.float32), state,
                               method=ArflowModel.velocity)
    v_raw = v_raw[:, 0]
    v = v_raw
    if guided:
      scale = jnp.where((t >= lo) & (t <= hi), scales[i], 1.0)
      v = v_raw[batch:] + scale * (v_raw[:batch] - v_raw[batch:])
    if solver == "euler_maruyama":
      x_new = x + ((2.0 - t) * v + x) * dt[i] + noise_scale[i] * temperature * draw(i + 1)
    else:
      x_new = x + dt[i] * v
    return (x_new, state), ((x, v_raw) if trace else None)

  x0 = temperature * draw(0)
  (z, _), record = jax.lax.scan(step, (x0, backbone.init_state(rows)), jnp.arange(num_steps))
  if value_range is not None:
    z = jnp.clip(z, *value_range)
  if trace:
    return z, {"x": record[0], "t": t_cur, "v": record[1]}
  return z


@dataclasses.dataclass
class ArflowSampler(ImageSampler):
  """The family's `ImageSampler` (module docstring); `head` is None (no head). An unknown
  solver is refused by the schema (`sample.solver`) and by `sample_tokens`."""

  def guidance_scales(self, cfg_scale, cfg_schedule_name):
    return step_scales(cfg_scale, cfg_schedule_name, self.num_steps)

  def sample_images(self, params, labels, rng, scales, temperature, image_ids, *, guided):
    backbone = self.model.backbone
    draw = image_draws(image_keys(rng, image_ids), backbone.num_tokens, backbone.token_dim)
    tokens = sample_tokens(params, labels, draw, scales, temperature, model=self.model,
                           solver=self.solver, num_steps=self.num_steps, guided=guided,
                           cfg_interval=tuple(self.cfg_interval), value_range=self.value_range)
    return self.tokenizer.decode(tokens)
