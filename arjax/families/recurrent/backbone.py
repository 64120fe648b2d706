"""The recurrent causal backbone: the causal raster backbone with gated linear attention as its
token mixer, decoded with a state of constant size instead of a KV cache.

The sequence is the causal family's (arjax/families/causal/backbone.py): P class-prefix
vectors, then the tokens x_0 .. x_{T-2}, learned absolute positions, z_i read at position
P - 1 + i. Only the blocks differ (`RecurrentBlock`), by `mixer`:

  'pure'    gated linear attention alone (`arjax.layers.linear_attention`): position s sees
            every position <= s through the decayed state S_s = g_s S_{s-1} + k_s^T v_s.
  'hybrid'  the same recurrence plus causal softmax attention *inside* chunks of
            `chunk_size` positions (chunk of position s: s // chunk_size, counted from the
            first class-prefix position): exact attention over the recent tokens of the
            chunk, the recurrence carrying everything before it. The two outputs are summed
            into one residual branch (as the scale family's M-VAR mixer does).

Training runs the chunk-parallel form of the recurrence (matmuls over chunks of
`chunk_size`) and, for 'hybrid', attention over the sequence cut into chunks (moved into the
batch axis: [B, S, W] -> [B * S / C, C, W], the tail padded). Decoding feeds one position at a
time; each layer's cache is

    {'state': [B, H, Dh, Dh] float32}                            'pure'
    {'state': ..., 'k': [B, C, H, Dh], 'v': [B, C, H, Dh]}       'hybrid': the current chunk

so the memory of a decoding step does not depend on the position nor on the sequence length.
In the hybrid cache, position s writes slot s mod C; the causal mask on slots hides the slots
above it, which still hold the previous chunk, and every slot below it was written in this
chunk, so nothing is ever cleared.
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from arjax.families.causal.backbone import CausalTransformer
from arjax.layers import attention, dense as dense_lib, mlp
from arjax.layers import transformer as layers
from arjax.layers.linear_attention import GatedLinearAttention, zero_state

Dtype = Any
MIXERS = ("pure", "hybrid")


class RecurrentBlock(nn.Module):
  """Pre-norm block: x + mixer(norm(x)), then x + mlp(norm(x)); `cache` None in training."""
  num_heads: int
  mlp_ratio: float
  mixer: str = "pure"
  chunk_size: int = 64
  dtype: Dtype = jnp.float32
  attention_dropout: float = 0.0
  dropout: float = 0.0

  def _chunk_attention(self, h, cache, index):
    """Causal softmax attention within each chunk of `chunk_size` positions."""
    attn = attention.Attention(self.num_heads, mask="causal", dtype=self.dtype, key_bias=False,
                               dropout=self.attention_dropout, name="attn")
    c = self.chunk_size
    if cache is None:
      batch, length, width = h.shape
      padded = length + (-length) % c
      chunks = jnp.pad(h, ((0, 0), (0, padded - length), (0, 0))).reshape(-1, c, width)
      out, _ = attn(chunks)
      return out.reshape(batch, padded, width)[:, :length], {}
    out, kv = attn(h, cache={"k": cache["k"], "v": cache["v"]}, index=index % c)
    return out, kv

  @nn.compact
  def __call__(self, x, cache: Optional[dict] = None, index=None):
    width = x.shape[-1]
    h = dense_lib.RMSNorm(dtype=self.dtype, name="mix_norm")(x)
    # Training: the chunk-parallel form from a zero state; decoding: the recurrence, one
    # position at a time from the cached state (the same numbers, tests/test_recurrent.py).
    mixed, state = GatedLinearAttention(
        self.num_heads, dtype=self.dtype, chunk_size=self.chunk_size, name="recurrence")(
            h, None if cache is None else cache["state"],
            form="chunk" if cache is None else "recurrent")
    new_cache = None if cache is None else {"state": state}
    if self.mixer == "hybrid":
      local, kv = self._chunk_attention(h, cache, index)
      mixed = mixed + local
      if cache is not None:
        new_cache.update(kv)
    x = x + dense_lib.dropout(self, mixed, self.dropout)
    h = mlp.SwiGLU(mlp.swiglu_hidden(width, self.mlp_ratio), dtype=self.dtype, name="mlp")(
        dense_lib.RMSNorm(dtype=self.dtype, name="mlp_norm")(x))
    x = x + dense_lib.dropout(self, h, self.dropout)
    return dense_lib.constrain(x, ("batch", "length", "embed")), new_cache


class RecurrentTransformer(CausalTransformer):
  """`CausalTransformer` (class prefix, positions, token input, teacher-forced `__call__`,
  `decode_step`) with `RecurrentBlock`s and their constant-size cache."""
  mixer: str = "pure"
  chunk_size: int = 64

  def make_blocks(self):
    if self.mixer not in MIXERS:
      raise ValueError(f"mixer={self.mixer!r}: one of {MIXERS}")
    return layers.block_stack(
        RecurrentBlock, depth=self.depth, scan=self.scan_layers, remat=self.remat,
        name="block", per_layer_args=1, broadcast_args=1, num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio, mixer=self.mixer, chunk_size=self.chunk_size,
        dtype=self.dtype, attention_dropout=self.attention_dropout, dropout=self.dropout)

  def init_cache(self, batch_size: int, dtype=jnp.float32):
    """Every layer's decoding cache (see the module docstring): its size is independent of
    the sequence length. Stacked on a leading layer axis when the blocks are scanned."""
    head_dim = self.width // self.num_heads

    def one():
      cache = {"state": zero_state(batch_size, self.num_heads, head_dim, head_dim)}
      if self.mixer == "hybrid":
        shape = (batch_size, self.chunk_size, self.num_heads, head_dim)
        cache.update(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
      return cache

    if self.scan_layers:
      return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.depth,) + a.shape), one())
    return [one() for _ in range(self.depth)]

  def prefill(self, labels, cache):
    """Runs the class prefix into `cache` one position at a time (the step the decoder takes
    for a token; P is a handful). Returns (z_0 [B, W], cache)."""
    h = self._class_prefix(labels).astype(self.dtype)
    h = h + self.pos_embed[None, : self.num_class_tokens].astype(self.dtype)
    for position in range(self.num_class_tokens):
      z, cache = self._run_blocks(h[:, position:position + 1], cache, position)
    return z[:, 0], cache
