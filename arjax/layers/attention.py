"""Multi-head softmax attention: the one attention module of every family.

Which keys a query sees is the attention's `mask` kind, judged on query and key *positions*:

    'causal'             key <= query                  raster AR (and its KV-cached decoding)
    'bidirectional'      every key                     MAR's encoder and decoder
    BlockCausal(sizes)   block(key) <= block(query)    next-scale / next-X: a token sees its own
                                                       block and every earlier one; static sizes

and, with any kind, a padding mask per row, `key_mask` [B, S] (True = a real key), which hides
padded keys from every query. Optional: a KV cache (`cache`, `index`), rotary position
embeddings on one or two axes (`rope`, `arjax.layers.rope`), and a subset of rows as queries
(`queries`: the outputs of a few rows, every row still a key and value).

The KV cache is a plain pytree `{'k': [B, S, H, Dh], 'v': [B, S, H, Dh]}` per layer that
callers pass in and get back: the module holds no hidden state. A call with `cache` writes its
n rows' keys and values at positions [index, index + n) and attends over all S positions the
mask allows (positions not yet written are masked by 'causal' and 'block-causal' alike).

Logits and softmax are float32 whatever the compute dtype. Queries, keys and values carry the
logical axes ('batch', 'length', 'heads', 'kv'), so the rules table shards them (heads over
'tensor' in the default table) once `arjax.parallel.sharding.activation_rules` is active.
"""
import dataclasses
from typing import Any, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from arjax.layers import dense as dense_lib
from arjax.layers.rope import Rope

Dtype = Any
KVCache = dict  # {'k': [B, S, H, Dh], 'v': [B, S, H, Dh]}
QKV_AXES = ("batch", "length", "heads", "kv")


@dataclasses.dataclass(frozen=True)
class BlockCausal:
  """Blocks of `sizes` consecutive positions (static): a query sees its block and earlier ones."""
  sizes: Tuple[int, ...]

  def __post_init__(self):
    if not self.sizes or any(int(s) <= 0 for s in self.sizes):
      raise ValueError(f"BlockCausal(sizes={self.sizes}): every block needs a positive size")

  @property
  def length(self) -> int:
    return int(sum(self.sizes))

  def block_ids(self) -> np.ndarray:
    """[length] int: the block of every position."""
    return np.repeat(np.arange(len(self.sizes)), self.sizes)


MaskKind = Union[str, BlockCausal]
MASK_KINDS = ("causal", "bidirectional")


def visible(kind: MaskKind, query_pos, key_pos):
  """[n, S] bool: may the query at query_pos[i] attend to the key at key_pos[j]; None when every
  key is visible ('bidirectional')."""
  if kind == "bidirectional":
    return None
  if kind == "causal":
    return key_pos[None, :] <= query_pos[:, None]
  if isinstance(kind, BlockCausal):
    if key_pos.shape[0] != kind.length:
      raise ValueError(f"BlockCausal sizes {kind.sizes} cover {kind.length} positions; the keys "
                       f"have {key_pos.shape[0]}")
    ids = jnp.asarray(kind.block_ids())
    return ids[key_pos][None, :] <= ids[query_pos][:, None]
  raise ValueError(f"attention mask {kind!r}: one of {MASK_KINDS} or BlockCausal(sizes)")


class Attention(nn.Module):
  """Multi-head attention over x [B, n, D] (see the module docstring).

  Parameters: `query`, `key`, `value` kernels [D, H, Dh] (heads on a logical axis of their own)
  and the output projection `out_name` [H, Dh, D]. `key_bias=False` drops the key bias: it adds
  q.b_k to every logit of a query alike, which softmax cancels, so its gradient is exactly
  zero. (timm's ViT keeps it, and MAR's weights have one.)
  """
  num_heads: int
  mask: MaskKind = "causal"
  dtype: Dtype = jnp.float32
  key_bias: bool = True
  out_name: str = "out"
  rope: Optional[Rope] = None
  # Dropout of the attention probabilities (timm's attn_drop), in training only.
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, key_mask=None, queries=None, query_positions=None,
               cache: Optional[KVCache] = None, index=None, positions=None):
    """-> (out [B, n or Q, D], new cache or None).

    key_mask: [B, S] True = attend; padding rows False.
    queries: [B, Q, D] rows (of x, gathered) whose outputs alone are wanted; their positions
      `query_positions` [Q] are needed when the mask kind or RoPE reads positions.
    cache, index: write this call's keys/values at [index, index + n) of the cache.
    positions: the rows' positions for RoPE ([n] or [B, n]; [.., 2] for 2-D) when they are not
      their sequence positions (e.g. a 2-D grid).
    """
    width = x.shape[-1]
    head_dim = width // self.num_heads
    proj = lambda name, bias=True: dense_lib.dense_general(
        (self.num_heads, head_dim), ("embed", "heads", "kv"), dtype=self.dtype, name=name,
        use_bias=bias)
    n = x.shape[1]
    start = 0 if cache is None else index
    key_pos = start + jnp.arange(n)  # this call's rows
    if queries is None:
      q, query_pos = proj("query")(x), key_pos
    else:
      q = proj("query")(queries)
      query_pos = query_positions
      if query_pos is None and (self.mask != "bidirectional" or self.rope is not None):
        raise ValueError(f"attention mask {self.mask!r} / rope: queries need query_positions")
    k, v = proj("key", self.key_bias)(x), proj("value")(x)  # [B, n, H, Dh]
    q, k, v = (dense_lib.constrain(a, QKV_AXES) for a in (q, k, v))
    if self.rope is not None:
      rope_pos = key_pos if positions is None else positions
      k = self.rope.apply(k, rope_pos)
      q = self.rope.apply(q, rope_pos if queries is None else query_pos)
    if cache is None:
      keys, values, new_cache = k, v, None
      all_key_pos = key_pos
    else:
      keys = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
      values = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
      new_cache = {"k": keys, "v": values}
      all_key_pos = jnp.arange(keys.shape[1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, keys.astype(q.dtype)).astype(jnp.float32)
    logits = logits * (head_dim ** -0.5)
    shown = visible(self.mask, query_pos, all_key_pos)  # [Q, S] or None
    if shown is not None:
      shown = shown[None, None]
    if key_mask is not None:
      padding = key_mask[:, None, None, :]
      shown = padding if shown is None else shown & padding
    if shown is not None:
      logits = jnp.where(shown, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    probs = dense_lib.dropout(self, probs, self.dropout)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, values.astype(self.dtype))
    # Heads concatenated (feature h*Dh + d) before the output projection, as timm does.
    out = dense_lib.dense_general(width, ("heads", "kv", "embed"), dtype=self.dtype,
                                  name=self.out_name, axis=(-2, -1))(out)
    return out, new_cache
