"""Transformer building blocks with logical axis names and an explicit KV cache.

Every parameter is created through `nn.with_logical_partitioning`, so the one
rules table in the config (see `arjax.parallel.sharding`) decides how it is sharded.

Choices (documented in docs/model.md, "The causal model"):
  * pre-norm blocks with RMSNorm: no mean subtraction, one parameter vector,
    the norm of LLaMA-style decoders; cheaper than LayerNorm and as stable here.
  * SwiGLU MLP (Shazeer 2020): gated MLPs train faster per FLOP than GELU MLPs
    at equal parameter count; the hidden width is 2/3 of `mlp_ratio * width`
    (rounded up to a multiple of 32) so the parameter count matches a plain
    MLP of that ratio.
  * learned absolute position embeddings (in the backbone): sequences have a
    fixed length per config, so nothing is gained from RoPE's extrapolation.

The KV cache is a plain pytree `{'k': [B, S, H, Dh], 'v': [B, S, H, Dh]}` per
layer that callers pass in and get back: the modules hold no hidden state.
"""
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any
KVCache = dict  # {'k': [B, S, H, Dh], 'v': [B, S, H, Dh]}


def dense_init(axes: Tuple[Optional[str], ...], scale: float = 1.0):
  """Fan-in scaled normal init tagged with logical axis names."""
  init = nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
  return nn.with_logical_partitioning(init, axes)


def zeros_init(axes: Tuple[Optional[str], ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class RMSNorm(nn.Module):
  """Root-mean-square norm, computed in float32 whatever the compute dtype."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return (x32 * scale).astype(self.dtype)


class Attention(nn.Module):
  """Multi-head causal self-attention; with `cache`, writes keys/values at `index`."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, cache: Optional[KVCache] = None, index=None):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    proj = lambda name, bias=True: nn.DenseGeneral(
        (self.num_heads, head_dim), axis=-1, dtype=self.dtype, name=name, use_bias=bias,
        kernel_init=dense_init(("embed", "heads", "kv")),
        bias_init=zeros_init(("heads", "kv")))
    # No key bias: it adds q.b_k to every logit of a query alike, which softmax
    # cancels; its gradient is exactly zero and Adam would only amplify rounding noise.
    q, k, v = proj("query")(x), proj("key", bias=False)(x), proj("value")(x)  # [B, n, H, Dh]
    n = x.shape[1]
    if cache is None:
      keys, values = k, v
      query_pos = jnp.arange(n)
      new_cache = None
    else:
      # Positions [index, index + n) of the cache receive this call's tokens.
      keys = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
      values = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
      query_pos = index + jnp.arange(n)
      new_cache = {"k": keys, "v": values}
    key_pos = jnp.arange(keys.shape[1])
    causal = key_pos[None, :] <= query_pos[:, None]  # [n, S]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, keys.astype(q.dtype)).astype(jnp.float32)
    logits = logits * (head_dim ** -0.5)
    logits = jnp.where(causal[None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, values.astype(self.dtype))
    out = nn.DenseGeneral(
        width, axis=(-2, -1), dtype=self.dtype, name="out",
        kernel_init=dense_init(("heads", "kv", "embed")),
        bias_init=zeros_init(("embed",)))(out)
    return out, new_cache


class SwiGLU(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    dense = lambda feats, axes, name: nn.Dense(
        feats, dtype=self.dtype, name=name, kernel_init=dense_init(axes),
        bias_init=zeros_init(axes[-1:]))
    gate = dense(self.hidden, ("embed", "mlp"), "gate")(x)
    up = dense(self.hidden, ("embed", "mlp"), "up")(x)
    return dense(width, ("mlp", "embed"), "down")(nn.silu(gate) * up)


def swiglu_hidden(width: int, mlp_ratio: float, multiple_of: int = 32) -> int:
  """2/3 of mlp_ratio * width (SwiGLU's parameter parity), rounded up so the
  hidden axis splits evenly over tensor-parallel meshes."""
  hidden = int(2 * mlp_ratio * width / 3)
  return -(-hidden // multiple_of) * multiple_of


class DecoderBlock(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""
  num_heads: int
  mlp_ratio: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cache: Optional[KVCache] = None, index=None):
    width = x.shape[-1]
    hidden = swiglu_hidden(width, self.mlp_ratio)
    h, new_cache = Attention(self.num_heads, dtype=self.dtype, name="attn")(
        RMSNorm(dtype=self.dtype, name="attn_norm")(x), cache=cache, index=index)
    x = x + h
    x = x + SwiGLU(hidden, dtype=self.dtype, name="mlp")(
        RMSNorm(dtype=self.dtype, name="mlp_norm")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, new_cache


# jax.checkpoint policies by config name (`model.remat`): what the backward pass may keep from
# the forward pass instead of recomputing it.
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep weight matmuls
}


def block_stack(block_cls, *, depth: int, scan: bool, remat: str, name: str,
                scan_name: Optional[str] = None, per_layer_args: int = 0, broadcast_args: int = 0,
                **block_kwargs):
  """`depth` blocks of `block_cls`, as a list of modules or as one scanned module.

  Unrolled (`scan=False`): a list of modules named `{name}_{i}`, one parameter subtree each,
  called in a loop (compile time grows with depth). Scanned (`scan=True`): one module
  `scan_name` (default `{name}s`) whose parameters carry a leading 'layers' axis of size `depth`, applied by
  `nn.scan` (one traced block, compile time flat in depth). The block is called as
  `block(x, *per_layer, *broadcast) -> (x, per_layer_out)`: `x` is the carry; the first
  `per_layer_args` arguments are per layer (stacked on axis 0 when scanned: e.g. a KV cache),
  the last `broadcast_args` are shared by all layers (e.g. the decode position).

  `remat` wraps each block in `jax.checkpoint` with a policy of REMAT_POLICIES.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat={remat!r}; known: {sorted(REMAT_POLICIES)}")
  cls = block_cls
  if remat != "none":
    # Under scan the remat sits inside the loop body, where CSE cannot undo it.
    cls = nn.remat(cls, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
  if not scan:
    return [cls(**block_kwargs, name=f"{name}_{i}") for i in range(depth)]
  return nn.scan(
      cls, variable_axes={"params": 0}, split_rngs={"params": True},
      in_axes=(0,) * per_layer_args + (nn.broadcast,) * broadcast_args, length=depth,
      metadata_params={nn.PARTITION_NAME: "layers"})(**block_kwargs, name=scan_name or f"{name}s")


def stack_unrolled_blocks(params: dict, name: str, depth: int, scan_name: str) -> dict:
  """Unrolled parameters `{name}_0 .. {name}_{depth-1}` (e.g. converted from PyTorch) ->
  the scanned layout `scan_name` with a leading layer axis; other entries unchanged."""
  params = dict(params)
  blocks = [params.pop(f"{name}_{i}") for i in range(depth)]
  params[scan_name] = jax.tree.map(lambda *layer: jnp.stack(layer), *blocks)
  return params
