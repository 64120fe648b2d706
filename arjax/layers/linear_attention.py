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


# ----------------------------------------------------------------------------------------------
# Gated retention over chunks (ARFlow's token mixer): softmax inside a chunk, a state across.
#
# The sequence is cut into chunks of C tokens (ARFlow: one image each). Inside a chunk every
# token attends to every token of its chunk with softmax attention (bidirectional); across
# chunks a state S carries everything before the chunk, read with the token's decay within the
# chunk and written once per chunk:
#
#     o_i  = softmax(q_i K_c^T) V_c + (q_i exp(b_i)) S_c          b_i = sum_{j <= i in c} a_j
#     S_{c+1} = exp(mean_{j in c} a_j) S_c + K_c^T V_c            S_0: the state given
#
# with a_j <= 0 the log-gates. Two forms: `chunk_retention` computes every chunk's entering
# state at once from cumulative decays (the training form, matmuls over chunks) and
# `retention_step` one chunk from the state it is given (the sampler's step: only [H, Dk, Dv]
# is kept between chunks). The two agree to float32 rounding (tests/test_arflow.py).


def _inner_softmax(q, k, v):
  """Bidirectional softmax attention within each chunk: q, k [..., C, H, Dk], v [..., C, H, Dv]
  (k carries the logit scale) -> [..., C, H, Dv] float32."""
  logits = jnp.einsum("...ihd,...jhd->...hij", q, k)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("...hij,...jhv->...ihv", probs, v)


def retention_step(q, k, v, log_g, state: State):
  """One chunk: q, k [B, C, H, Dk], v [B, C, H, Dv], log_g [B, C, H] (<= 0), state entering
  the chunk -> (o [B, C, H, Dv] float32, state after the chunk)."""
  q, k, v, log_g = (a.astype(jnp.float32) for a in (q, k, v, log_g))
  b = jnp.cumsum(log_g, axis=1)
  cross = jnp.einsum("bihd,bhdv->bihv", q * jnp.exp(b)[..., None], state)
  o = _inner_softmax(q, k, v) + cross
  decay = jnp.exp(jnp.mean(log_g, axis=1))  # [B, H]
  state = decay[..., None, None] * state + jnp.einsum("bjhd,bjhv->bhdv", k, v)
  return o, state


def chunk_retention(q, k, v, log_g, state: State, chunk_size: int):
  """`retention_step` over L / chunk_size chunks at once (L a multiple of chunk_size):
  q, k [B, L, H, Dk], v [B, L, H, Dv], log_g [B, L, H] -> (o [B, L, H, Dv] float32, state
  after the last chunk).

  Chunk c enters with S_c = exp(A_{c-1}) S_0 + sum_{j < c} exp(A_{c-1} - A_j) K_j^T V_j, A_c
  the cumulative sum of the chunks' mean log-gates up to c: every factor <= 1."""
  batch, length = q.shape[:2]
  if length % chunk_size:
    raise ValueError(f"{length} tokens are not whole chunks of {chunk_size}")
  q, k, v, log_g = (a.astype(jnp.float32) for a in (q, k, v, log_g))
  chunks = lambda a: a.reshape((batch, length // chunk_size, chunk_size) + a.shape[2:])
  q, k, v, log_g = (chunks(a) for a in (q, k, v, log_g))  # [B, N, C, ...]
  kv = jnp.einsum("bnjhd,bnjhv->bnhdv", k, v)
  per_chunk = jnp.mean(log_g, axis=2)               # [B, N, H]
  cum = jnp.cumsum(per_chunk, axis=1)               # A_c
  before = cum - per_chunk                          # A_{c-1}
  n = cum.shape[1]
  earlier = jnp.tril(jnp.ones((n, n), bool), -1)    # j < c
  weights = jnp.exp(jnp.where(earlier[None, :, :, None],
                              before[:, :, None, :] - cum[:, None, :, :], -jnp.inf))
  states = (jnp.exp(before)[..., None, None] * state[:, None]
            + jnp.einsum("bcjh,bjhdv->bchdv", weights, kv))  # S_c entering chunk c
  b = jnp.cumsum(log_g, axis=2)
  cross = jnp.einsum("bnihd,bnhdv->bnihv", q * jnp.exp(b)[..., None], states)
  o = _inner_softmax(q, k, v) + cross
  last = cum[:, -1]
  final = (jnp.exp(last)[..., None, None] * state
           + jnp.einsum("bjh,bjhdv->bhdv", jnp.exp(last[:, None] - cum), kv))
  return o.reshape((batch, length) + o.shape[3:]), final


def _rms(a, axes, eps: float = 1e-6):
  """a / rms(a) over `axes`, no parameter, float32."""
  a = a.astype(jnp.float32)
  return a * jax.lax.rsqrt(jnp.mean(jnp.square(a), axis=axes, keepdims=True) + eps)


class GatedRetention(nn.Module):
  """ARFlow's GateRetention: x [B, L, D] and the condition per token c [B, L, D] -> (out
  [B, L, D], state after the last chunk). Chunks of `chunk_size` tokens (one image).

  q, k, v = RMSNorm(proj(x)) over the width (no parameter), k scaled by Dh^-0.5; the log-gate
  a = log_sigmoid(gate(x + c)) / gate_normalizer, one per token and head; the mixed o is
  RMS-normalised per head, gated by SiLU(g_proj(x)) (SwiGLU) and projected out. `form`:
  'chunk' (`chunk_retention`, any number of chunks) or 'step' (`retention_step`, x one chunk).
  """
  num_heads: int
  chunk_size: int
  dtype: Dtype = jnp.float32
  gate_normalizer: float = 16.0

  @nn.compact
  def __call__(self, x, c, state: Optional[State] = None, form: str = "chunk"):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    proj = lambda name: dense_lib.dense_general(
        (self.num_heads, head_dim), ("embed", "heads", "kv"), dtype=self.dtype, name=name,
        use_bias=False)
    qkv_axes = ("batch", "length", "heads", "kv")
    q, k, v = (dense_lib.constrain(_rms(proj(name)(x), (-2, -1)), qkv_axes)
               for name in ("query", "key", "value"))
    k = k * head_dim ** -0.5
    gate = nn.Dense(self.num_heads, dtype=self.dtype, use_bias=False, name="gate",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                             ("embed", "heads")))(x + c)
    log_g = jax.nn.log_sigmoid(gate.astype(jnp.float32)) / self.gate_normalizer
    if state is None:
      state = zero_state(x.shape[0], self.num_heads, head_dim, head_dim)
    if form == "chunk":
      o, state = chunk_retention(q, k, v, log_g, state, self.chunk_size)
    elif form == "step":
      if x.shape[1] != self.chunk_size:
        raise ValueError(f"form='step' takes one chunk of {self.chunk_size} tokens, got "
                         f"{x.shape[1]}")
      o, state = retention_step(q, k, v, log_g, state)
    else:
      raise ValueError(f"form={form!r}: 'chunk' or 'step'")
    o = _rms(o, -1).astype(self.dtype)
    o = nn.silu(proj("swish_gate")(x)) * o
    out = dense_lib.dense_general(width, ("heads", "kv", "embed"), dtype=self.dtype,
                                  name="out", axis=(-2, -1), use_bias=False)(o)
    return out, state
