"""Scan-based, KV-cached decoding: one jitted function per (config, batch size).

    prefill(class prefix)  ->  z_0, cache
    lax.scan over positions i = 0 .. T-1:
        x_i  = head.sample(z_i)          (the ODE runs inside, also a scan)
        z_{i+1}, cache = decode_step(x_i, i, cache)
    tokens [B, T, D] -> tokenizer.decode -> images

With CFG the batch is doubled once, at the start: rows [0, B) carry the class,
rows [B, 2B) the null class, and both halves are fed the same sampled token, so
the guided velocity is formed inside the head from one network call. The CFG
scale per position is an array computed on the host (`cfg_schedule`), passed as
an argument: changing the scale or the ramp does not recompile.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from arjax.models.ar_model import ARModel


def cfg_schedule(scale: float, schedule: str, num_tokens: int) -> np.ndarray:
  """CFG scale per token position: constant, or a linear ramp 1 -> scale (MAR's 'linear')."""
  if schedule == "constant":
    return np.full((num_tokens,), scale, np.float32)
  if schedule == "linear":
    return (1.0 + (scale - 1.0) * (np.arange(num_tokens) + 1) / num_tokens).astype(np.float32)
  raise ValueError(f"cfg_schedule={schedule!r}; known: 'constant', 'linear'")


def sample_tokens(params, labels, rng, cfg_scales, temperature, *, model, head, guided: bool,
                  num_steps: int, num_tokens: int, cfg_interval=(0.0, 1.0), value_range=None,
                  cache_dtype=jnp.float32):
  """labels [B] -> (tokens [B, T, D], z [B', T, W]); B' = 2B with guidance.

  The z's the decoder conditioned each token on are returned so that tests can
  hold them against a teacher-forced forward pass; callers that drop them pay
  nothing (XLA removes unused outputs). `cfg_scales` [T] is ignored unless `guided`.
  With `value_range`, each sampled token is clipped into it before it is kept
  and fed back: an ODE overshoot past the data's range would otherwise put the
  backbone's next steps on prefixes it never saw in training.
  """
  apply = functools.partial(model.apply, {"params": params})
  if guided:
    labels = jnp.concatenate([labels, jnp.full_like(labels, model.backbone.num_classes)])
  cache = model.backbone.init_cache(labels.shape[0], cache_dtype)
  z, cache = apply(labels, cache, method=ARModel.prefill)
  net_fn = lambda x_t, t, zz: apply(x_t, t, zz, method=ARModel.head_net)

  def step(carry, inputs):
    z, cache = carry
    position, scale, step_rng = inputs
    token = head.sample(net_fn, z, step_rng, cfg_scale=scale if guided else None,
                        temperature=temperature, steps=num_steps, cfg_interval=cfg_interval)
    if value_range is not None:
      token = jnp.clip(token, *value_range)
    fed = jnp.concatenate([token, token]) if guided else token
    z_next, cache = apply(fed, position, cache, method=ARModel.decode_step)
    return (z_next, cache), (token, z)

  rngs = jax.random.split(rng, num_tokens)
  _, (tokens, zs) = jax.lax.scan(step, (z, cache), (jnp.arange(num_tokens), cfg_scales, rngs))
  return tokens.transpose(1, 0, 2), zs.transpose(1, 0, 2)


def head_with_solver(head, solver: str):
  """The head with `sample.solver` applied where it has one (the flow head's ODE solver;
  the DDPM head's steps are fixed by its schedule)."""
  if any(f.name == "solver" for f in dataclasses.fields(head)):
    return dataclasses.replace(head, solver=solver)
  return head


@dataclasses.dataclass
class Sampler:
  """Samples images from class labels; compiles once per batch size and guidance on/off."""
  model: ARModel
  head: object
  tokenizer: object
  num_steps: int
  solver: str = "heun"
  cfg_interval: tuple = (0.0, 1.0)
  clip_tokens: bool = True

  def __post_init__(self):
    head = head_with_solver(self.head, self.solver)
    self._jitted = {}
    self._sample_images = lambda params, labels, rng, cfg_scales, temperature, guided: (
        self.tokenizer.decode(sample_tokens(
            params, labels, rng, cfg_scales, temperature, model=self.model, head=head,
            guided=guided, num_steps=self.num_steps, num_tokens=self.tokenizer.num_tokens,
            cfg_interval=tuple(self.cfg_interval),
            value_range=self.tokenizer.value_range if self.clip_tokens else None)[0]))

  def __call__(self, params, labels, rng, *, cfg_scale=1.0, cfg_schedule_name="constant",
               temperature=1.0):
    """labels int [B] -> images float32 [B, H, W, C] in [-1, 1] (unclipped)."""
    guided = cfg_scale != 1.0  # a linear ramp to 1 is the constant 1
    if guided not in self._jitted:
      self._jitted[guided] = jax.jit(functools.partial(self._sample_images, guided=guided))
    scales = cfg_schedule(cfg_scale, cfg_schedule_name, self.tokenizer.num_tokens)
    return self._jitted[guided](params, jnp.asarray(labels, jnp.int32), rng, scales,
                                jnp.float32(temperature))
