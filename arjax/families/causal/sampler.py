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

Seeds. Image b of a call is image `first_index + b` of the whole request, and all of its
randomness comes from `image_keys`: fold_in(rng, that index), then fold_in(., position).
An image therefore depends on (rng, its index) and its label alone, not on how a request is
split into batches nor on the other rows of its batch (up to float reduction order: XLA may
sum a matmul differently for another batch size; tests/test_determinism.py bounds it).

Head-step annealing (DiSA). `head_steps` gives each position its own head step count; the
scan over positions is cut into runs of equal count (`step_schedule.runs`), one scan each,
the carry (z, cache) handed from run to run, so every count stays static. One run (the
constant schedule) is the plain sampler.

Requests are checked before anything is traced or compiled (`check_request`): labels
outside [0, num_classes), an empty request, cfg_scale < 0, temperature <= 0 and
num_steps <= 0 fail with a ValueError naming the argument.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from arjax.families.causal.model import ARModel
from arjax.heads import noise as noise_draws
from arjax.sampling import step_schedule
from arjax.sampling.base import ImageSampler, cfg_schedule, image_keys


def sample_tokens(params, labels, rng, cfg_scales, temperature, *, model, head, guided: bool,
                  num_steps: int, num_tokens: int, cfg_interval=(0.0, 1.0), value_range=None,
                  cache_dtype=jnp.float32, image_ids=None, head_steps=None):
  """labels [B] -> (tokens [B, T, D], z [B', T, W]); B' = 2B with guidance.

  head_steps: the head's steps at each position (static, T entries; default `num_steps`
  everywhere); positions with equal counts in a row share one scan.

  image_ids: int [B], each row's index in the whole request (default 0 .. B-1). Row b's
  draws at position i come from fold_in(image_keys(rng, image_ids)[b], i) alone.

  The z's the decoder conditioned each token on are returned so that tests can
  hold them against a teacher-forced forward pass; callers that drop them pay
  nothing (XLA removes unused outputs). `cfg_scales` [T] is ignored unless `guided`.
  With `value_range`, each sampled token is clipped into it before it is kept
  and fed back: an ODE overshoot past the data's range would otherwise put the
  backbone's next steps on prefixes it never saw in training.
  """
  apply = functools.partial(model.apply, {"params": params})
  if image_ids is None:
    image_ids = jnp.arange(labels.shape[0])
  row_keys = image_keys(rng, image_ids)
  if guided:
    labels = jnp.concatenate([labels, jnp.full_like(labels, model.backbone.num_classes)])
  cache = model.backbone.init_cache(labels.shape[0], cache_dtype)
  z, cache = apply(labels, cache, method=ARModel.prefill)

  def step(carry, inputs, steps):
    z, cache = carry
    position, scale = inputs
    keys = noise_draws.fold_in(row_keys, position)  # [B]: one key per image
    token, z_next, cache = token_step(
        params, z, cache, position, keys, scale, temperature, model=model, head=head,
        guided=guided, num_steps=steps, cfg_interval=cfg_interval, value_range=value_range)
    return (z_next, cache), (token, z)

  if head_steps is None:
    head_steps = (num_steps,) * num_tokens
  if len(head_steps) != num_tokens:
    raise ValueError(f"head_steps has {len(head_steps)} entries for {num_tokens} positions")
  carry, outputs = (z, cache), []
  for first, end, steps in step_schedule.runs(head_steps):
    carry, out = jax.lax.scan(functools.partial(step, steps=steps), carry,
                              (jnp.arange(first, end), cfg_scales[first:end]))
    outputs.append(out)
  tokens, zs = (jnp.concatenate(parts) if len(parts) > 1 else parts[0]
                for parts in zip(*outputs))
  return tokens.transpose(1, 0, 2), zs.transpose(1, 0, 2)


def token_step(params, z, cache, position, keys, cfg_scale, temperature, *, model, head,
               guided: bool, num_steps: int, cfg_interval=(0.0, 1.0), value_range=None):
  """One position of the causal sampler: the head samples token `position` from z [B', W]
  with `keys` [B], and the backbone feeds it at `position` against the KV cache.

  Returns (token [B, D], z for the next position [B', W], cache). The body of
  `sample_tokens`'s scan, also what `bench --mode=decode` times alone.
  """
  apply = functools.partial(model.apply, {"params": params})
  net_fn = lambda x_t, t, zz: apply(x_t, t, zz, method=ARModel.head_net)
  token = head.sample(net_fn, z, keys, cfg_scale=cfg_scale if guided else None,
                      temperature=temperature, steps=num_steps, cfg_interval=cfg_interval)
  if value_range is not None:
    token = jnp.clip(token, *value_range)
  fed = jnp.concatenate([token, token]) if guided else token
  z_next, cache = apply(fed, position, cache, method=ARModel.decode_step)
  return token, z_next, cache


@dataclasses.dataclass
class Sampler(ImageSampler):
  """Samples images from class labels; compiles once per batch size and guidance on/off."""

  def guidance_scales(self, cfg_scale, cfg_schedule_name):
    return cfg_schedule(cfg_scale, cfg_schedule_name, self.tokenizer.num_tokens)

  def sample_images(self, params, labels, rng, scales, temperature, image_ids, *, guided):
    tokens, _ = sample_tokens(
        params, labels, rng, scales, temperature, model=self.model, head=self.head_for_sampling,
        guided=guided, num_steps=self.num_steps, num_tokens=self.tokenizer.num_tokens,
        cfg_interval=tuple(self.cfg_interval), value_range=self.value_range,
        image_ids=image_ids, head_steps=self.head_steps(self.tokenizer.num_tokens))
    return self.tokenizer.decode(tokens)
