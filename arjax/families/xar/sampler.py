"""xAR's sampler: entity by entity, each one integrated from noise by the whole network.

One jitted program: a `lax.scan` over the E entities carries the KV cache of the finished
(clean) entities; inside, a `lax.scan` over the steps of one entity integrates dx/dt = v from
t = 1 to 0 with the network called on that entity alone (its keys/values are written into a
copy of the cache that is dropped, so the cache holds clean entities only). When the entity is
done, its tokens are run once more at t = 0 to commit their keys and values: the numbers of
the official `sample_inference`, whose first call of entity s re-encodes [z_{s-1} clean at
t = 0 | x_s] (block-causal, z_{s-1}'s rows never see x_s, so the two are the same sums).

Solvers (`sample.solver`):
  'euler', 'heun'    the ODE on t = linspace(1, 0, num_steps + 1) (Heun: 2 calls per step)
  'euler_maruyama'   the official SDE sampler (models/sampler.py): t = linspace(1, 0.04,
                     num_steps) then 0; with diffusion w = 2t the drift of the linear path is
                     d = (2 - t) v + x, and x <- x + d dt + sqrt(2t) eps sqrt(|dt|), the last
                     step (to t = 0) the mean alone: num_steps calls, num_steps - 1 draws.

CFG acts on the velocity, v_u + w (v_c - v_u), the batch doubled with the null class (on the
SDE's drift that is the official `d_u + w (d_c - d_u)`, since d is affine in v with the same
x). Its scale per entity (`entity_scales`): 'linear' is the official ramp
w_s = 1 + (cfg - 1) s / (E - 1), so entity 0 is never guided and the last gets cfg;
'constant' is cfg for all. Guidance applies while t lies in `cfg_interval`. Temperature scales
the initial noise and the SDE's noise.

Per-image seeds: image b's draws come from `image_keys(rng, image_ids)[b]`, entity s and draw
i from fold_in(fold_in(key, s), i) (i = 0 the initial noise, i >= 1 step i - 1's noise), so an
image does not depend on the batch it is drawn in. The integration itself takes its draws from
a function (`draw(s, i)`), so the golden test replays the official draws through the same code.

Network-step annealing (DiSA, per entity): `head_steps` gives each entity its own step count;
the scan over entities is cut into runs of equal count (`step_schedule.runs`), one scan each
with its own static time grid, the cache handed from run to run. The constant schedule is one
run, the plain sampler.

Generalised where the official code is not: any grid, entity layout, step count (>= 1) and
batch size.
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from arjax.families.xar.model import XarModel, to_raster
from arjax.sampling import step_schedule
from arjax.sampling.base import ImageSampler, image_keys

SOLVERS = ("euler", "heun", "euler_maruyama")
# The official SDE grid stops its noisy steps at t = 0.04, then takes one mean step to 0.
EM_LAST_T = 0.04


def time_grid(solver: str, num_steps: int) -> np.ndarray:
  """The float64 times t_0 = 1 > ... > t_K = 0 of one entity's integration.

  Any num_steps >= 1 runs, but the SDE's steps are coarse: with one, its mean step from t = 1
  lands on -v, not on the data (the official sampler asks for >= 3); the ODE solvers degrade
  gracefully."""
  if solver not in SOLVERS:
    raise ValueError(f"solver={solver!r}; known: {SOLVERS}")
  if solver == "euler_maruyama":
    return np.concatenate([np.linspace(1.0, EM_LAST_T, num_steps), [0.0]])
  return np.linspace(1.0, 0.0, num_steps + 1)


def step_schedule_arrays(solver: str, num_steps: int):
  """(t_cur, t_next, dt, noise_scale), float32 [K] each, of `time_grid`: the SDE's noise scale
  sqrt(2t) sqrt(|dt|) computed in float64 on the host, 0 at the last (mean) step."""
  grid = time_grid(solver, num_steps)
  noise_scale = np.sqrt(2.0 * grid[:-1]) * np.sqrt(np.abs(np.diff(grid)))
  noise_scale[-1] = 0.0
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return f32(grid[:-1]), f32(grid[1:]), f32(np.diff(grid)), f32(noise_scale)


def entity_scales(cfg_scale: float, schedule: str, num_entities: int) -> np.ndarray:
  """CFG scale per entity [E] (see the module docstring)."""
  if schedule == "constant" or num_entities == 1:
    return np.full((num_entities,), cfg_scale, np.float32)
  if schedule == "linear":
    return (1.0 + (cfg_scale - 1.0) * np.arange(num_entities) / (num_entities - 1)).astype(
        np.float32)
  raise ValueError(f"cfg_schedule={schedule!r}; known: 'constant', 'linear'")


def entity_draws(keys, entity_size: int, token_dim: int) -> Callable:
  """draw(s, i) -> [B, size, D] standard normals from per-image keys [B] (module docstring)."""
  def draw(s, i):
    one = lambda key: jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(key, s), i), (entity_size, token_dim))
    return jax.vmap(one)(keys)
  return draw


def entity_step(params, labels, draw, scales, temperature, *, model: XarModel, solver: str,
                num_steps: int, guided: bool, cfg_interval=(0.0, 1.0), value_range=None,
                trace: bool = False):
  """(rows, step): `step(cache, s) -> (cache, (z_s [B, size, D], record))` samples entity s
  against the cache of the entities before it and commits it (the body of the sampler's scan,
  and what `bench --mode=decode` times alone); `rows` is the cache's batch (2B when guided).
  Arguments as `sample_tokens`'s."""
  backbone = model.backbone
  size, num_entities = backbone.layout.size, backbone.layout.num_entities
  batch = labels.shape[0]
  null = jnp.full_like(labels, backbone.num_classes)
  row_labels = jnp.concatenate([labels, null]) if guided else labels
  rows = row_labels.shape[0]
  t_cur, t_next, dt, noise_scale = step_schedule_arrays(solver, num_steps)
  lo, hi = cfg_interval

  def network(x, t, cache, index):
    inp = jnp.concatenate([x, x]) if guided else x
    times = jnp.full((rows, 1), t, jnp.float32)
    v, _ = model.apply({"params": params}, inp, row_labels, times, cache, index,
                       method=XarModel.velocity)
    return v

  def guide(v, t, scale):
    if not guided:
      return v
    cond, uncond = v[:batch], v[batch:]
    scale = jnp.where((t >= lo) & (t <= hi), scale, 1.0)
    return uncond + scale * (cond - uncond)

  def entity(cache, s):
    index = s * size
    scale = scales[s]
    x0 = temperature * draw(s, 0)

    def step(x, i):
      t = t_cur[i]
      v_raw = network(x, t, cache, index)
      v = guide(v_raw, t, scale)
      if solver == "euler_maruyama":
        drift = (2.0 - t) * v + x
        eps = draw(s, i + 1)
        x_new = x + drift * dt[i] + noise_scale[i] * temperature * eps
      elif solver == "euler":
        x_new = x + dt[i] * v
      else:  # heun
        x_euler = x + dt[i] * v
        v2 = guide(network(x_euler, t_next[i], cache, index), t_next[i], scale)
        x_new = x + 0.5 * dt[i] * (v + v2)
      return x_new, ((v_raw, x_new) if trace else None)

    z, record = jax.lax.scan(step, x0, jnp.arange(num_steps))
    if value_range is not None:
      z = jnp.clip(z, *value_range)

    def commit(cache):  # the finished entity, clean at t = 0, into the cache
      inp = jnp.concatenate([z, z]) if guided else z
      _, cache = model.apply({"params": params}, inp, row_labels, jnp.zeros((rows, 1)), cache,
                             index, method=XarModel.velocity)
      return cache
    cache = jax.lax.cond(s < num_entities - 1, commit, lambda c: c, cache)
    return cache, (z, record)

  return rows, entity


def sample_tokens(params, labels, draw, scales, temperature, *, model: XarModel, solver: str,
                  num_steps: int, guided: bool, cfg_interval=(0.0, 1.0),
                  value_range=None, trace: bool = False, head_steps=None):
  """labels [B] -> tokens [B, L, D] in raster order (and, with `trace`, the per-entity record
  {'v': [E, calls, rows, size, D] raw velocities (rows: [labels; null] when guided),
  'x': [E, steps, B, size, D] the state after each step}).

  `scales` [E]: CFG per entity; `draw(s, i)` the noise (see the module docstring).
  `head_steps`: the steps of each entity (static, E entries; default `num_steps` for all).
  """
  backbone = model.backbone
  layout = backbone.layout
  if head_steps is None:
    head_steps = (num_steps,) * layout.num_entities
  if len(head_steps) != layout.num_entities:
    raise ValueError(f"head_steps has {len(head_steps)} entries for {layout.num_entities} "
                     "entities")
  runs = step_schedule.runs(head_steps)
  if trace and len(runs) > 1:
    raise ValueError("trace: the record's shape needs one step count for every entity")
  cache, parts = None, []
  for first, end, steps in runs:
    rows, entity = entity_step(
        params, labels, draw, scales, temperature, model=model, solver=solver,
        num_steps=steps, guided=guided, cfg_interval=cfg_interval, value_range=value_range,
        trace=trace)
    if cache is None:
      cache = backbone.init_cache(rows)
    cache, part = jax.lax.scan(entity, cache, jnp.arange(first, end))
    parts.append(part)
  entities = parts[0][0] if len(parts) == 1 else jnp.concatenate([p[0] for p in parts])
  record = parts[0][1]
  batch = labels.shape[0]
  tokens = to_raster(jnp.moveaxis(entities, 0, 1).reshape(batch, layout.num_tokens, -1), layout)
  if trace:
    return tokens, {"v": record[0], "x": record[1]}
  return tokens


@dataclasses.dataclass
class XarSampler(ImageSampler):
  """The family's `ImageSampler` (see the module docstring); `head` is None (no head)."""

  def __post_init__(self):
    if self.solver not in SOLVERS:
      raise ValueError(f"solver={self.solver!r}; known: {SOLVERS}")
    super().__post_init__()

  def guidance_scales(self, cfg_scale, cfg_schedule_name):
    return entity_scales(cfg_scale, cfg_schedule_name, self.model.backbone.layout.num_entities)

  def sample_images(self, params, labels, rng, scales, temperature, image_ids, *, guided):
    backbone = self.model.backbone
    draw = entity_draws(image_keys(rng, image_ids), backbone.layout.size, backbone.token_dim)
    tokens = sample_tokens(params, labels, draw, scales, temperature, model=self.model,
                           solver=self.solver, num_steps=self.num_steps, guided=guided,
                           cfg_interval=tuple(self.cfg_interval), value_range=self.value_range,
                           head_steps=self.head_steps(backbone.layout.num_entities))
    return self.tokenizer.decode(tokens)

