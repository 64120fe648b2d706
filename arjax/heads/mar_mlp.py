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
import math
from typing import Any, Optional

import jax.numpy as jnp
import flax.linen as nn

from arjax.layers import transformer as layers
from arjax.heads.condition import fused_modulations, shared_condition

Dtype = Any


def mar_timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
  """`TimestepEmbedder.timestep_embedding` (diffloss.py): [cos | sin] of t * freqs, float32.

  t is NOT rescaled (MAR feeds the integer 0..999 timestep cast to float); cos comes first.
  Computed in float32 like the original: arguments reach ~1000 rad, so any other precision
  would move the embedding further from the reference than the f32 noise floor.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  # A scalar t (one timestep for every row) embeds as one row, broadcast by the caller.
  args = jnp.reshape(t, (-1,)).astype(jnp.float32)[:, None] * freqs[None]
  embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
  return embedding


def _modulate(x, shift, scale):
  # diffloss.py `modulate`.
  return x * (1 + scale) + shift


def _dense(features, axes, name, dtype, zero=False):
  init = layers.zeros_init if zero else layers.dense_init
  return nn.Dense(features, dtype=dtype, name=name, kernel_init=init(axes),
                  bias_init=layers.zeros_init(axes[-1:]))


def _layer_norm(name, dtype, affine: bool):
  # PyTorch LayerNorm: biased variance, eps inside the sqrt, eps=1e-6 in diffloss.py.
  return nn.LayerNorm(
      epsilon=1e-6, use_scale=affine, use_bias=affine, dtype=dtype, name=name,
      # Two-pass variance like torch (E[x^2] - E[x]^2 loses digits when |mean| >> std).
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=layers.zeros_init(("norm",)))


class _TimestepEmbedder(nn.Module):
  """diffloss.py `TimestepEmbedder`: sinusoid(256) -> Linear -> SiLU -> Linear."""
  width: int
  frequency_embedding_size: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    t_freq = mar_timestep_embedding(t, self.frequency_embedding_size).astype(self.dtype)
    h = _dense(self.width, ("time", "mlp"), "mlp_0", self.dtype)(t_freq)
    return _dense(self.width, ("mlp", "mlp_out"), "mlp_2", self.dtype)(nn.silu(h))


class _ResBlock(nn.Module):
  """diffloss.py `ResBlock`: x + gate * mlp(modulate(in_ln(x), shift, scale))."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, y, modulation=None):
    """modulation: adaLN_modulation(y) when the parent computed it (fused_modulations)."""
    width = x.shape[-1]
    if modulation is None:
      modulation = _dense(3 * width, ("mlp", "mlp_out"), "adaLN_modulation_1", self.dtype,
                          zero=True)(nn.silu(y))
    # Chunk order shift, scale, gate (adaLN_modulation(y).chunk(3, dim=-1)).
    shift, scale, gate = jnp.split(modulation, 3, axis=-1)
    h = _modulate(_layer_norm("in_ln", self.dtype, affine=True)(x), shift, scale)
    h = _dense(width, ("mlp", "mlp_out"), "mlp_0", self.dtype)(h)
    h = _dense(width, ("mlp_out", "mlp"), "mlp_2", self.dtype)(nn.silu(h))
    return x + gate * h


class _FinalLayer(nn.Module):
  """diffloss.py `FinalLayer`: linear(modulate(norm_final(x), shift, scale)), no-affine LN."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, y, modulation=None):
    width = x.shape[-1]
    if modulation is None:
      modulation = _dense(2 * width, ("mlp", "mlp_out"), "adaLN_modulation_1", self.dtype,
                          zero=True)(nn.silu(y))
    shift, scale = jnp.split(modulation, 2, axis=-1)
    h = _modulate(_layer_norm("norm_final", self.dtype, affine=False)(x), shift, scale)
    return _dense(self.out_channels, ("mlp", "token"), "linear", self.dtype, zero=True)(h)


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

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @nn.compact
  def __call__(self, x_t, t, c):
    # SimpleMLPAdaLN.forward: x = input_proj(x); y = time_embed(t) + cond_embed(c).
    h = _dense(self.model_channels, ("token", "mlp"), "input_proj", self.dtype)(
        x_t.astype(self.dtype))
    time_embed = _TimestepEmbedder(self.model_channels, self.frequency_embedding_size,
                                   self.dtype, name="time_embed")
    t = jnp.asarray(t)
    if (self.num_timesteps is not None and t.ndim == 1
        and jnp.issubdtype(t.dtype, jnp.integer) and t.shape[0] > self.num_timesteps):
      t_emb = jnp.take(time_embed(jnp.arange(self.num_timesteps)), t, axis=0)
    else:
      t_emb = time_embed(t)
    c_emb = _dense(self.model_channels, ("embed", "mlp_out"), "cond_embed", self.dtype)(
        c.astype(self.dtype))
    y = t_emb + shared_condition(c_emb, h.shape[0])
    owners = [f"res_blocks_{i}" for i in range(self.num_res_blocks)] + ["final_layer"]
    modulations = [None] * len(owners)
    if not self.is_initializing():  # init creates each block's own Dense
      modulations = fused_modulations(
          nn.meta.unbox(self.variables["params"]),
          [(owner, "adaLN_modulation_1") for owner in owners], nn.silu(y), self.dtype)
    for i in range(self.num_res_blocks):
      h = _ResBlock(self.dtype, name=owners[i])(h, y, modulations[i])
    out = _FinalLayer(self.out_channels, self.dtype, name="final_layer")(h, y, modulations[-1])
    return out.astype(jnp.float32)
