"""The transformer blocks' MLPs: SwiGLU (the causal family), timm's GELU MLP (MAR's ViT) and
GEGLU (xAR's blocks).

The hidden activations carry the logical axes ('batch', 'length', 'mlp'), so the rules table
splits them as it splits the kernels (over 'tensor' in the default table).
"""
from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from arjax.layers import dense as dense_lib

Dtype = Any
HIDDEN_AXES = ("batch", "length", "mlp")


def swiglu_hidden(width: int, mlp_ratio: float, multiple_of: int = 32) -> int:
  """2/3 of mlp_ratio * width (SwiGLU's parameter parity), rounded up so the hidden axis
  splits evenly over tensor-parallel meshes."""
  hidden = int(2 * mlp_ratio * width / 3)
  return -(-hidden // multiple_of) * multiple_of


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)) (Shazeer 2020): gated MLPs train faster per FLOP than GELU
  MLPs at an equal parameter count."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda feats, axes, name: dense_lib.dense(feats, axes, dtype=self.dtype, name=name)
    gate = dense_lib.constrain(dense(self.hidden, ("embed", "mlp"), "gate")(x), HIDDEN_AXES)
    up = dense_lib.constrain(dense(self.hidden, ("embed", "mlp"), "up")(x), HIDDEN_AXES)
    return dense(x.shape[-1], ("mlp", "embed"), "down")(nn.silu(gate) * up)


class GeluMlp(nn.Module):
  """timm `Mlp`: fc2(GELU(fc1(x))), GELU the exact erf form (`nn.GELU()`), no dropout;
  `approximate=True`: the tanh form (DiT / SiT / ARFlow's `GELU(approximate="tanh")`)."""
  hidden: int
  dtype: Dtype = jnp.float32
  approximate: bool = False

  @nn.compact
  def __call__(self, x):
    h = dense_lib.dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    h = nn.gelu(dense_lib.constrain(h, HIDDEN_AXES), approximate=self.approximate)
    return dense_lib.dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class GeGLU(nn.Module):
  """fc2(GELU(fc1_g(x)) * fc1_x(x)), GELU the exact erf form: what xAR builds as timm's
  `SwiGLU(act_layer=nn.GELU)` (so a GELU gate, not SiLU). timm's parameter names, so official
  weights map one to one; the hidden width is the caller's (xAR: int(2/3 * ratio * width),
  truncated, not rounded up as `swiglu_hidden` does)."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda feats, axes, name: dense_lib.dense(feats, axes, dtype=self.dtype, name=name)
    gate = dense_lib.constrain(dense(self.hidden, ("embed", "mlp"), "fc1_g")(x), HIDDEN_AXES)
    value = dense_lib.constrain(dense(self.hidden, ("embed", "mlp"), "fc1_x")(x), HIDDEN_AXES)
    return dense(x.shape[-1], ("mlp", "embed"), "fc2")(nn.gelu(gate, approximate=False) * value)
