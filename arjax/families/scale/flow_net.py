"""FlowAR's per-scale flow network: a small Transformer over all tokens of one scale at once,
its AdaLN spatially adaptive (modulated per position by that position's backbone output).

    c_j = time_mlp(t) + cond_proj(z_j)           one condition per token j of the scale
    h = input_proj(x_t)                          x_t [B, n, D]: the whole scale, noised at t
    h = h + g1_j * attn(norm(h) (1 + s1_j) + b1_j)     bidirectional over the scale's n tokens
    h = h + g2_j * mlp(norm(h) (1 + s2_j) + b2_j)      (g, s, b)_j = ada(SiLU(c_j)), zero-started
    v = out(norm(h) (1 + s_j) + b_j)             a velocity for every token, zero-started

Unlike the registry's per-token head (`head.name='flow'` alone: each token drawn on its own
given its z), the tokens of a scale are drawn jointly: the ODE moves all of them together and
the attention lets each see where the others are going. `model.flow_net='scale'` selects it;
it keeps the registry head's algorithm (arjax.heads.flow.FlowMatching: time convention,
logit-normal times, Euler/Heun, CFG) and its width/depth/dropout fields (config.head).

The net is called through the head contract's flat rows (`rows_net`): x_t [N, D] with
N = images x n, image-major, as `FlowMatching.sample` hands them, reshaped to [N / n, n, D].
"""
from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from arjax.layers import adaln, attention, dense as dense_lib, mlp

Dtype = Any


class ScaleFlowBlock(nn.Module):
  num_heads: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0

  @nn.compact
  def __call__(self, h, c):
    width = h.shape[-1]
    ada = adaln.modulation_layer(width, 6, name="modulation", dtype=self.dtype)(nn.silu(c))
    g1, g2, s1, s2, b1, b2 = jnp.split(ada, 6, axis=-1)
    norm = dense_lib.layer_norm(dtype=self.dtype, affine=False)
    a, _ = attention.Attention(self.num_heads, mask="bidirectional", dtype=self.dtype,
                               key_bias=False, name="attn")(adaln.modulate(norm(h), b1, s1))
    h = h + g1 * dense_lib.dropout(self, a, self.dropout)
    m = mlp.SwiGLU(mlp.swiglu_hidden(width, 2.0), dtype=self.dtype, name="mlp")(
        adaln.modulate(norm(h), b2, s2))
    return h + g2 * dense_lib.dropout(self, m, self.dropout)


class ScaleFlowNet(nn.Module):
  """v = net(x_t [B, n, D], t [B] or scalar, z [B, n, W]) (module docstring)."""
  token_dim: int
  width: int
  depth: int
  num_heads: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x_t, t, z):
    # The rules table does not constrain this net's activations (its inputs' shardings
    # propagate). With them, on data 2 x fsdp 2 x tensor 2 the step's gradients came out wrong
    # (AdaLN modulation up to 75% off, loss 7.5e-5; every other mesh agreed to 1e-6), and
    # they agree once the q/k/v and MLP-hidden constraints are gone: a constraint cannot
    # change values, so XLA's partitioning of this program (jax 0.10.2, CPU) is at fault.
    # `benchmarks/sharded_gradients.py` measures it; tests/test_scale.py pins the fix.
    with nn.logical_axis_rules(()):
      return self._velocity(x_t, t, z)

  def _velocity(self, x_t, t, z):
    dense = lambda feats, axes, name: dense_lib.dense(feats, axes, dtype=self.dtype, name=name)
    t_emb = adaln.timestep_embedding(t, 256, time_scale=1000.0).astype(self.dtype)
    t_emb = dense(self.width, ("mlp", "mlp_out"), "time_mlp2")(
        nn.silu(dense(self.width, ("time", "mlp"), "time_mlp1")(t_emb)))  # [B or 1, Wh]
    h = dense(self.width, ("token", "mlp"), "input_proj")(x_t.astype(self.dtype))
    c = t_emb[:, None] + dense(self.width, ("embed", "mlp_out"), "cond_proj")(
        z.astype(self.dtype))
    for i in range(self.depth):
      h = ScaleFlowBlock(self.num_heads, dtype=self.dtype, dropout=self.dropout,
                         name=f"block_{i}")(h, c)
    modulation = adaln.modulation_layer(self.width, 2, name="final_modulation",
                                        dtype=self.dtype)(nn.silu(c))
    v = adaln.modulated_output(h, modulation, self.token_dim, name="output", dtype=self.dtype)
    return v.astype(jnp.float32)

  def rows(self, x_t, t, z, tokens_per_image: int):
    """The head contract's flat call: x_t [N, D], z [N, W], N = images x tokens_per_image."""
    n = tokens_per_image
    v = self(x_t.reshape(-1, n, x_t.shape[-1]), t, z.reshape(-1, n, z.shape[-1]))
    return v.reshape(-1, v.shape[-1])
