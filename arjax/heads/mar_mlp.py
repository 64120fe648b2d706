"""MAR's DiffLoss network `SimpleMLPAdaLN`, ported exactly to Flax.

Source: github.com/LTH14/mar, models/diffloss.py (`TimestepEmbedder`, `ResBlock`,
`FinalLayer`, `SimpleMLPAdaLN`). The submodule names mirror the PyTorch module tree
(`nn.Sequential` index `k` -> `_k`) so `arjax.heads.mar_mlp_weights` maps state_dict names to
this tree mechanically:

    time_embed.mlp.{0,2}            -> time_embed/mlp_{0,2}
    cond_embed, input_proj          -> cond_embed, input_proj
    res_blocks.i.{in_ln, mlp.0, mlp.2, adaLN_modulation.1}
                                    -> res_blocks_i/{in_ln, mlp_0, mlp_2, adaLN_modulation_1}
    final_layer.{linear, adaLN_modulation.1} -> final_layer/{linear, adaLN_modulation_1}

Unlike `FlowHeadNet`, t here is the DDPM timestep on the original 0..999 scale exactly as
MAR's `_WrappedModel` passes it (no 1000x scaling inside), and the output has 2*C channels
when `learn_sigma`: [:, :C] = predicted eps, [:, C:] = the LEARNED_RANGE interpolation v.
Initialisation follows MAR's `initialize_weights`: zero adaLN modulation and final linear,
so an untrained head predicts eps = 0 and v = 0.
"""
from typing import Any, Optional

import jax.numpy as jnp
import flax.linen as nn

from arjax.layers import adaln, dense as dense_lib
from arjax.heads.condition import fused_modulations, shared_condition

Dtype = Any


def mar_timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
  """`TimestepEmbedder.timestep_embedding` (diffloss.py): [cos | sin] of t * freqs, float32.

  t is NOT rescaled (MAR feeds the integer 0..999 timestep cast to float); cos comes first.
  """
  return adaln.timestep_embedding(t, dim, max_period=max_period)


class _TimestepEmbedder(nn.Module):
  """diffloss.py `TimestepEmbedder`: sinusoid(256) -> Linear -> SiLU -> Linear."""
  width: int
  frequency_embedding_size: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    t_freq = mar_timestep_embedding(t, self.frequency_embedding_size).astype(self.dtype)
    dense = lambda axes, name: dense_lib.dense(self.width, axes, dtype=self.dtype, name=name)
    return dense(("mlp", "mlp_out"), "mlp_2")(nn.silu(dense(("time", "mlp"), "mlp_0")(t_freq)))


# diffloss.py `ResBlock`: adaLN_modulation = Sequential(SiLU, Linear) -> `adaLN_modulation_1`;
# mlp = Sequential(Linear, SiLU, Linear) -> `mlp_0`, `mlp_2`; torch's two-pass LayerNorm.
_RES_BLOCK_NAMES = adaln.AdaLNNames(modulation="adaLN_modulation_1", fc1="mlp_0", fc2="mlp_2",
                                    norm="in_ln")


class _FinalLayer(nn.Module):
  """diffloss.py `FinalLayer`: linear(modulate(norm_final(x), shift, scale)), no-affine LN."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, y, modulation=None):
    if modulation is None:
      modulation = adaln.modulation_layer(x.shape[-1], 2, name="adaLN_modulation_1",
                                          dtype=self.dtype)(nn.silu(y))
    return adaln.modulated_output(x, modulation, self.out_channels, name="linear",
                                  dtype=self.dtype, fast_variance=False, norm_name="norm_final")


class MarMLPAdaLN(nn.Module):
  """`SimpleMLPAdaLN(in_channels, model_channels, out_channels, z_channels, num_res_blocks)`.

  `__call__(x_t [N, C], t [N] (0..999 timestep, int or float), c [N or N/k, z_channels])`
  -> [N, 2C] if `learn_sigma` else [N, C], float32. t may be a scalar shared by every row (a
  sampling step): the time embedder then runs on one row, broadcast, with the same numbers.
  c may hold one row per k consecutive rows of x_t (`heads.condition.shared_condition`).

  With `num_timesteps` T set, integer per-row timesteps in 0..T-1 and more than T rows (a
  training batch: 8192 rows for T = 1000 in the MAR CPU preset), the time embedder runs on
  the T timesteps once and each row takes its row of that table: the same per-row numbers,
  at T/N of the time MLP's work, forward and backward.
  """
  in_channels: int             # C, MAR's token_embed_dim
  model_channels: int          # MAR's diffloss_w
  z_channels: int              # MAR's decoder_embed_dim
  num_res_blocks: int          # MAR's diffloss_d
  learn_sigma: bool = True     # DiffLoss builds out_channels = 2 * C (LEARNED_RANGE variance)
  frequency_embedding_size: int = 256
  dtype: Dtype = jnp.float32
  num_timesteps: Optional[int] = None  # integer timesteps' table size (see the docstring)
  dropout: float = 0.0  # in the residual blocks, training only (MAR's head has none)

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @nn.compact
  def __call__(self, x_t, t, c):
    # SimpleMLPAdaLN.forward: x = input_proj(x); y = time_embed(t) + cond_embed(c).
    h = dense_lib.dense(self.model_channels, ("token", "mlp"), dtype=self.dtype,
                        name="input_proj")(x_t.astype(self.dtype))
    time_embed = _TimestepEmbedder(self.model_channels, self.frequency_embedding_size,
                                   self.dtype, name="time_embed")
    t = jnp.asarray(t)
    if (self.num_timesteps is not None and t.ndim == 1
        and jnp.issubdtype(t.dtype, jnp.integer) and t.shape[0] > self.num_timesteps):
      t_emb = jnp.take(time_embed(jnp.arange(self.num_timesteps)), t, axis=0)
    else:
      t_emb = time_embed(t)
    c_emb = dense_lib.dense(self.model_channels, ("embed", "mlp_out"), dtype=self.dtype,
                            name="cond_embed")(c.astype(self.dtype))
    y = t_emb + shared_condition(c_emb, h.shape[0])
    owners = [f"res_blocks_{i}" for i in range(self.num_res_blocks)] + ["final_layer"]
    modulations = [None] * len(owners)
    if not self.is_initializing():  # init creates each block's own Dense
      modulations = fused_modulations(
          nn.meta.unbox(self.variables["params"]),
          [(owner, "adaLN_modulation_1") for owner in owners], nn.silu(y), self.dtype)
    for i in range(self.num_res_blocks):
      h = adaln.AdaLNResBlock(_RES_BLOCK_NAMES, fast_variance=False, dtype=self.dtype,
                              dropout=self.dropout, name=owners[i])(h, y, modulations[i])
    out = _FinalLayer(self.out_channels, self.dtype, name="final_layer")(h, y, modulations[-1])
    return out.astype(jnp.float32)
