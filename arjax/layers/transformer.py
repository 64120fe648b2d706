"""The causal family's decoder block, and stacks of identical blocks (unrolled or scanned).

Choices (documented in docs/model.md, "The causal model"):
  * pre-norm blocks with RMSNorm: no mean subtraction, one parameter vector,
    the norm of LLaMA-style decoders; cheaper than LayerNorm and as stable here.
  * SwiGLU MLP (`arjax.layers.mlp`); the hidden width is 2/3 of `mlp_ratio * width`
    (rounded up to a multiple of 32) so the parameter count matches a plain
    MLP of that ratio.
  * learned absolute position embeddings (in the backbone): sequences have a
    fixed length per config, so nothing is gained from RoPE's extrapolation.

The attention, its masks and KV cache are `arjax.layers.attention`'s.
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from arjax.layers import attention, dense as dense_lib, mlp
from arjax.layers.attention import KVCache

Dtype = Any


class DecoderBlock(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""
  num_heads: int
  mlp_ratio: float
  dtype: Dtype = jnp.float32
  # Dropout of the attention probabilities, and of each residual branch's output.
  attention_dropout: float = 0.0
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, cache: Optional[KVCache] = None, index=None):
    width = x.shape[-1]
    hidden = mlp.swiglu_hidden(width, self.mlp_ratio)
    h, new_cache = attention.Attention(self.num_heads, mask="causal", dtype=self.dtype,
                                       key_bias=False, dropout=self.attention_dropout,
                                       name="attn")(
        dense_lib.RMSNorm(dtype=self.dtype, name="attn_norm")(x), cache=cache, index=index)
    x = x + dense_lib.dropout(self, h, self.dropout)
    h = mlp.SwiGLU(hidden, dtype=self.dtype, name="mlp")(
        dense_lib.RMSNorm(dtype=self.dtype, name="mlp_norm")(x))
    x = x + dense_lib.dropout(self, h, self.dropout)
    x = dense_lib.constrain(x, ("batch", "length", "embed"))
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
      cls, variable_axes={"params": 0}, split_rngs={"params": True, dense_lib.DROPOUT_RNG: True},
      in_axes=(0,) * per_layer_args + (nn.broadcast,) * broadcast_args, length=depth,
      metadata_params={nn.PARTITION_NAME: "layers"})(**block_kwargs, name=scan_name or f"{name}s")


def run_block_stack(blocks, scan: bool, x, per_layer, *broadcast):
  """Applies `block_stack`'s blocks to the carry `x`: `per_layer` is None (nothing per layer,
  e.g. training without a cache), a list of one entry per layer (unrolled) or the stacked
  entries (scanned); `broadcast` goes to every block. -> (x, the blocks' per-layer outputs, None
  when `per_layer` is None and the blocks are unrolled)."""
  if scan:
    return blocks(x, per_layer, *broadcast)
  outs = []
  for i, block in enumerate(blocks):
    x, out = block(x, None if per_layer is None else per_layer[i], *broadcast)
    outs.append(out)
  return x, (None if per_layer is None else outs)


def stack_unrolled_blocks(params: dict, name: str, depth: int, scan_name: str) -> dict:
  """Unrolled parameters `{name}_0 .. {name}_{depth-1}` (e.g. converted from PyTorch) ->
  the scanned layout `scan_name` with a leading layer axis; other entries unchanged."""
  params = dict(params)
  blocks = [params.pop(f"{name}_{i}") for i in range(depth)]
  params[scan_name] = jax.tree.map(lambda *layer: jnp.stack(layer), *blocks)
  return params
