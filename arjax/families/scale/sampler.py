"""Scale-by-scale sampling with the backbone's cache: one jitted program per batch size.

    cache = empty;  x_{-1} = nothing
    for k = 0 .. K-1 (unrolled: every scale has its own static size):
        z_k, cache = backbone(up(x_{k-1}) (the class for k = 0), scale=k, cache)
        x_k = head.sample(z_k)      every token of scale k at once, the ODE inside (a scan)
    tokens = x_{K-1} (the finest scale is the map) -> tokenizer.decode -> images

K network calls of the backbone for the whole image (a causal sampler makes T), each on one
scale's rows against the cache of the coarser ones, which are never recomputed. The loop is a
Python loop of K static-shape steps inside the one jitted function (a scan cannot carry
scales of different sizes; K is small: 5 for FlowAR's 16 x 16).

CFG: the batch is doubled once, rows [B, 2B) carry the null class and are fed the same scales
as their conditional twins; the velocity is guided inside the head with this scale's CFG scale
(`cfg_schedule` over the K scales: constant, or MAR's linear ramp 1 -> cfg_scale, the last scale
guided fully). `temperature` scales every ODE's initial noise.

Seeds: image b's key is `image_keys(rng, image_ids)[b]`; token j of scale k draws its noise
from fold_in(fold_in(that key, k), j), so an image depends on (rng, its index, its label)
alone, never on the batch it was sampled in.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from arjax.families.scale.model import ScaleModel
from arjax.heads import noise as noise_draws
from arjax.sampling.base import ImageSampler, cfg_schedule, image_keys


def sample_scales(params, labels, rng, cfg_scales, temperature, *, model: ScaleModel, head,
                  guided: bool, num_steps: int, cfg_interval=(0.0, 1.0), value_range=None,
                  image_ids=None, cache_dtype=jnp.float32):
  """labels [B] -> every sampled scale, coarse to fine: a list of [B, s_k^2, D] (the last is
  the token map). `cfg_scales` [K] is read only when `guided`."""
  pyramid = model.backbone.pyramid
  apply = functools.partial(model.apply, {"params": params})
  if image_ids is None:
    image_ids = jnp.arange(labels.shape[0])
  row_keys = image_keys(rng, image_ids)
  batch = labels.shape[0]
  fed_labels = (jnp.concatenate([labels, jnp.full_like(labels, model.backbone.num_classes)])
                if guided else labels)
  cache = model.backbone.init_cache(fed_labels.shape[0], cache_dtype)
  scales, previous = [], None
  for k, size in enumerate(pyramid.sizes):
    inputs = None if k == 0 else pyramid.up(previous, k)
    if guided and inputs is not None:
      inputs = jnp.concatenate([inputs, inputs])
    z, cache = apply(inputs, fed_labels, cache, k, method=ScaleModel.decode)  # [B', size, W]
    z = z.reshape(-1, z.shape[-1])  # guided: conditional rows first, as the head expects
    net_fn = lambda x_t, t, zz, n=size: apply(x_t, t, zz, n, method=ScaleModel.head_rows)
    scale_keys = noise_draws.fold_in(row_keys, k)
    keys = jax.vmap(lambda key: noise_draws.fold_in_each(key, jnp.arange(size)))(scale_keys)
    x = head.sample(net_fn, z, keys.reshape((batch * size,) + keys.shape[2:]),
                    cfg_scale=cfg_scales[k] if guided else None, temperature=temperature,
                    steps=num_steps, cfg_interval=cfg_interval)
    x = x.reshape(batch, size, -1)
    if value_range is not None:  # an ODE overshoot would feed the next scale an unseen input
      x = jnp.clip(x, *value_range)
    scales.append(x)
    previous = x
  return scales


@dataclasses.dataclass
class ScaleSampler(ImageSampler):
  """Samples images scale by scale (module docstring)."""

  def guidance_scales(self, cfg_scale, cfg_schedule_name):
    return cfg_schedule(cfg_scale, cfg_schedule_name, self.model.backbone.pyramid.num_scales)

  def sample_images(self, params, labels, rng, scales, temperature, image_ids, *, guided):
    tokens = sample_scales(
        params, labels, rng, scales, temperature, model=self.model, head=self.head_for_sampling,
        guided=guided, num_steps=self.num_steps, cfg_interval=tuple(self.cfg_interval),
        value_range=self.value_range, image_ids=image_ids)[-1]
    return self.tokenizer.decode(tokens)
