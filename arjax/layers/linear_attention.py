"""Gated linear attention: a causal token mixer of linear cost with a constant-size state.

Per head, with a data-dependent scalar decay g_t = exp(a_t) in (0, 1] (a_t = log-sigmoid of a
learned projection, Mamba-2 / RetNet-style "scalar gate"):

    S_t = g_t S_{t-1} + k_t^T v_t          S: [d_k, d_v], the whole memory of tokens <= t
    o_t = q_t S_t                          (token t sees itself and every earlier token)

Two forms compute the same numbers:

  recurrent    `recurrent_step` / `recurrent`: one token at a time, the state in the carry; a
               decoder's step (constant memory, no KV cache).
  chunk-parallel `chunk_parallel`: `lax.scan` over chunks of C tokens; inside a chunk the
               output is an attention-like [C, C] product with the decays as a causal mask,
               plus q_i times the state that entered the chunk. Matmuls of C rows instead of
               a loop over tokens: the training form.

Decays are applied as exp(b_i - b_j) of cumulative log-gates b (j <= i), so every factor is
<= 1 and nothing overflows whatever the chunk length; the state is float32 whatever the
compute dtype. A call may start from a given state and returns the state after its last token,
so a sequence fed in pieces (a next-scale sampler: one scale per call) gives the numbers of one
call over the whole sequence.

`GatedLinearAttention` is the module around them: q/k/v projections ([D, H, Dh] kernels with
the logical axes of `arjax.layers.attention`), the gate projection, a per-head RMS norm of the
output (GLA / RetNet's group norm, which keeps the output's scale independent of how much the
state has accumulated) and the output projection. q and k are L2-normalised per head (a
bounded q.k, as in the recurrent-backbone literature), q also scaled by Dh^-0.5.
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from arjax.layers import dense as dense_lib

Dtype = Any
State = jax.Array  # [B, H, Dk, Dv] float32


def zero_state(batch: int, num_heads: int, key_dim: int, value_dim: int) -> State:
  return jnp.zeros((batch, num_heads, key_dim, value_dim), jnp.float32)


def recurrent_step(q, k, v, log_g, state: State):
  """One token: q, k [B, H, Dk], v [B, H, Dv], log_g [B, H] (<= 0) -> (o [B, H, Dv], state)."""
  f32 = lambda a: a.astype(jnp.float32)
  state = (jnp.exp(f32(log_g))[..., None, None] * state
           + jnp.einsum("bhk,bhv->bhkv", f32(k), f32(v)))
  return jnp.einsum("bhk,bhkv->bhv", f32(q), state), state


def recurrent(q, k, v, log_g, state: State):
  """`recurrent_step` over T tokens (q, k [B, T, H, Dk], v [B, T, H, Dv], log_g [B, T, H])
  -> (o [B, T, H, Dv] float32, state after the last token)."""
  def step(s, inputs):
    o, s = recurrent_step(*inputs, s)
    return s, o
  moved = [jnp.moveaxis(a, 1, 0) for a in (q, k, v, log_g)]
  state, o = jax.lax.scan(step, state, moved)
  return jnp.moveaxis(o, 0, 1), state


def chunk_parallel(q, k, v, log_g, state: State, chunk_size: int = 64):
  """The same as `recurrent`, chunk by chunk (see the module docstring). T need not divide
  into chunks: the tail is padded with k = v = 0 and log_g = 0, which leave the state as it is.
  """
  batch, length = q.shape[:2]
  c = max(1, min(chunk_size, length))
  pad = (-length) % c
  f32 = lambda a: a.astype(jnp.float32)
  q, k, v, log_g = (jnp.pad(f32(a), [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
                    for a in (q, k, v, log_g))
  chunks = lambda a: jnp.moveaxis(a.reshape((batch, -1, c) + a.shape[2:]), 1, 0)
  causal = jnp.tril(jnp.ones((c, c), bool))

  def one_chunk(s, inputs):
    qc, kc, vc, ac = inputs                    # [B, C, H, .], ac [B, C, H]
    b = jnp.cumsum(ac, axis=1)                 # b_i = sum_{j <= i} a_j  (<= 0, decreasing)
    diff = b[:, :, None, :] - b[:, None, :, :]  # [B, i, j, H]: b_i - b_j
    decay = jnp.exp(jnp.where(causal[None, :, :, None], diff, -jnp.inf))
    scores = jnp.einsum("bihd,bjhd->bijh", qc, kc) * decay
    o = (jnp.einsum("bijh,bjhv->bihv", scores, vc)
         + jnp.einsum("bihd,bhdv->bihv", qc * jnp.exp(b)[..., None], s))
    last = b[:, -1]                            # [B, H]
    to_end = jnp.exp(last[:, None] - b)        # decay from token j to the chunk's end
    s = (jnp.exp(last)[..., None, None] * s
         + jnp.einsum("bjhd,bjhv->bhdv", kc * to_end[..., None], vc))
    return s, o

  state, o = jax.lax.scan(one_chunk, state, [chunks(a) for a in (q, k, v, log_g)])
  o = jnp.moveaxis(o, 0, 1).reshape((batch, -1) + o.shape[3:])
  return o[:, :length], state


class GatedLinearAttention(nn.Module):
  """x [B, T, D] -> (out [B, T, D], state after the last token); causal over T.

  `state` [B, H, Dh, Dh]: the memory of the tokens before this call (None: nothing before).
  `form`: 'chunk' (chunk_parallel) or 'recurrent' (a scan over tokens): the same numbers.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  chunk_size: int = 64
  # Initial bias of the gate's pre-activation: sigmoid(3) = 0.95, a memory of ~20 tokens at
  # the start of training that the gate then learns to lengthen or shorten.
  gate_bias: float = 3.0
  out_name: str = "out"

  @nn.compact
  def __call__(self, x, state: Optional[State] = None, form: str = "chunk"):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    proj = lambda name: dense_lib.dense_general(
        (self.num_heads, head_dim), ("embed", "heads", "kv"), dtype=self.dtype, name=name)
    qkv_axes = ("batch", "length", "heads", "kv")
    q, k, v = (dense_lib.constrain(proj(name)(x), qkv_axes) for name in ("query", "key", "value"))
    unit = lambda a: a * jax.lax.rsqrt(jnp.sum(jnp.square(a.astype(jnp.float32)), -1,
                                               keepdims=True) + 1e-6)
    q, k = unit(q) * head_dim ** -0.5, unit(k)
    gate = nn.Dense(self.num_heads, dtype=self.dtype, name="gate",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                             ("embed", "heads")),
                    bias_init=nn.with_logical_partitioning(
                        nn.initializers.constant(self.gate_bias), ("heads",)))(x)
    log_g = jax.nn.log_sigmoid(gate.astype(jnp.float32))
    if state is None:
      state = zero_state(x.shape[0], self.num_heads, head_dim, head_dim)
    if form == "chunk":
      o, state = chunk_parallel(q, k, v, log_g, state, self.chunk_size)
    elif form == "recurrent":
      o, state = recurrent(q, k, v, log_g, state)
    else:
      raise ValueError(f"form={form!r}: 'chunk' or 'recurrent'")
    o = dense_lib.RMSNorm(dtype=self.dtype, name="out_norm")(o.astype(self.dtype))
    out = dense_lib.dense_general(width, ("heads", "kv", "embed"), dtype=self.dtype,
                                  name=self.out_name, axis=(-2, -1))(o)
    return out, state
