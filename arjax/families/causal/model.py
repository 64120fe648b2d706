"""The generative model: a backbone giving z per token, and a per-token head network.

`build` assembles either family from a config: the causal one here, the masked
random-order one (MAR) in `arjax.families.masked.model`; each with either head.

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

from arjax.families.masked import model as masked_ar
from arjax.families.causal.backbone import CausalTransformer
from arjax.heads import FlowHeadNet, FlowMatching, MarDiffusion, MarMLPAdaLN
from arjax.families.masked.backbone import MarBackbone
from arjax.families.masked.model import MaskedARModel

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


def causal_loss(params, tokens, labels, rng, *, model: ARModel, head, label_drop: float,
                num_classes: int):
  """Mean head loss over every token; a `label_drop` share of labels become the null class."""
  drop_rng, head_rng = jax.random.split(rng)
  drop = jax.random.uniform(drop_rng, labels.shape) < label_drop
  labels = jnp.where(drop, num_classes, labels)
  apply = functools.partial(model.apply, {"params": params})
  z = apply(tokens, labels, method=ARModel.condition)
  b, t, d = tokens.shape
  net_fn = lambda x_t, tt, zz: apply(x_t, tt, zz, method=ARModel.head_net)
  return head.loss(net_fn, tokens.reshape(b * t, d), z.reshape(b * t, -1), head_rng).mean()


def _build_head(config, tokenizer, dtype):
  """(head network module, head algorithm) of config.head."""
  h, d = config.head, tokenizer.token_dim
  if h.name == "flow":
    return (FlowHeadNet(token_dim=d, width=h.width, depth=h.depth, dtype=dtype),
            FlowMatching(token_dim=d, batch_mul=h.batch_mul, t_mean=h.t_mean, t_std=h.t_std))
  if h.name == "mar_diffusion":
    z_width = config.model.decoder_width if config.model.family == "mar" else config.model.width
    net = MarMLPAdaLN(in_channels=d, model_channels=h.width, z_channels=z_width,
                      num_res_blocks=h.depth, dtype=dtype, num_timesteps=h.num_timesteps)
    return net, MarDiffusion(token_dim=d, batch_mul=h.batch_mul,
                             num_sampling_steps=str(config.sample.num_steps),
                             num_timesteps=h.num_timesteps, noise_schedule=h.noise_schedule)
  raise ValueError(f"config.head.name={h.name!r} is unknown; known: 'flow', 'mar_diffusion'")


def build(config, tokenizer):
  """(model, head algorithm, loss) from config.model / config.head and the tokenizer's shapes.

  `loss(params, tokens, labels, rng)` is the family's training objective (a scalar).
  """
  m = config.model
  dtype = DTYPES[m.dtype]
  net, head = _build_head(config, tokenizer, dtype)
  if m.family == "causal":
    backbone = CausalTransformer(
        num_tokens=tokenizer.num_tokens, token_dim=tokenizer.token_dim, width=m.width,
        depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
        num_classes=config.data.num_classes, num_class_tokens=m.num_class_tokens, dtype=dtype,
        scan_layers=m.scan_layers, remat=m.remat)
    model = ARModel(backbone=backbone, head=net)
    loss = functools.partial(causal_loss, model=model, head=head, label_drop=m.label_drop,
                             num_classes=config.data.num_classes)
  elif m.family == "mar":
    backbone = MarBackbone(
        seq_len=tokenizer.num_tokens, token_dim=tokenizer.token_dim,
        encoder_embed_dim=m.encoder_width, encoder_depth=m.encoder_depth,
        encoder_num_heads=m.encoder_heads, decoder_embed_dim=m.decoder_width,
        decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_heads,
        num_classes=config.data.num_classes, buffer_size=m.buffer_size, mlp_ratio=m.mlp_ratio,
        norm_eps=m.norm_eps, dtype=dtype, scan_layers=m.scan_layers, remat=m.remat)
    model = MaskedARModel(backbone=backbone, head=net)
    top = masked_ar.max_kept(tokenizer.num_tokens, m.mask_ratio_min)
    loss = functools.partial(masked_ar.masked_loss, model=model, head=head,
                             label_drop=m.label_drop, mask_ratio_min=m.mask_ratio_min,
                             mask_ratio_std=m.mask_ratio_std,
                             buckets=masked_ar.bucket_sizes(top, m.mask_buckets))
  else:
    raise ValueError(f"config.model.family={m.family!r} is unknown; known: 'causal', 'mar'")
  return model, head, loss
