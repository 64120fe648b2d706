"""The causal family as a plug-in: raster-order AR over tokens with a KV cache.

A class prefix of `num_class_tokens` learned tokens, then the tokens in raster order; the
backbone (arjax/families/causal/backbone.py) gives z_i from tokens < i, the head models
token i given z_i. Training is teacher-forced (one forward pass over the whole sequence);
sampling is one `lax.scan` over positions with the KV cache in the carry
(arjax/families/causal/sampler.py).
"""
import functools

import jax
import jax.numpy as jnp

from arjax.config.schema import positive
from arjax.families import base
from arjax.families.causal.backbone import CausalTransformer
from arjax.families.causal.model import ARModel, causal_loss
from arjax.families.causal.sampler import Sampler, token_step
from arjax.layers import mlp
from arjax.sampling.base import head_with_solver, image_keys, sampler_settings
from arjax.util.flops import matmul


def _blocks_flops(rows: int, keys: int, width: int, hidden: int, depth: int) -> int:
  """`depth` decoder blocks over `rows` (= batch x positions) queries, each attending to `keys` keys.

  Per block: q, k, v and out projections (W x W each); attention scores q.k^T
  and probs.v (heads x head_dim = W per key, both computed in full under the
  causal mask, as the implementation does); SwiGLU gate, up (W x hidden) and
  down (hidden x W).
  """
  projections = 4 * matmul(rows, width, width)
  attention = 2 * matmul(rows, width, keys)
  mlp = 2 * matmul(rows, width, hidden) + matmul(rows, hidden, width)
  return depth * (projections + attention + mlp)


def is_guided(config) -> bool:
  """Whether sampling runs CFG: the rule of `Sampler.__call__` (a ramp to 1 is the constant 1)."""
  return config.sample.cfg_scale != 1.0


class CausalFamily(base.Family):
  """`model.family='causal'`."""
  name = "causal"
  cond_width_field = "width"
  head_splits = (("width", "num_heads"),)
  schema = {
      **base.TRANSFORMER_SCHEMA,
      "model.num_class_tokens": ((int,), positive, "> 0"),
      **base.BLOCK_STACK_SCHEMA,
  }

  def backbone_fields(self, config, tokenizer) -> dict:
    """The `CausalTransformer` fields `config.model` and the tokenizer set (shared with the
    families whose backbone extends it: arjax/families/recurrent)."""
    m = config.model
    return dict(
        num_tokens=tokenizer.num_tokens, token_dim=tokenizer.token_dim, width=m.width,
        depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
        num_classes=config.data.num_classes, num_class_tokens=m.num_class_tokens,
        dtype=base.compute_dtype(config), scan_layers=m.scan_layers, remat=m.remat,
        attention_dropout=m.attention_dropout, dropout=m.dropout)

  def make_backbone(self, config, tokenizer):
    return CausalTransformer(**self.backbone_fields(config, tokenizer))

  def build(self, config, tokenizer, head_net, head):
    m = config.model
    backbone = self.make_backbone(config, tokenizer)
    model = ARModel(backbone=backbone, head=head_net)
    loss = functools.partial(causal_loss, model=model, head=head, label_drop=m.label_drop,
                             num_classes=config.data.num_classes)
    return model, loss

  def sampler(self, model, head, tokenizer, config):
    s = config.sample
    return Sampler(model, head, tokenizer, **sampler_settings(s))

  def flops(self, config, tokenizer, head_kind, mode, batch_size):
    """Notation: B batch, T tokens of dim D, P class-prefix tokens, W / L backbone width /
    depth, Hd its SwiGLU hidden. Matmuls only (2 FLOPs per multiply-add); norms, softmax,
    activations, the loss and the optimizer are elementwise and left out.

    train: the teacher-forced backbone over S = P + T - 1 positions (keys = S), with
      token_in on the T - 1 fed tokens; the head on B * T tokens. Backward = 2 x forward
      (gradients of each matmul's input and weight), except token_in, whose input is data:
      only its weight gradient (1 x forward).
    sample: with CFG (scale != 1) every row is doubled, B' = 2B, else B' = B. Prefill of
      the P class tokens, then T - 1 decode steps that feed the tokens x_0 .. x_{T-2} (one
      position each); every query attends to the whole KV cache of P + T positions (masked,
      computed in full). The head samples B' x T tokens in T calls.
    decode: one token step: the head samples a token from z, the backbone feeds it against
      the full static cache (every position attends to all P + T slots, masked).

    The sampler as implemented runs slightly more than these model FLOPs: it also feeds
    the last token (whose z is never used), and Heun's last step evaluates the correction
    that `jnp.where` then discards; those are waste, which MFU by convention does not credit.
    """
    m = config.model
    d, t = tokenizer.token_dim, tokenizer.num_tokens
    p, w = m.num_class_tokens, m.width
    hidden = mlp.swiglu_hidden(w, m.mlp_ratio)
    head = functools.partial(head_kind.flops, config, token_dim=d, cond_width=w)
    rows = batch_size * (2 if is_guided(config) else 1)
    if mode == "train":
      seq = p + t - 1
      blocks = _blocks_flops(batch_size * seq, seq, w, hidden, m.depth)
      token_in = matmul(batch_size * (t - 1), d, w)
      backbone = 3 * blocks + 2 * token_in
      head_flops = head(mode="train", tokens=batch_size * t)
    elif mode == "sample":
      cache = p + t
      backbone = (_blocks_flops(rows * p, cache, w, hidden, m.depth)
                  + _blocks_flops(rows * (t - 1), cache, w, hidden, m.depth)
                  + matmul(rows * (t - 1), d, w))
      # Per position its own step count under a DiSA schedule (one head call each).
      head_flops = sum(head(mode="sample", tokens=rows * tokens, calls=1, num_steps=steps)
                       for tokens, steps in self.head_steps(config, tokenizer))
    elif mode == "decode":
      backbone = _blocks_flops(rows, p + t, w, hidden, m.depth) + matmul(rows, d, w)
      head_flops = head(mode="sample", tokens=rows, calls=1)
    else:
      raise ValueError(f"mode={mode!r}; known: 'train', 'sample', 'decode'")
    return {"backbone": int(backbone), "head": int(head_flops),
            "total": int(backbone + head_flops)}

  def stack_depths(self, config):
    return (("model", "depth"), ("head", "depth"))

  def decode_step(self, exp, batch_size):
    """One token step of the causal sampler (the head samples token i from z_i, the backbone
    feeds it at position i against the KV cache): `token_step`, the body of the sampler's
    scan. The position is an argument, so one compilation serves every position; the cache
    has its full static length at every position (masked attention over all of it)."""
    config = exp.config
    s = config.sample
    model, head = exp.model, head_with_solver(exp.head, s.solver, s.diffusion_scale)
    guided = is_guided(config)
    labels = jnp.arange(batch_size, dtype=jnp.int32) % config.data.num_classes
    if guided:
      labels = jnp.concatenate([labels, jnp.full_like(labels, model.backbone.num_classes)])
    keys = image_keys(jax.random.PRNGKey(s.seed), jnp.arange(batch_size))
    scale = jnp.float32(s.cfg_scale)

    def prefill(params):
      cache = model.backbone.init_cache(labels.shape[0], jnp.float32)
      return model.apply({"params": params}, labels, cache, method=ARModel.prefill)

    def one_token(params, state, position):
      z, cache = state
      _, z, cache = token_step(
          params, z, cache, position, keys, scale, s.temperature, model=model, head=head,
          guided=guided, num_steps=s.num_steps, cfg_interval=tuple(s.cfg_interval),
          value_range=exp.tokenizer.value_range)
      return z, cache

    n = exp.tokenizer.num_tokens
    return prefill, one_token, (0, n // 2, n - 1)

  def slot_decoder(self, sampler, num_slots):
    """Slots with their own position and KV cache (arjax/families/causal/slots.py)."""
    from arjax.families.causal import slots  # pylint: disable=import-outside-toplevel
    return slots.slot_decoder(sampler, num_slots)

  def describe_line(self, config):
    m = config.model
    return f"causal: {m.width} x {m.depth} ({m.num_heads} heads)"
