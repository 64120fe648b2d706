"""ARFlow's network: DiT blocks (adaLN-Zero) whose token mixer is gated retention over images.

A sequence is n images of T tokens each, image s at its own flow time t_s:

    h = token_in(x) + pos                     x [B, n, T, D]; pos one learned row per token
    c_s = class_emb(label) + time_embed(1000 (1 - t_s))     one condition per image
    h = blocks(h | c);  v = out(modulate(LN(h), shift, scale))     velocity per token

Each block (ARFlow's `ARFlowBlock`): (shift1, scale1, gate1, shift2, scale2, gate2) =
ada(SiLU(c)), zero-started (an untrained block is the identity), LN a LayerNorm without
parameters,

    h = h + gate1 * GatedRetention(modulate(LN(h), shift1, scale1), c)
    h = h + gate2 * MLP_tanh-GELU(modulate(LN(h), shift2, scale2))

`arjax.layers.linear_attention.GatedRetention` with one image per chunk: softmax attention over
the T tokens of the image (bidirectional), and a state [H, Dh, Dh] carrying the earlier images
(`chunk_retention`). So image s sees image s' < s only through the state, never a later one.

Two ways to run it, the same numbers (tests/test_arflow.py):
  training   `__call__(x, labels, t)` on all n images at once (chunk-parallel, zero state);
  sampling   `__call__(x, labels, t, state=states)` on ONE image [B, 1, T, D] with every
             layer's state from the images before it -> (v, the states after it). Nothing
             else is kept between calls: the memory does not grow with the number of images.

Times are arjax's (`arjax.heads.flow`: t = 1 pure noise, t = 0 data). ARFlow's code has SiT's
(t_SiT = 1 - t) fed to the time embedder unscaled; here the embedder sees 1000 t_SiT, the range
the other arjax time embeddings use. The position table is learned (ARFlow: fixed 2-D sin-cos).
"""
from typing import Any, Optional

import jax.numpy as jnp
import flax.linen as nn

from arjax.families.xar.backbone import TimeEmbedding, per_token
from arjax.layers import adaln, dense as dense_lib, mlp
from arjax.layers import transformer as layers
from arjax.layers.linear_attention import GatedRetention, zero_state

Dtype = Any


def embedded_time(t):
  """What the time embedding reads: 1000 (1 - t), SiT's time scaled to [0, 1000]."""
  return 1000.0 * (1.0 - jnp.asarray(t, jnp.float32))


class ArflowBlock(nn.Module):
  """One adaLN-Zero block (module docstring); `state` None in training (chunk form from a zero
  state, every image of x), else x is one image and the state enters with it (step form)."""
  num_heads: int
  hidden: int
  tokens: int
  dtype: Dtype = jnp.float32
  gate_normalizer: float = 16.0
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, state, condition):
    """x [B, n T, W], condition [B, n, W] -> (x, the state after x's last image or None)."""
    width = x.shape[-1]
    ada = adaln.modulation_layer(width, 6, name="ada", dtype=self.dtype)(
        nn.silu(condition.astype(self.dtype)))
    shift1, scale1, gate1, shift2, scale2, gate2 = (
        per_token(a, self.tokens) for a in jnp.split(ada, 6, axis=-1))
    norm = dense_lib.layer_norm(dtype=self.dtype, affine=False)
    h, new_state = GatedRetention(
        self.num_heads, chunk_size=self.tokens, dtype=self.dtype,
        gate_normalizer=self.gate_normalizer, name="retention")(
            adaln.modulate(norm(x), shift1, scale1),
            per_token(condition.astype(self.dtype), self.tokens), state,
            form="chunk" if state is None else "step")
    x = x + gate1 * dense_lib.dropout(self, h, self.dropout)
    h = mlp.GeluMlp(self.hidden, dtype=self.dtype, approximate=True, name="mlp")(
        adaln.modulate(norm(x), shift2, scale2))
    x = x + gate2 * dense_lib.dropout(self, h, self.dropout)
    return (dense_lib.constrain(x, ("batch", "length", "embed")),
            None if state is None else new_state)


class ArflowBackbone(nn.Module):
  """v = backbone(x [B, n, T, D], labels [B], t [B, n]) (module docstring). The null class is
  `num_classes` (the class table has num_classes + 1 rows)."""
  num_tokens: int
  token_dim: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float
  num_classes: int
  gate_normalizer: float = 16.0
  dtype: Dtype = jnp.float32
  scan_layers: bool = False
  remat: str = "none"
  dropout: float = 0.0

  def init_state(self, batch_size: int):
    """Every layer's retention state before the first image: zeros [B, H, Dh, Dh] float32 (a
    leading layer axis when the blocks are scanned)."""
    head_dim = self.width // self.num_heads
    one = lambda: zero_state(batch_size, self.num_heads, head_dim, head_dim)
    if self.scan_layers:
      return jnp.zeros((self.depth, batch_size, self.num_heads, head_dim, head_dim), jnp.float32)
    return [one() for _ in range(self.depth)]

  @nn.compact
  def __call__(self, x, labels, t, *, state: Optional[Any] = None):
    """x [B, n, T, D], t [B, n]; `state` (from `init_state` or a previous call) makes this one
    decoding step of n = 1 image. -> (velocity [B, n, T, D] float32, new state or None)."""
    batch, n, tokens, _ = x.shape
    if tokens != self.num_tokens:
      raise ValueError(f"images of {self.num_tokens} tokens expected, got {tokens}")
    if state is not None and n != 1:
      raise ValueError(f"a decoding step (state given) takes one image, got {n}")
    width = self.width
    class_emb = nn.Embed(self.num_classes + 1, width, dtype=self.dtype, name="class_emb",
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(0.02), ("classes", "embed")))(labels)
    time_emb = TimeEmbedding(width, dtype=self.dtype, name="time_embed")(embedded_time(t))
    condition = class_emb[:, None] + time_emb  # [B, n, W]

    h = dense_lib.dense(width, ("token", "embed"), dtype=self.dtype, name="token_in")(
        x.astype(self.dtype))
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("length", "embed")), (tokens, width))
    h = (h + pos.astype(self.dtype)).reshape(batch, n * tokens, width)
    h = dense_lib.constrain(h, ("batch", "length", "embed"))
    blocks = layers.block_stack(
        ArflowBlock, depth=self.depth, scan=self.scan_layers, remat=self.remat, name="block",
        per_layer_args=1, broadcast_args=1, num_heads=self.num_heads,
        hidden=int(width * self.mlp_ratio), tokens=tokens, dtype=self.dtype,
        gate_normalizer=self.gate_normalizer, dropout=self.dropout)
    h, new_state = layers.run_block_stack(blocks, self.scan_layers, h, state, condition)
    modulation = adaln.modulation_layer(width, 2, name="final_ada", dtype=self.dtype)(
        nn.silu(condition.astype(self.dtype)))
    v = adaln.modulated_output(h, per_token(modulation, tokens), self.token_dim, name="out",
                               dtype=self.dtype)
    return v.reshape(batch, n, tokens, self.token_dim).astype(jnp.float32), new_state
