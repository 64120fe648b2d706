"""Causal (raster-order) decoder backbone: tokens -> one condition vector z per token.

Sequence layout for T tokens and P class-prefix tokens:

    position:  0 .. P-1          P      P+1     ...  P+T-2
    input:     class prefix      x_0    x_1     ...  x_{T-2}
    output z:  z_0 at P-1        z_1    z_2     ...  z_{T-1}

so z_i (which conditions the head's model of token x_i) sees the class and
x_{<i} only. The class prefix is P learned vectors per class; row
`num_classes` is the learned null class used for label dropout and CFG.

Decoding uses the same weights through `prefill` (the class prefix) and
`decode_step` (one token), with an explicit KV cache of `cache_length()`
positions, one more than the sequence needs so that every step of a scan may
write its token (the last write is never read).
"""
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from arjax.layers import dense as dense_lib
from arjax.layers import transformer as layers

Dtype = Any


class CausalTransformer(nn.Module):
  num_tokens: int
  token_dim: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float
  num_classes: int
  num_class_tokens: int
  dtype: Dtype = jnp.float32
  # Blocks as one nn.scan over a stacked 'layers' axis (compile time flat in depth) and their
  # jax.checkpoint policy (see layers.block_stack); the KV cache is stacked alike when scanned.
  scan_layers: bool = False
  remat: str = "none"
  # Dropout of attention probabilities and of the blocks' residual branches (training only).
  attention_dropout: float = 0.0
  dropout: float = 0.0

  def setup(self):
    self.class_embed = self.param(
        "class_embed",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("classes", "embed")),
        (self.num_classes + 1, self.num_class_tokens * self.width), jnp.float32)
    self.pos_embed = self.param(
        "pos_embed",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
        (self.cache_length(), self.width), jnp.float32)
    self.token_in = dense_lib.dense(self.width, ("token", "embed"), dtype=self.dtype)
    self.blocks = self.make_blocks()
    self.final_norm = dense_lib.RMSNorm(dtype=self.dtype)

  def make_blocks(self):
    """The stack of decoder blocks, called as block(h, cache, index) -> (h, cache). A backbone
    with another token mixer (arjax/families/recurrent) overrides this and the cache methods;
    the class prefix, positions, token input and final norm stay these."""
    return layers.block_stack(
        layers.DecoderBlock, depth=self.depth, scan=self.scan_layers, remat=self.remat,
        name="block", per_layer_args=1, broadcast_args=1, num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio, dtype=self.dtype, attention_dropout=self.attention_dropout,
        dropout=self.dropout)

  def cache_length(self) -> int:
    return self.num_class_tokens + self.num_tokens

  def _class_prefix(self, labels):
    prefix = jnp.take(self.class_embed, labels, axis=0)
    return prefix.reshape(labels.shape[0], self.num_class_tokens, self.width)

  def _run_blocks(self, h, cache, index):
    if self.scan_layers:
      h, new_cache = self.blocks(h, cache, index)
      return self.final_norm(h), new_cache
    new_cache = []
    for i, block in enumerate(self.blocks):
      h, layer_cache = block(h, None if cache is None else cache[i], index)
      new_cache.append(layer_cache)
    return self.final_norm(h), (None if cache is None else new_cache)

  def __call__(self, tokens, labels):
    """Teacher-forced forward. tokens [B, T, D], labels [B] -> z [B, T, W]."""
    batch, num_tokens, _ = tokens.shape
    if num_tokens != self.num_tokens:
      raise ValueError(f"tokens have length {num_tokens}, the model was built for {self.num_tokens}")
    prefix = self._class_prefix(labels)
    inputs = self.token_in(tokens[:, :-1].astype(self.dtype))
    h = jnp.concatenate([prefix.astype(self.dtype), inputs], axis=1)
    h = h + self.pos_embed[None, : h.shape[1]].astype(self.dtype)
    h = dense_lib.constrain(h, ("batch", "length", "embed"))
    h, _ = self._run_blocks(h, None, None)
    return h[:, self.num_class_tokens - 1:]

  def init_cache(self, batch_size: int, dtype=jnp.float32):
    head_dim = self.width // self.num_heads
    shape = (batch_size, self.cache_length(), self.num_heads, head_dim)
    if self.scan_layers:
      return {"k": jnp.zeros((self.depth,) + shape, dtype), "v": jnp.zeros((self.depth,) + shape, dtype)}
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(self.depth)]

  def prefill(self, labels, cache):
    """Runs the class prefix into `cache`. Returns (z_0 [B, W], cache)."""
    h = self._class_prefix(labels).astype(self.dtype)
    h = h + self.pos_embed[None, : self.num_class_tokens].astype(self.dtype)
    h, cache = self._run_blocks(h, cache, 0)
    return h[:, -1], cache

  def decode_step(self, token, position, cache):
    """Feeds token x_position [B, D]; returns (z_{position+1} [B, W], cache)."""
    index = self.num_class_tokens + position
    h = self.token_in(token[:, None].astype(self.dtype))
    h = h + jax.lax.dynamic_slice_in_dim(self.pos_embed, index, 1)[None].astype(self.dtype)
    h, cache = self._run_blocks(h, cache, index)
    return h[:, 0], cache
