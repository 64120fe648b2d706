"""The pieces of every per-token head's network: timestep embedding, AdaLN residual block, and
the modulated output layer (MAR's SimpleMLPAdaLN, which the flow head follows too).

A head's condition c = embed(t) + proj(z) modulates each block's LayerNorm: the block computes
(shift, scale, gate) = modulation(SiLU(c)) and returns x + gate * mlp(norm(x) * (1 + scale) +
shift). The modulation and output layers start at zero, so an untrained head outputs 0 and
every block is the identity: training starts from a calm point.

The parameter names are the caller's (`AdaLNNames`): the flow head and MAR's golden-matched
head hold the same layers under the names their checkpoints (and MAR's state_dict) use.
"""
import dataclasses
import math
from typing import Any, Optional

import jax.numpy as jnp
import flax.linen as nn

from arjax.layers import dense as dense_lib

Dtype = Any


def timestep_embedding(t, dim: int, *, time_scale: float = 1.0, max_period: float = 10000.0):
  """[cos | sin] of (time_scale * t) * freqs, float32; one row per t (a scalar t is one row,
  broadcast by the caller), a zero column appended when `dim` is odd.

  MAR feeds its DDPM step 0..999 as is (time_scale 1); the flow head's t in [0, 1] is scaled by
  1000 to the same range. Float32 always: the arguments reach ~1000 rad.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (time_scale * jnp.reshape(t, (-1,)).astype(jnp.float32))[:, None] * freqs[None]
  embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
  return embedding


def modulate(x, shift, scale):
  return x * (1 + scale) + shift


@dataclasses.dataclass(frozen=True)
class AdaLNNames:
  """Parameter names of an AdaLN block: its modulation, the MLP's two layers, and its
  LayerNorm (None: a norm without affine parameters, which has none to name)."""
  modulation: str = "modulation"
  fc1: str = "fc1"
  fc2: str = "fc2"
  norm: Optional[str] = None


class AdaLNResBlock(nn.Module):
  """x + gate * fc2(SiLU(fc1(modulate(norm(x), shift, scale)))), modulated by c."""
  names: AdaLNNames = AdaLNNames()
  # The LayerNorm's variance in one pass (flax's default) or two (torch's; see dense.layer_norm).
  fast_variance: bool = True
  dtype: Dtype = jnp.float32
  # Dropout of the branch before its gate, in training only.
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, c, modulation=None):
    """modulation: this block's modulation(SiLU(c)) when the net computed every block's at once
    (`arjax.heads.condition.fused_modulations`); else the block computes it."""
    width = x.shape[-1]
    names = self.names
    if modulation is None:
      modulation = modulation_layer(width, 3, name=names.modulation, dtype=self.dtype)(
          nn.silu(c))
    shift, scale, gate = jnp.split(modulation, 3, axis=-1)
    norm = dense_lib.layer_norm(dtype=self.dtype, affine=names.norm is not None,
                                fast_variance=self.fast_variance, name=names.norm)
    h = modulate(norm(x), shift, scale)
    h = dense_lib.dense(width, ("mlp", "mlp_out"), dtype=self.dtype, name=names.fc1)(h)
    h = dense_lib.dense(width, ("mlp_out", "mlp"), dtype=self.dtype, name=names.fc2)(nn.silu(h))
    return x + gate * dense_lib.dropout(self, h, self.dropout)


def modulated_output(x, modulation, features: int, *, name: str, dtype: Dtype,
                     fast_variance: bool = True, norm_name: Optional[str] = None):
  """The heads' last layer, out(modulate(norm(x), shift, scale)) with (shift, scale) =
  `modulation` and a norm without affine parameters; `out` starts at zero.

  A function, not a module: called inside a module's compact method, its layers belong to that
  module (the flow head keeps them at its top level, MAR's head in its `final_layer`).
  """
  shift, scale = jnp.split(modulation, 2, axis=-1)
  norm = dense_lib.layer_norm(dtype=dtype, affine=False, fast_variance=fast_variance,
                              name=norm_name)
  h = modulate(norm(x), shift, scale)
  return dense_lib.dense(features, ("mlp", "token"), dtype=dtype, name=name, zero=True)(h)


def modulation_layer(width: int, chunks: int, *, name: str, dtype: Dtype) -> nn.Dense:
  """The zero-started Dense that maps SiLU(c) to `chunks` modulation vectors of `width`."""
  return dense_lib.dense(chunks * width, ("mlp", "mlp_out"), dtype=dtype, name=name, zero=True)
