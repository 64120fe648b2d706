"""The next-scale model (backbone + per-token flow head) and its training loss.

Training (FlowAR's teacher forcing over scales): the tokenizer's map becomes its pyramid
(`pyramid.ScalePyramid.build`), the backbone reads the class and the up-sampled scales
0..K-2 and gives a z for every pyramid token, and the head's flow-matching loss (arjax's one
time convention, `arjax.heads.flow`) is taken on every token of every scale given its z,
averaged over all L tokens (so each scale weighs by its token count, as VAR's and FlowAR's
mean over the concatenated sequence). Labels are dropped to the null class with probability
`label_drop`, for classifier-free guidance.

With `model.flow_net='scale'` (FlowAR's flow Transformer over a whole scale, `flow_net.py`)
the loss is `scale_flow_loss`: the same flow matching, but each scale of each image noised at
one time (logit-normal, as the head's), all its tokens denoised together given their z.
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
  # 'token': the registry's per-token head net; 'scale': a ScaleFlowNet over whole scales.
  flow_net: str = "token"

  def __call__(self, tokens, labels):
    """Touches every parameter (used by init): velocity of the pyramid at t = 0."""
    pyramid = self.backbone.pyramid.build(tokens)
    z, _ = self.backbone(self.backbone.pyramid.ar_inputs(pyramid), labels)
    b, n, d = pyramid.shape
    if self.flow_net == "scale":
      return self.head(pyramid, jnp.zeros((b,)), z)
    return self.head(pyramid.reshape(b * n, d), jnp.zeros((b * n,)), z.reshape(b * n, -1))

  def condition(self, inputs, labels):
    """z [B, L, W] of every pyramid token from the AR inputs (`ScalePyramid.ar_inputs`)."""
    return self.backbone(inputs, labels)[0]

  def decode(self, inputs, labels, cache, scale: int):
    """(z [B, s_k^2, W] of scale k, cache): see `ScaleBackbone.__call__`."""
    return self.backbone(inputs, labels, cache=cache, scale=scale)

  def head_net(self, x_t, t, z):
    return self.head(x_t, t, z)

  def head_rows(self, x_t, t, z, tokens_per_image: int):
    """The head on the head contract's flat rows: per token, or (flow_net='scale') as
    images of `tokens_per_image` tokens each."""
    if self.flow_net == "scale":
      return self.head.rows(x_t, t, z, tokens_per_image)
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


def scale_flow_loss(params, tokens, labels, rng, *, model: ScaleModel, head, label_drop: float,
                    num_classes: int):
  """The loss with a flow net over whole scales: per image and draw (head.batch_mul draws per
  image) one time per scale, x_t = (1 - t) x + t noise on all its tokens, target noise - x;
  mean over every token, channel and draw."""
  drop_rng, t_rng, noise_rng = jax.random.split(rng, 3)
  labels = jnp.where(jax.random.uniform(drop_rng, labels.shape) < label_drop, num_classes, labels)
  layout = model.backbone.pyramid
  pyramid = layout.build(tokens.astype(jnp.float32))
  apply = functools.partial(model.apply, {"params": params}, rngs=dropout_rngs(rng))
  z = apply(layout.ar_inputs(pyramid), labels, method=ScaleModel.condition)
  # Draws repeat each image in place (the batch axis stays major, its sharding survives).
  x = jnp.repeat(pyramid, head.batch_mul, axis=0)
  z = jnp.repeat(z, head.batch_mul, axis=0)
  t = head.sample_t(t_rng, x.shape[0] * layout.num_scales).reshape(x.shape[0], -1)
  noise = jax.random.normal(noise_rng, x.shape)
  total = 0.0
  for k in range(layout.num_scales):
    xk, nk, tk = layout.scale(x, k), layout.scale(noise, k), t[:, k, None, None]
    v = apply((1.0 - tk) * xk + tk * nk, t[:, k], layout.scale(z, k), method=ScaleModel.head_net)
    total = total + jnp.sum(jnp.square(v - (nk - xk)))
  return total / x.size
