"""The next-scale backbone: a Transformer over the concatenated scales of a pyramid.

Sequence (pyramid.ScalePyramid, K scales, L tokens), one row per pyramid token:

    block 0 (scale 0, s_0^2 rows):  the class embedding (FlowAR's start token), on every row
    block k (scale k, s_k^2 rows):  token_in(up(scale k-1))        (FlowAR's AR input)
    + a learned position per row (its scale and place) + a learned embedding of its scale
    -> blocks -> RMSNorm -> z [B, L, W]: row r conditions the head's model of pyramid token r

so z of scale k depends on the class and on scales < k only (`mixer` keeps it so):

  'attention'  (FlowAR / VAR)  block-causal softmax attention: a row sees every row of its own
               block and of the blocks before (`arjax.layers.attention.BlockCausal`).
  'hybrid'     (M-VAR)  bidirectional softmax attention *within* each scale, plus a causal gated
               linear attention (`arjax.layers.linear_attention`) over the whole sequence for
               the mixing *across* scales: linear in L, and its decoding state is [H, Dh, Dh]
               per layer instead of a KV cache of L rows. The two outputs are summed into one
               residual branch (arjax's choice; M-VAR interleaves its attention and Mamba).

Each block is AdaLN on the class (VAR / FlowAR condition every block on it): (gamma1, gamma2,
scale1, scale2, shift1, shift2) = ada(SiLU(class)), zero-started so an untrained block is the
identity; x = x + gamma1 * mixer(rms(x)(1 + scale1) + shift1), then the same for a SwiGLU MLP.

Decoding (`scale=k`, a static int): the call runs block k alone against the cache of blocks
< k and returns it with block k written: a KV cache of all L rows per layer (block-causal
masking hides the rows not yet written) or the linear attention's state. Scale by scale this
gives the numbers of the full forward (tests/test_scale.py), and no coarser scale is ever
recomputed.
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from arjax.families.scale.pyramid import ScalePyramid
from arjax.layers import adaln, attention, dense as dense_lib, mlp
from arjax.layers import transformer as layers
from arjax.layers.linear_attention import GatedLinearAttention, zero_state

Dtype = Any
MIXERS = ("attention", "hybrid")


class ScaleBlock(nn.Module):
  """One AdaLN block over the rows of `rows` = (first row, count) of the pyramid sequence
  (training: (0, L); decoding scale k: that scale's rows)."""
  num_heads: int
  hidden: int
  pyramid: ScalePyramid
  mixer: str = "attention"
  decode_scale: Optional[int] = None
  chunk_size: int = 64
  dtype: Dtype = jnp.float32
  attention_dropout: float = 0.0
  dropout: float = 0.0

  def _attention(self, mask, name="attn"):
    return attention.Attention(self.num_heads, mask=mask, dtype=self.dtype, key_bias=False,
                               dropout=self.attention_dropout, name=name)

  def _mix(self, h, cache):
    p, k = self.pyramid, self.decode_scale
    if self.mixer == "attention":
      index = None if k is None else p.offset(k)
      return self._attention(attention.BlockCausal(p.sizes))(h, cache=cache, index=index)
    # hybrid: intra-scale bidirectional attention (one module shared by every scale) ...
    intra = self._attention("bidirectional")
    if k is None:
      local = jnp.concatenate([intra(p.scale(h, j))[0] for j in range(p.num_scales)], axis=1)
    else:
      local = intra(h)[0]
    # ... plus the causal linear mixer across the whole sequence, from the state of the
    # blocks before.
    state = None if cache is None else cache["state"]
    inter, state = GatedLinearAttention(self.num_heads, dtype=self.dtype,
                                        chunk_size=self.chunk_size, name="inter")(h, state)
    return local + inter, (None if cache is None else {"state": state})

  @nn.compact
  def __call__(self, x, cache, condition):
    """x [B, n, W], cache (this layer's, or None in training), condition [B, W] (the class)."""
    width = x.shape[-1]
    ada = dense_lib.dense(6 * width, ("embed", "mlp"), dtype=self.dtype, name="ada",
                          zero=True)(nn.silu(condition.astype(self.dtype)))[:, None]
    gamma1, gamma2, scale1, scale2, shift1, shift2 = jnp.split(ada, 6, axis=-1)
    rms = dense_lib.RMSNorm(dtype=self.dtype, use_scale=False)
    h, new_cache = self._mix(adaln.modulate(rms(x), shift1, scale1), cache)
    x = x + gamma1 * dense_lib.dropout(self, h, self.dropout)
    h = mlp.SwiGLU(self.hidden, dtype=self.dtype, name="mlp")(
        adaln.modulate(rms(x), shift2, scale2))
    x = x + gamma2 * dense_lib.dropout(self, h, self.dropout)
    return dense_lib.constrain(x, ("batch", "length", "embed")), new_cache


class ScaleBackbone(nn.Module):
  """z = backbone(inputs, labels) (see the module docstring). The null class is `num_classes`."""
  pyramid: ScalePyramid
  token_dim: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float
  num_classes: int
  mixer: str = "attention"
  chunk_size: int = 64
  dtype: Dtype = jnp.float32
  scan_layers: bool = False
  remat: str = "none"
  attention_dropout: float = 0.0
  dropout: float = 0.0

  def init_cache(self, batch_size: int, dtype=jnp.float32):
    """The decoding cache of every layer: KV of all L rows ('attention') or the linear
    attention's state ('hybrid'); stacked on a leading layer axis when the blocks are scanned."""
    head_dim = self.width // self.num_heads
    if self.mixer == "attention":
      shape = (batch_size, self.pyramid.length, self.num_heads, head_dim)
      one = lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    else:
      one = lambda: {"state": zero_state(batch_size, self.num_heads, head_dim, head_dim)}
    if self.scan_layers:
      return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.depth,) + a.shape), one())
    return [one() for _ in range(self.depth)]

  @nn.compact
  def __call__(self, inputs, labels, *, cache=None, scale: Optional[int] = None):
    """Training (`scale=None`, no cache): inputs [B, L - s_0^2, D], the AR inputs of scales
    1..K-1 (`ScalePyramid.ar_inputs`) -> (z [B, L, W], None).
    Decoding scale k: inputs [B, s_k^2, D] = up(scale k-1) (ignored for k = 0), cache ->
    (z [B, s_k^2, W] of scale k, the cache with block k written)."""
    p, w = self.pyramid, self.width
    if (scale is None) != (cache is None):
      raise ValueError("decoding a scale needs the cache and the cache needs a scale")
    class_emb = nn.Embed(self.num_classes + 1, w, dtype=self.dtype, name="class_emb",
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(0.02), ("classes", "embed")))(labels)
    token_in = dense_lib.dense(w, ("token", "embed"), dtype=self.dtype, name="token_in")
    start = jnp.broadcast_to(class_emb[:, None], (labels.shape[0], p.sizes[0], w))
    if scale is None:
      first, rows = 0, p.length
      h = jnp.concatenate([start, token_in(inputs.astype(self.dtype))], axis=1)
    else:
      first, rows = p.offset(scale), p.sizes[scale]
      h = start if scale == 0 else token_in(inputs.astype(self.dtype))
    embed = lambda name, n: self.param(
        name, nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
        (n, w), jnp.float32)
    positions = embed("pos_embed", p.length)[first:first + rows]
    scale_rows = embed("scale_embed", p.num_scales)[jnp.asarray(p.scale_ids()[first:first + rows])]
    h = h + (positions + scale_rows).astype(self.dtype)[None]
    h = dense_lib.constrain(h, ("batch", "length", "embed"))

    blocks = layers.block_stack(
        ScaleBlock, depth=self.depth, scan=self.scan_layers, remat=self.remat, name="block",
        per_layer_args=1, broadcast_args=1, num_heads=self.num_heads,
        hidden=mlp.swiglu_hidden(w, self.mlp_ratio), pyramid=p, mixer=self.mixer,
        decode_scale=scale, chunk_size=self.chunk_size, dtype=self.dtype,
        attention_dropout=self.attention_dropout, dropout=self.dropout)
    h, new_cache = layers.run_block_stack(blocks, self.scan_layers, h, cache, class_emb)
    return dense_lib.RMSNorm(dtype=self.dtype, name="final_norm")(h), new_cache
