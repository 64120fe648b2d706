"""Dense layers and norms with logical axis names: the one factory every module builds them with.

Every parameter is created through `nn.with_logical_partitioning`, so the one rules table in the
config (`config.sharding.rules`, see `arjax.parallel.sharding`) decides how it is sharded. A
kernel's axes are (in, out): e.g. ('embed', 'mlp') for an MLP's first layer; its bias takes the
out axis.
"""
import math
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any
Axes = Tuple[Optional[str], ...]


def dense_init(axes: Axes, scale: float = 1.0):
  """Fan-in scaled truncated normal, tagged with logical axis names."""
  init = nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
  return nn.with_logical_partitioning(init, axes)


def zeros_init(axes: Axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones_init(axes: Axes):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def dense(features: int, axes: Axes, *, dtype: Dtype, name: Optional[str] = None,
          zero: bool = False, use_bias: bool = True) -> nn.Dense:
  """nn.Dense with kernel axes `axes` (in, out) and bias axis `axes[-1]`; `zero` starts the
  kernel at zero (AdaLN modulations and output layers, so an untrained net is calm)."""
  kernel_init = zeros_init(axes) if zero else dense_init(axes)
  return nn.Dense(features, dtype=dtype, name=name, use_bias=use_bias, kernel_init=kernel_init,
                  bias_init=zeros_init(axes[-1:]))


def dense_general(features, axes: Axes, *, dtype: Dtype, name: str, axis=-1,
                  use_bias: bool = True) -> "DenseGeneral":
  """A dense layer over `axis` to `features` (an int or a tuple, e.g. (heads, head_dim));
  `axes` names the kernel's input then output dimensions, the bias takes the output ones."""
  return DenseGeneral(features, axes, axis=axis, use_bias=use_bias, dtype=dtype, name=name)


def _flat_fan_in_init(axes: Axes, num_inputs: int):
  """The fan-in init of the kernel flattened to 2-D (inputs x outputs), reshaped to its own
  shape, tagged with `axes`: the fan-in is all input dims together, not the second-last one."""
  init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

  def kernel_init(rng, shape, dtype=jnp.float32):
    flat = (math.prod(shape[:num_inputs]), math.prod(shape[num_inputs:]))
    return jnp.reshape(init(rng, flat, dtype), shape)
  return nn.with_logical_partitioning(kernel_init, axes)


class DenseGeneral(nn.Module):
  """flax's nn.DenseGeneral (the same parameters, init and numbers) with its kernel and bias
  created in their own shapes.

  nn.DenseGeneral makes them flat and reshapes the boxed value; once logical axis rules are
  active (`arjax.parallel.sharding.activation_rules`) unboxing the flat value applies the N-D
  names to a 2-D array, which fails: the rules could not reach activations with it.
  """
  features: Union[int, Tuple[int, ...]]
  axes: Axes
  axis: Union[int, Tuple[int, ...]] = -1
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(a % x.ndim for a in axis)
    kernel = self.param("kernel", _flat_fan_in_init(self.axes, len(axis)),
                        tuple(x.shape[a] for a in axis) + features, jnp.float32)
    bias = (self.param("bias", zeros_init(self.axes[-len(features):]), features, jnp.float32)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(len(axis)))), ((), ())))
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - len(features)) + features)
    return y


def layer_norm(*, dtype: Dtype, eps: float = 1e-6, affine: bool = True,
               fast_variance: bool = True, name: Optional[str] = None) -> nn.LayerNorm:
  """LayerNorm (PyTorch's: biased variance, eps inside the sqrt), affine parameters on 'norm'.

  fast_variance=False computes the variance in two passes like torch: E[x^2] - E[x]^2 loses
  digits when |mean| >> std, which the golden-matched MAR head cannot afford.
  """
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name, use_scale=affine, use_bias=affine,
                      use_fast_variance=fast_variance, scale_init=ones_init(("norm",)),
                      bias_init=zeros_init(("norm",)))


class RMSNorm(nn.Module):
  """Root-mean-square norm, computed in float32 whatever the compute dtype. `use_scale=False`:
  no parameter at all (xAR's AdaLN blocks, where the modulation does the scaling)."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  use_scale: bool = True

  @nn.compact
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    if self.use_scale:
      x32 = x32 * self.param("scale", ones_init(("norm",)), (x.shape[-1],), jnp.float32)
    return x32.astype(self.dtype)


# The rng collection dropout draws from. A loss passes it (`rngs={DROPOUT_RNG: key}`) and
# dropout applies; init and the samplers do not, and every dropout is the identity there.
DROPOUT_RNG = "dropout"
_DROPOUT_STREAM = 0xD50


def dropout_rngs(rng) -> dict:
  """A loss's `rngs` for apply: dropout draws from its own stream of the step's key, so it
  changes no other draw (and nothing at all when every rate is 0)."""
  return {DROPOUT_RNG: jax.random.fold_in(rng, _DROPOUT_STREAM)}


def dropout(module: nn.Module, x, rate: float):
  """Dropout of `x` at `rate` inside `module`'s compact method, while the apply call carries a
  DROPOUT_RNG key (training); the identity otherwise, and always at rate 0 (no module made, so
  a config without dropout has exactly the numbers it had before dropout existed)."""
  if not rate:
    return x
  return nn.Dropout(rate, deterministic=not module.has_rng(DROPOUT_RNG))(x)


def constrain(x, axes: Sequence[Optional[str]]):
  """`nn.with_logical_constraint`: shards activation `x` as the rules table says for `axes`
  (inside `arjax.parallel.sharding.activation_rules`; elsewhere it returns x unchanged)."""
  return nn.with_logical_constraint(x, tuple(axes))
