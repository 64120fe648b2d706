"""xAR's network: the whole Transformer is the flow model of the noisy entities.

    h = RMSNorm_w(z_proj(x_t) + encoder_pos)          x_t: noisy tokens, sequence order
    h = encoder blocks(h | c);  h = RMSNorm_w(h)
    h = decoder_embed(h) + decoder_pos
    h = decoder blocks(h | c);  v = pred(RMSNorm_w(h))  velocity, one per token
    c = class_emb(label) + time_embed(int(1000 t_e))  one condition per entity e

There is no per-token head: `pred` is the model's output. Each block is AdaLN on c (xAR's
`Block`): (gamma1, gamma2, scale1, scale2, shift1, shift2) = ada_lin(SiLU(c)), in that order,
and with rms(x) an RMSNorm without weight,

    x = x + gamma1 * attn(rms(x) * (1 + scale1) + shift1)
    x = x + gamma2 * GEGLU(rms(x) * (1 + scale2) + shift2)

Attention is block-causal over entities (a token sees its own entity and every earlier one;
`arjax.layers.attention.BlockCausal`) with 2-D RoPE on interleaved pairs (xAR's
VisionRotaryEmbeddingFast: the first half of each head rotates by the token's grid row, the
second by its column). The time embedding reads the integer `trunc(float32(t) * 1000)`,
exactly what the official `(t * 1000).long()` computes in float32.

Decoding: `__call__` with a KV cache (`init_cache`, one per attention layer, the full
sequence long) runs any run of whole entities starting at token `index`, writing their keys
and values there; the block-causal mask hides the entities not written yet. So a sampler
decodes entity s by calling at index s * size with the cache of the clean entities 0..s-1:
the same numbers as the full block-causal forward over [clean 0..s-1 at t = 0 | entity s]
(tests/test_xar_backbone.py), which is how the official KV-cached `sample_inference` computes.

Parameter names follow the official state_dict (`arjax/families/xar/weights.py` maps them):
`name.<i>` of a ModuleList is `name_<i>`; xAR's fused `qkv` is `query` / `key` / `value`.
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from arjax.families.xar.entities import EntityLayout
from arjax.layers import adaln, attention, dense as dense_lib, mlp
from arjax.layers import transformer as layers
from arjax.layers.rope import Rope

Dtype = Any
# RoPE as xAR's VisionRotaryEmbeddingFast: 2-D, base 10000, interleaved pairs.
XAR_ROPE = Rope(axes=2, pairs="interleaved")
# Its time embedding's sinusoid width (TimestepEmbedder(frequency_embedding_size=256)).
TIME_FREQUENCIES = 256


def time_steps(t):
  """The integer timestep xAR's time embedding sees: trunc(float32(float32(t) * 1000)).

  The float32 product is rounded before truncation, so t = 0.52 gives 520 (float64: 519)."""
  return jnp.trunc(jnp.asarray(t, jnp.float32) * jnp.float32(1000.0))


def mlp_hidden(width: int, mlp_ratio: float) -> int:
  """xAR's GEGLU hidden width: int(width * mlp_ratio * 2 / 3), truncated (64, 4.0 -> 170)."""
  return int(width * mlp_ratio * 2 / 3.)


def per_token(a, entity_size: int):
  """[B, e, F] per entity -> [B, e * entity_size, F], each entity's row over its tokens."""
  return jnp.repeat(a, entity_size, axis=1)


class XarBlock(nn.Module):
  """One AdaLN block (see the module docstring); `block_sizes` are the mask's entities."""
  num_heads: int
  hidden: int
  block_sizes: tuple
  entity_size: int
  dtype: Dtype = jnp.float32
  attention_dropout: float = 0.0
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, cache, condition, positions, index):
    """x [B, n, W] (n whole entities), condition [B, n / entity_size, W], positions [n, 2] grid
    (row, column); cache/index as `attention.Attention`'s. -> (x, new cache or None)."""
    width = x.shape[-1]
    # Zero-started (adaLN-Zero): an untrained block is the identity. Official weights overwrite it.
    ada = dense_lib.dense(6 * width, ("embed", "mlp"), dtype=self.dtype, name="ada_lin",
                          zero=True)(nn.silu(condition.astype(self.dtype)))
    self.sow("intermediates", "ada", ada)
    gamma1, gamma2, scale1, scale2, shift1, shift2 = (
        per_token(a, self.entity_size) for a in jnp.split(ada, 6, axis=-1))
    rms = dense_lib.RMSNorm(dtype=self.dtype, use_scale=False)
    h, new_cache = attention.Attention(
        self.num_heads, mask=attention.BlockCausal(self.block_sizes), dtype=self.dtype,
        rope=XAR_ROPE, out_name="proj", dropout=self.attention_dropout, name="attn")(
            adaln.modulate(rms(x), shift1, scale1), cache=cache, index=index, positions=positions)
    x = x + gamma1 * dense_lib.dropout(self, h, self.dropout)
    h = mlp.GeGLU(self.hidden, dtype=self.dtype, name="mlp")(adaln.modulate(rms(x), shift2, scale2))
    x = x + gamma2 * dense_lib.dropout(self, h, self.dropout)
    return dense_lib.constrain(x, ("batch", "length", "embed")), new_cache


class TimeEmbedding(nn.Module):
  """xAR's TimestepEmbedder: Linear(256 -> W), SiLU, Linear(W -> W) on [cos | sin] features of
  the integer timestep (max period 10000, cos half first)."""
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, steps):
    shape = steps.shape
    freqs = adaln.timestep_embedding(steps, TIME_FREQUENCIES).astype(self.dtype)
    h = dense_lib.dense(self.width, ("time", "embed"), dtype=self.dtype, name="mlp_0")(freqs)
    h = dense_lib.dense(self.width, ("mlp_out", "embed"), dtype=self.dtype, name="mlp_2")(
        nn.silu(h))
    return h.reshape(shape + (self.width,))


class XarBackbone(nn.Module):
  """v = backbone(x_t [B, n, D] in sequence order, labels [B], t [B, n / size]) (see the module
  docstring). The null class is `num_classes` (the class table has num_classes + 1 rows)."""
  layout: EntityLayout
  token_dim: int
  width: int
  encoder_depth: int
  encoder_heads: int
  decoder_depth: int
  decoder_heads: int
  mlp_ratio: float
  num_classes: int
  dtype: Dtype = jnp.float32
  scan_layers: bool = False
  remat: str = "none"
  attention_dropout: float = 0.0
  dropout: float = 0.0

  @property
  def seq_len(self) -> int:
    return self.layout.num_tokens

  def init_cache(self, batch_size: int, dtype=jnp.float32) -> dict:
    """Empty KV caches of both stacks, the whole sequence long."""
    def stack(depth, heads):
      shape = (batch_size, self.seq_len, heads, self.width // heads)
      if self.scan_layers:
        shape = (depth,) + shape
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
      return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(depth)]
    return {"encoder": stack(self.encoder_depth, self.encoder_heads),
            "decoder": stack(self.decoder_depth, self.decoder_heads)}

  def _stack(self, name, depth, heads):
    return layers.block_stack(
        XarBlock, depth=depth, scan=self.scan_layers, remat=self.remat, name=name,
        scan_name=name, per_layer_args=1, broadcast_args=3, num_heads=heads,
        hidden=mlp_hidden(self.width, self.mlp_ratio), block_sizes=self.layout.block_sizes(),
        entity_size=self.layout.size, dtype=self.dtype,
        attention_dropout=self.attention_dropout, dropout=self.dropout)

  def _run(self, blocks, name, h, cache, condition, positions, index):
    if self.scan_layers:
      return blocks(h, cache, condition, positions, index)
    new_cache = []
    for i, block in enumerate(blocks):
      h, layer_cache = block(h, None if cache is None else cache[i], condition, positions, index)
      new_cache.append(layer_cache)
      if i < len(blocks) - 1:
        self.sow("intermediates", f"{name}_block{i}", h)
    return h, (None if cache is None else new_cache)

  @nn.compact
  def __call__(self, x, labels, t, *, cache: Optional[dict] = None, index=None):
    """x [B, n, D]: n tokens (whole entities) at sequence positions [index, index + n);
    training passes all L tokens and no cache. t [B, n / size]: each entity's flow time.
    -> (velocity [B, n, D] float32, new cache or None)."""
    n, size, width = x.shape[1], self.layout.size, self.width
    if n % size:
      raise ValueError(f"{n} tokens are not whole entities of {size}")
    if cache is None and n != self.seq_len:
      raise ValueError(f"without a KV cache the call covers all {self.seq_len} tokens, got {n}")
    start = 0 if index is None else index
    pos_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed"))
    rows = lambda table: jax.lax.dynamic_slice_in_dim(table, start, n).astype(self.dtype)[None]
    positions = jax.lax.dynamic_slice_in_dim(jnp.asarray(self.layout.grid_positions()), start, n)

    class_emb = nn.Embed(self.num_classes + 1, width, dtype=self.dtype, name="class_emb",
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(0.02), ("classes", "embed")))(labels)
    time_emb = TimeEmbedding(width, dtype=self.dtype, name="time_embed")(time_steps(t))
    condition = class_emb[:, None] + time_emb  # [B, e, W]
    for key, value in (("class_embedding", class_emb), ("time_emb", time_emb),
                       ("condition", condition)):
      self.sow("intermediates", key, value)

    h = dense_lib.dense(width, ("token", "embed"), dtype=self.dtype, name="z_proj")(
        x.astype(self.dtype))
    h = h + rows(self.param("encoder_pos_embed_learned", pos_init, (self.seq_len, width)))
    h = dense_lib.RMSNorm(dtype=self.dtype, name="z_proj_ln")(h)
    h = dense_lib.constrain(h, ("batch", "length", "embed"))
    self.sow("intermediates", "enc_in", h)
    caches = {"encoder": None, "decoder": None} if cache is None else cache
    h, enc_cache = self._run(self._stack("encoder_blocks", self.encoder_depth, self.encoder_heads),
                             "enc", h, caches["encoder"], condition, positions, index)
    h = dense_lib.RMSNorm(dtype=self.dtype, name="encoder_norm")(h)
    self.sow("intermediates", "encoder", h)

    h = dense_lib.dense(width, ("mlp_out", "embed"), dtype=self.dtype, name="decoder_embed")(h)
    h = h + rows(self.param("decoder_pos_embed_learned", pos_init, (self.seq_len, width)))
    self.sow("intermediates", "dec_in", h)
    h, dec_cache = self._run(self._stack("decoder_blocks", self.decoder_depth, self.decoder_heads),
                             "dec", h, caches["decoder"], condition, positions, index)
    h = dense_lib.RMSNorm(dtype=self.dtype, name="decoder_norm")(h)
    v = dense_lib.dense(self.token_dim, ("embed", "token"), dtype=self.dtype, name="pred")(h)
    new_cache = None if cache is None else {"encoder": enc_cache, "decoder": dec_cache}
    return v.astype(jnp.float32), new_cache

