"""The causal family's model: a backbone giving z per token, and a per-token head network.

`ARModel` is one linen module so that one parameter tree ({'backbone', 'head'})
is initialised, sharded, optimised and checkpointed together; the methods are
the jitted entry points' building blocks (teacher-forced condition, prefill,
decode step, head network). The head's *algorithm* (loss, sampler) lives in a
config-only object from `arjax.heads`, which calls `head_net`.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from arjax.layers.dense import dropout_rngs

Dtype = Any


class ARModel(nn.Module):
  backbone: nn.Module
  head: nn.Module

  def __call__(self, tokens, labels):
    """Touches every parameter (used by init): returns per-token velocity."""
    z = self.backbone(tokens, labels)
    b, t, d = tokens.shape
    return self.head(tokens.reshape(b * t, d), jnp.zeros((b * t,)), z.reshape(b * t, -1))

  def condition(self, tokens, labels):
    return self.backbone(tokens, labels)

  def head_net(self, x_t, t, z):
    return self.head(x_t, t, z)

  def prefill(self, labels, cache):
    return self.backbone.prefill(labels, cache)

  def decode_step(self, token, position, cache):
    return self.backbone.decode_step(token, position, cache)


def causal_loss(params, tokens, labels, rng, *, model: ARModel, head, label_drop: float,
                num_classes: int):
  """Mean head loss over every token; a `label_drop` share of labels become the null class."""
  drop_rng, head_rng = jax.random.split(rng)
  drop = jax.random.uniform(drop_rng, labels.shape) < label_drop
  labels = jnp.where(drop, num_classes, labels)
  apply = functools.partial(model.apply, {"params": params}, rngs=dropout_rngs(rng))
  z = apply(tokens, labels, method=ARModel.condition)
  b, t, d = tokens.shape
  net_fn = lambda x_t, tt, zz: apply(x_t, tt, zz, method=ARModel.head_net)
  return head.loss(net_fn, tokens.reshape(b * t, d), z.reshape(b * t, -1), head_rng).mean()
