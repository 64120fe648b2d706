"""The generative model: a backbone giving z per token, and a per-token head network.

`ARModel` is one linen module so that one parameter tree ({'backbone', 'head'})
is initialised, sharded, optimised and checkpointed together; the methods are
the jitted entry points' building blocks (teacher-forced condition, prefill,
decode step, head network). The head's *algorithm* (loss, sampler) lives in a
config-only object from `arjax.models.heads`, which calls `head_net`.
"""
from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from arjax.models.causal import CausalTransformer
from arjax.models.heads import FlowHeadNet, FlowMatching

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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


def build(config, tokenizer):
  """(ARModel, head algorithm) from config.model / config.head and the tokenizer's shapes."""
  m, h = config.model, config.head
  dtype = DTYPES[m.dtype]
  backbone = CausalTransformer(
      num_tokens=tokenizer.num_tokens, token_dim=tokenizer.token_dim, width=m.width,
      depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
      num_classes=config.data.num_classes, num_class_tokens=m.num_class_tokens, dtype=dtype)
  if h.name != "flow":
    raise ValueError(f"config.head.name={h.name!r} is unknown; known: 'flow'")
  net = FlowHeadNet(token_dim=tokenizer.token_dim, width=h.width, depth=h.depth, dtype=dtype)
  head = FlowMatching(token_dim=tokenizer.token_dim, batch_mul=h.batch_mul,
                      t_mean=h.t_mean, t_std=h.t_std)
  return ARModel(backbone=backbone, head=net), head
