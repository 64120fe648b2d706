"""The xAR model (its backbone alone: no per-token head) and Noisy Context Learning.

Training noises *every* entity at its own flow time and regresses every entity's velocity
from the noisy earlier ones (block-causal attention), so the network never sees a clean
context in training while the sampler feeds it its own generated entities; xAR calls this
Noisy Context Learning (teacher forcing without the exposure bias). arjax's one time
convention (`arjax.heads.flow`) is xAR's too:

    x_t = (1 - t) x + t noise,   target v = noise - x,   t = 1 pure noise
    t ~ logit-normal(t_mean, t_std), one per (image, entity)   (xAR: mean 0, std 1)
    loss = mean over every token and channel of (v_pred - v)^2
    labels dropped to the null class with probability label_drop (for CFG)

Tokens arrive from the tokenizer in raster order and are put in the entity layout's sequence
order here (`EntityLayout.seq_to_raster`). Static shapes: every step sees all L tokens.
"""
import jax
import jax.numpy as jnp
import flax.linen as nn

from arjax.families.xar.backbone import XarBackbone, per_token
from arjax.layers.dense import dropout_rngs


class XarModel(nn.Module):
  """Parameters {'backbone'}: the whole network is the flow model (no 'head' subtree)."""
  backbone: XarBackbone

  def __call__(self, tokens, labels):
    """Touches every parameter (used by init): all entities at t = 0, tokens in sequence order."""
    t = jnp.zeros((tokens.shape[0], self.backbone.layout.num_entities))
    return self.backbone(tokens, labels, t)[0]

  def velocity(self, x, labels, t, cache=None, index=None):
    """(v, new cache): see `XarBackbone.__call__`."""
    return self.backbone(x, labels, t, cache=cache, index=index)


def to_sequence(tokens, layout):
  """Raster-order tokens [B, L, D] -> the layout's sequence order."""
  return tokens[:, layout.seq_to_raster()]


def to_raster(tokens, layout):
  """Sequence-order tokens [B, L, D] -> raster order."""
  return tokens[:, layout.raster_to_seq()]


def logit_normal_times(z, mean: float = 0.0, std: float = 1.0):
  """t = sigmoid(mean + std * z) for standard normal draws z (float32)."""
  return jax.nn.sigmoid(mean + std * jnp.asarray(z, jnp.float32))


def drop_labels(labels, u, label_drop: float, null_class: int):
  """Labels with those whose uniform draw u < label_drop replaced by the null class."""
  return jnp.where(u < label_drop, null_class, labels)


def noisy_context_inputs(x, noise, t, entity_size: int):
  """(x_t, velocity target) of tokens x [B, L, D] (sequence order), noise alike, and one time
  per entity t [B, E]."""
  tt = per_token(t[..., None], entity_size)
  return (1.0 - tt) * x + tt * noise, noise - x


def velocity_loss(params, x, labels, t, noise, *, model: XarModel, rngs=None):
  """The Noisy Context Learning loss from its draws: labels as used (after dropout), t [B, E],
  noise [B, L, D]; x in sequence order. -> (loss, (x_t, target, v))."""
  x_t, target = noisy_context_inputs(x, noise, t, model.backbone.layout.size)
  v, _ = model.apply({"params": params}, x_t, labels, t, method=XarModel.velocity, rngs=rngs)
  return jnp.mean(jnp.square(v - target)), (x_t, target, v)


def noisy_context_loss(params, tokens, labels, rng, *, model: XarModel, label_drop: float,
                       t_mean: float, t_std: float):
  """The training loss: tokens [B, L, D] raster order, labels [B] -> scalar (module docstring)."""
  layout = model.backbone.layout
  x = to_sequence(tokens.astype(jnp.float32), layout)
  drop_key, time_key, noise_key = jax.random.split(rng, 3)
  batch = x.shape[0]
  labels = drop_labels(labels, jax.random.uniform(drop_key, (batch,)), label_drop,
                       model.backbone.num_classes)
  t = logit_normal_times(jax.random.normal(time_key, (batch, layout.num_entities)), t_mean, t_std)
  noise = jax.random.normal(noise_key, x.shape, jnp.float32)
  loss, _ = velocity_loss(params, x, labels, t, noise, model=model, rngs=dropout_rngs(rng))
  return loss
