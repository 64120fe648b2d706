"""The ARFlow model (its backbone alone: no per-token head) and its training loss.

A training example is a sequence of N images of one class (`config.data.group_size` = N: the
input pipeline groups them, arjax/data/pipeline.py), each noised at its own time:

    t_1 >= t_2 >= ... >= t_N     N uniform draws on [0, 1], sorted descending: the noisiest
                                 image first, so noisier images are the causal predecessors
    x_s = (1 - t_s) x_s^data + t_s noise_s         (arjax's times: t = 1 pure noise)
    loss = mean over images, tokens, channels of (v_pred - (noise_s - x_s^data))^2
    the sequence's label dropped to the null class with probability label_drop (CFG)

ARFlow's code draws t [B, N] uniform and sorts ascending in SiT's time (t_SiT = 0 noise):
the same order. The batch holds B N images, sequence b the rows [b N, (b + 1) N).
"""
import jax
import jax.numpy as jnp
import flax.linen as nn

from arjax.families.arflow.backbone import ArflowBackbone
from arjax.families.xar.model import drop_labels
from arjax.layers.dense import dropout_rngs


class ArflowModel(nn.Module):
  """Parameters {'backbone'}: the whole network is the flow model (no 'head' subtree)."""
  backbone: ArflowBackbone

  def __call__(self, tokens, labels):
    """Touches every parameter (used by init): each row a sequence of one image at t = 0."""
    return self.backbone(tokens[:, None], labels, jnp.zeros((tokens.shape[0], 1)))[0][:, 0]

  def velocity(self, x, labels, t, state=None):
    """(v, new state): see `ArflowBackbone.__call__`."""
    return self.backbone(x, labels, t, state=state)


def sequence_times(u):
  """Uniform draws u [B, N] -> the images' times, sorted descending along the sequence."""
  return -jnp.sort(-jnp.asarray(u, jnp.float32), axis=1)


def sequences(tokens, labels, group_size: int):
  """A batch of B N images -> (x [B, N, T, D] float32, labels [B]: each sequence's first)."""
  rows, t, d = tokens.shape
  if rows % group_size:
    raise ValueError(f"{rows} images are not whole sequences of {group_size}")
  x = tokens.astype(jnp.float32).reshape(rows // group_size, group_size, t, d)
  return x, labels.reshape(rows // group_size, group_size)[:, 0]


def flow_loss(params, tokens, labels, rng, *, model: ArflowModel, group_size: int,
              label_drop: float):
  """The training loss: tokens [B N, T, D], labels [B N] (module docstring) -> scalar."""
  x, labels = sequences(tokens, labels, group_size)
  drop_key, time_key, noise_key = jax.random.split(rng, 3)
  batch = x.shape[0]
  labels = drop_labels(labels, jax.random.uniform(drop_key, (batch,)), label_drop,
                       model.backbone.num_classes)
  t = sequence_times(jax.random.uniform(time_key, (batch, group_size)))
  noise = jax.random.normal(noise_key, x.shape, jnp.float32)
  tt = t[..., None, None]
  x_t = (1.0 - tt) * x + tt * noise
  v, _ = model.apply({"params": params}, x_t, labels, t, method=ArflowModel.velocity,
                     rngs=dropout_rngs(rng))
  return jnp.mean(jnp.square(v - (noise - x)))
