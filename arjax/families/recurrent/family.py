"""The recurrent causal family as a plug-in: raster-order AR whose decoder carries a fixed-size
state instead of a KV cache.

`model.family='recurrent'`. Everything but the backbone's token mixer is the causal family's
(arjax/families/causal): the class prefix, the teacher-forced loss (`causal_loss`), the model
(`ARModel`), the per-token head, and the sampler (`Sampler`: one `lax.scan` over positions
whose carry is (z, cache), with per-image seeds). Here the cache is the gated linear
attention's state [B, H, Dh, Dh] per layer ('pure'), plus the current chunk's keys and values
[B, C, H, Dh] ('hybrid'), so the decoder's memory and per-token work do not grow with the
position (arjax/families/recurrent/backbone.py).

Config fields beyond the causal family's:
  model.mixer       'pure' (gated linear attention only) or 'hybrid' (plus softmax attention
                    inside chunks of model.chunk_size positions)
  model.chunk_size  chunk length of the recurrence's chunk-parallel training form (same
                    numbers for any value) and, 'hybrid', the span of its softmax attention
"""
from arjax.config.schema import positive
from arjax.families.causal.family import CausalFamily, is_guided
from arjax.families.recurrent.backbone import MIXERS, RecurrentTransformer
from arjax.layers import mlp
from arjax.util.flops import matmul


def _padded(length: int, chunk: int) -> int:
  return length + (-length) % chunk


def _mixer_flops(rows: int, padded_rows: int, chunk: int, width: int, heads: int) -> int:
  """The gated linear attention over `rows` positions in the chunk-parallel form with chunks
  of `chunk` (`padded_rows`: the rows padded to whole chunks, which its scan computes): q, k,
  v, out projections and the gate; within a chunk the [C, C] scores q.k^T and scores.v; across
  chunks q.S and the state update k^T.v (Dh per key)."""
  head_dim = width // heads
  projections = 4 * matmul(rows, width, width) + matmul(rows, width, heads)
  return (projections + 2 * matmul(padded_rows, width, chunk)
          + 2 * matmul(padded_rows, width, head_dim))


def _step_flops(rows: int, m) -> int:
  """`depth` blocks fed one position per row (a decoding step): the recurrence's projections,
  k^T.v and q.S; 'hybrid' also attention against the chunk's C cached slots (computed in full,
  masked); the SwiGLU MLP."""
  w, heads = m.width, m.num_heads
  head_dim = w // heads
  block = (4 * matmul(rows, w, w) + matmul(rows, w, heads) + 2 * matmul(rows, w, head_dim)
           + _mlp_flops(rows, m))
  if m.mixer == "hybrid":
    block += 4 * matmul(rows, w, w) + 2 * matmul(rows, w, m.chunk_size)
  return m.depth * block


def _mlp_flops(rows: int, m) -> int:
  hidden = mlp.swiglu_hidden(m.width, m.mlp_ratio)
  return 2 * matmul(rows, m.width, hidden) + matmul(rows, hidden, m.width)


class RecurrentFamily(CausalFamily):
  """`model.family='recurrent'`: the causal family with a recurrent token mixer."""
  name = "recurrent"
  schema = {
      **CausalFamily.schema,
      # 'pure': gated linear attention alone; 'hybrid': plus softmax attention in chunks.
      "model.mixer": ((str,), lambda v: v in MIXERS, f"one of {MIXERS}"),
      # Chunk length of the chunk-parallel training form; 'hybrid': the attention's span.
      "model.chunk_size": ((int,), positive, "> 0"),
  }

  def make_backbone(self, config, tokenizer):
    m = config.model
    return RecurrentTransformer(**self.backbone_fields(config, tokenizer), mixer=m.mixer,
                                chunk_size=m.chunk_size)

  def flops(self, config, tokenizer, head_kind, mode, batch_size):
    """Notation as the causal family's (B, T, D, P, W, L, Hd; S = P + T - 1 training
    positions, C the chunk length). Matmuls only; backward = 2 x forward but token_in's.

    train: per block the recurrence in its chunk-parallel form over S positions (padded to
      whole chunks of min(C, S), as its scan runs them), 'hybrid' also softmax attention over
      the S positions padded to whole chunks of C, and the SwiGLU MLP.
    sample: P prefill steps and T - 1 token steps of one position each (`_step_flops`), with
      CFG on 2B rows; the head samples B' x T tokens.
    decode: one token step: the head's draw and one position through the blocks: the same at
      every position (no cache grows).
    """
    m = config.model
    d, t = tokenizer.token_dim, tokenizer.num_tokens
    p, w = m.num_class_tokens, m.width
    head = lambda **kw: head_kind.flops(config, token_dim=d, cond_width=w, **kw)
    rows = batch_size * (2 if is_guided(config) else 1)
    if mode == "train":
      seq = p + t - 1
      chunk = min(m.chunk_size, seq)
      block = (_mixer_flops(batch_size * seq, batch_size * _padded(seq, chunk), chunk, w,
                            m.num_heads) + _mlp_flops(batch_size * seq, m))
      if m.mixer == "hybrid":
        attended = batch_size * _padded(seq, m.chunk_size)
        block += 4 * matmul(attended, w, w) + 2 * matmul(attended, w, m.chunk_size)
      token_in = matmul(batch_size * (t - 1), d, w)
      backbone = 3 * m.depth * block + 2 * token_in
      head_flops = head(mode="train", tokens=batch_size * t)
    elif mode == "sample":
      backbone = (_step_flops(rows * p, m) + _step_flops(rows * (t - 1), m)
                  + matmul(rows * (t - 1), d, w))
      head_flops = sum(head(mode="sample", tokens=rows * tokens, calls=1, num_steps=steps)
                       for tokens, steps in self.head_steps(config, tokenizer))
    elif mode == "decode":
      backbone = _step_flops(rows, m) + matmul(rows, d, w)
      head_flops = head(mode="sample", tokens=rows, calls=1)
    else:
      raise ValueError(f"mode={mode!r}; known: 'train', 'sample', 'decode'")
    return {"backbone": int(backbone), "head": int(head_flops),
            "total": int(backbone + head_flops)}

  def decode_step(self, exp, batch_size):
    """The causal family's token step (`token_step`, the body of the sampler's scan) with this
    backbone: the head draws token i from z_i, the blocks feed it against the recurrent state
    (and, 'hybrid', the chunk's keys and values). The state has one size at every position."""
    return super().decode_step(exp, batch_size)

  def describe_line(self, config):
    m = config.model
    span = f", softmax attention in chunks of {m.chunk_size}" if m.mixer == "hybrid" else ""
    return (f"recurrent ({m.mixer}): {m.width} x {m.depth} ({m.num_heads} heads of gated "
            f"linear attention{span})")
