"""The next-scale model (backbone + per-token flow head) and its training loss.

Training (FlowAR's teacher forcing over scales): the tokenizer's map becomes its pyramid
(`pyramid.ScalePyramid.build`), the backbone reads the class and the up-sampled scales
0..K-2 and gives a z for every pyramid token, and the head's flow-matching loss (arjax's one
time convention, `arjax.heads.flow`) is taken on every token of every scale given its z,
averaged over all L tokens (so each scale weighs by its token count, as VAR's and FlowAR's
mean over the concatenated sequence). Labels are dropped to the null class with probability
`label_drop`, for classifier-free guidance.
"""
import functools

import jax
import jax.numpy as jnp
import flax.linen as nn

from arjax.layers.dense import dropout_rngs


class ScaleModel(nn.Module):
  """Parameters {'backbone', 'head'}."""
  backbone: nn.Module
  head: nn.Module

  def __call__(self, tokens, labels):
    """Touches every parameter (used by init): per-token velocity of the pyramid at t = 0."""
    pyramid = self.backbone.pyramid.build(tokens)
    z, _ = self.backbone(self.backbone.pyramid.ar_inputs(pyramid), labels)
    b, n, d = pyramid.shape
    return self.head(pyramid.reshape(b * n, d), jnp.zeros((b * n,)), z.reshape(b * n, -1))

  def condition(self, inputs, labels):
    """z [B, L, W] of every pyramid token from the AR inputs (`ScalePyramid.ar_inputs`)."""
    return self.backbone(inputs, labels)[0]

  def decode(self, inputs, labels, cache, scale: int):
    """(z [B, s_k^2, W] of scale k, cache): see `ScaleBackbone.__call__`."""
    return self.backbone(inputs, labels, cache=cache, scale=scale)

  def head_net(self, x_t, t, z):
    return self.head(x_t, t, z)


def scale_loss(params, tokens, labels, rng, *, model: ScaleModel, head, label_drop: float,
               num_classes: int):
  """tokens [B, N*N, D] (the tokenizer's map, raster), labels [B] -> the mean head loss over
  every token of the pyramid (module docstring)."""
  drop_rng, head_rng = jax.random.split(rng)
  labels = jnp.where(jax.random.uniform(drop_rng, labels.shape) < label_drop, num_classes, labels)
  pyramid_layout = model.backbone.pyramid
  pyramid = pyramid_layout.build(tokens.astype(jnp.float32))
  apply = functools.partial(model.apply, {"params": params}, rngs=dropout_rngs(rng))
  z = apply(pyramid_layout.ar_inputs(pyramid), labels, method=ScaleModel.condition)
  b, n, d = pyramid.shape
  net_fn = lambda x_t, tt, zz: apply(x_t, tt, zz, method=ScaleModel.head_net)
  return head.loss(net_fn, pyramid.reshape(b * n, d), z.reshape(b * n, -1), head_rng).mean()
