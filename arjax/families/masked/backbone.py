"""MAR's masked encoder-decoder backbone (Li et al. 2024), ported exactly to Flax.

Source: github.com/LTH14/mar, models/mar.py (`MAR.forward_mae_encoder`,
`MAR.forward_mae_decoder`, `MAR.patchify`) with timm's ViT `Block`. The parameter tree
mirrors the PyTorch module tree (`ModuleList` index `i` -> `_i`) so that
`arjax.families.masked.weights` maps state_dict names mechanically; the one structural change
is that timm's fused `attn.qkv` Linear is held as three `DenseGeneral`s
`attn/{query,key,value}` (kernel [D, H, Dh]) so that heads carry a logical axis of their
own, and `attn.proj` as a `DenseGeneral` over (heads, head_dim).

Token layout per image (B rows, L = seq_h * seq_w tokens in raster order):

    position:  0 .. buffer-1            buffer .. buffer+L-1
    encoder:   class embedding (all)    z_proj(token), masked ones dropped
    decoder:   (dropped at the end)     mask_token where masked

Static shapes: MAR drops masked tokens with boolean indexing
(`x[(1 - mask_with_buffer).nonzero(as_tuple=True)].reshape(bsz, -1, D)`), whose output
length depends on the mask's values. Here the kept count `num_kept` (unmasked image tokens
per row, buffer excluded) is a static argument and the kept rows are gathered with
`take_along_axis` over a stable sort of the mask: a stable argsort of the 0/1 mask lists
the unmasked positions first, in increasing position order, which is exactly the
row-major `nonzero` order MAR uses. So one compilation serves every mask with the same
count, and the numbers equal MAR's. Unlike MAR, rows may keep different numbers of
tokens, and `num_kept` may exceed them: the surplus rows are padding, hidden from attention
by a key mask, so a handful of padded sizes serve every mask ratio (training buckets,
`arjax.families.masked.model`; sampler segments, `arjax.families.masked.sampler`).

Label dropout (MAR draws it inside `forward_mae_encoder` in training mode) is an explicit
`drop_labels` argument here, so the randomness lives with the caller.
"""
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from arjax.layers import attention, dense as dense_lib, mlp, patches
from arjax.layers import transformer as layers

Dtype = Any


def patchify(x, patch_size: int):
  """`MAR.patchify`: NCHW latents [B, C, H, W] -> tokens [B, (H/p)*(W/p), C*p*p].

  Feature index = c*p*p + pi*p + qi (channel slowest), token index = h_*(W/p) + w_.
  """
  return patches.patchify(jnp.transpose(x, (0, 2, 3, 1)), patch_size, order="chw")


def unpatchify(x, patch_size: int, channels: int, seq_h: int, seq_w: int):
  """`MAR.unpatchify`, the exact inverse of `patchify`: [B, L, C*p*p] -> [B, C, H, W]."""
  images = patches.unpatchify(x, patch_size, seq_h, seq_w, channels, order="chw")
  return jnp.transpose(images, (0, 3, 1, 2))


class ViTBlock(nn.Module):
  """timm ViT `Block`: x + proj(attn(norm1(x))), then x + fc2(GELU(fc1(norm2(x))))."""
  num_heads: int
  mlp_ratio: float
  norm_eps: float
  dtype: Dtype = jnp.float32
  # Under nn.scan a block must return (carry, per-layer output): (x, None).
  scan_carry: bool = False
  # MAR's attn_dropout (attention probabilities) and proj_dropout (each branch's output).
  attention_dropout: float = 0.0
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, key_mask=None, query_rows=None):
    """x [B, N, D] -> [B, N, D]; with `query_rows` [B, Q] (row indices into x) only those
    rows' outputs [B, Q, D]: every row still serves as key and value, but the query
    projection, attention output, projection and MLP run on the Q rows alone. Per-row ops
    (norms, residuals, MLP) commute with the gather, so the Q rows equal the full block's."""
    width = x.shape[-1]
    norm = lambda name: dense_lib.layer_norm(dtype=self.dtype, eps=self.norm_eps, name=name)
    normed = norm("norm1")(x)
    queries = None
    if query_rows is not None:
      gather = lambda a: jnp.take_along_axis(a, query_rows[:, :, None], axis=1)
      x, queries = gather(x), gather(normed)
    # timm's fused qkv Linear is held as query/key/value (the converter splits its rows) and
    # `attn.proj` as the output projection.
    attended, _ = attention.Attention(self.num_heads, mask="bidirectional", dtype=self.dtype,
                                      out_name="proj", dropout=self.attention_dropout,
                                      name="attn")(normed, key_mask=key_mask, queries=queries)
    x = x + dense_lib.dropout(self, attended, self.dropout)
    h = mlp.GeluMlp(int(width * self.mlp_ratio), dtype=self.dtype, name="mlp")(norm("norm2")(x))
    x = x + dense_lib.dropout(self, h, self.dropout)
    x = dense_lib.constrain(x, ("batch", "length", "embed"))
    return (x, None) if self.scan_carry else x


def _kept_order(mask, buffer_size: int):
  """Positions (buffer included) sorted kept-first, each group in increasing position order.

  A stable argsort of the 0/1 `mask_with_buffer` reproduces MAR's row-major
  `(1 - mask_with_buffer).nonzero()` order for the kept rows (forward_mae_encoder/decoder).
  """
  masked = jnp.asarray(mask) != 0
  with_buffer = jnp.concatenate(
      [jnp.zeros((masked.shape[0], buffer_size), bool), masked], axis=1)
  return with_buffer, jnp.argsort(with_buffer.astype(jnp.int32), axis=1, stable=True)


class MarBackbone(nn.Module):
  """MAR's encoder + decoder: tokens [B, L, C] and a mask -> z [B, L, D_dec]."""
  seq_len: int
  token_dim: int
  encoder_embed_dim: int
  encoder_depth: int
  encoder_num_heads: int
  decoder_embed_dim: int
  decoder_depth: int
  decoder_num_heads: int
  num_classes: int
  buffer_size: int
  mlp_ratio: float = 4.0
  # mar_base/large/huge pass partial(nn.LayerNorm, eps=1e-6); z_proj_ln is always 1e-6.
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  # Encoder and decoder blocks each as one nn.scan ('layers' axis; per-block intermediates are
  # then not sown) and their jax.checkpoint policy; see layers.block_stack.
  scan_layers: bool = False
  remat: str = "none"
  attention_dropout: float = 0.0
  dropout: float = 0.0

  def _blocks(self, name: str, depth: int, num_heads: int, broadcast_args: int):
    return layers.block_stack(
        ViTBlock, depth=depth, scan=self.scan_layers, remat=self.remat, name=name,
        scan_name=name, broadcast_args=broadcast_args, num_heads=num_heads,
        mlp_ratio=self.mlp_ratio, norm_eps=self.norm_eps, dtype=self.dtype,
        scan_carry=self.scan_layers, attention_dropout=self.attention_dropout,
        dropout=self.dropout)

  def setup(self):
    d_enc, d_dec = self.encoder_embed_dim, self.decoder_embed_dim
    length = self.buffer_size + self.seq_len
    normal = lambda std, axes: nn.with_logical_partitioning(nn.initializers.normal(std), axes)
    # MAR.initialize_weights: class_emb / fake_latent / mask_token / pos embeds ~ N(0, 0.02).
    # PyTorch shapes (1, D), (1, 1, D), (1, N, D) lose their leading 1s here.
    self.class_emb = nn.Embed(self.num_classes, d_enc, name="class_emb",
                              embedding_init=normal(0.02, ("classes", "embed")))
    self.fake_latent = self.param("fake_latent", normal(0.02, ("embed",)), (d_enc,), jnp.float32)
    self.z_proj = dense_lib.dense(d_enc, ("token", "embed"), dtype=self.dtype, name="z_proj")
    self.z_proj_ln = dense_lib.layer_norm(dtype=self.dtype, eps=1e-6, name="z_proj_ln")
    self.encoder_pos_embed_learned = self.param(
        "encoder_pos_embed_learned", normal(0.02, ("length", "embed")), (length, d_enc),
        jnp.float32)
    self.encoder_blocks = self._blocks("encoder_blocks", self.encoder_depth,
                                       self.encoder_num_heads, broadcast_args=1)
    self.encoder_norm = dense_lib.layer_norm(dtype=self.dtype, eps=self.norm_eps,
                                             name="encoder_norm")
    # Encoder width in, decoder width out: the input axis stays unsharded ('mlp_out').
    self.decoder_embed = dense_lib.dense(d_dec, ("mlp_out", "embed"), dtype=self.dtype,
                                         name="decoder_embed")
    self.mask_token = self.param("mask_token", normal(0.02, ("embed",)), (d_dec,), jnp.float32)
    self.decoder_pos_embed_learned = self.param(
        "decoder_pos_embed_learned", normal(0.02, ("length", "embed")), (length, d_dec),
        jnp.float32)
    self.decoder_blocks = self._blocks("decoder_blocks", self.decoder_depth,
                                       self.decoder_num_heads, broadcast_args=0)
    self.decoder_norm = dense_lib.layer_norm(dtype=self.dtype, eps=self.norm_eps,
                                             name="decoder_norm")
    self.diffusion_pos_embed_learned = self.param(
        "diffusion_pos_embed_learned", normal(0.02, ("length", "embed")), (self.seq_len, d_dec),
        jnp.float32)

  def class_embedding(self, labels, drop_labels=None):
    """`class_emb(labels)`, rows with `drop_labels` True replaced by the null `fake_latent`.

    MAR mixes `drop * fake_latent + (1 - drop) * class_emb` in forward_mae_encoder
    (training) and uses `fake_latent` for the unconditional half of a CFG batch
    (sample_tokens); a select gives the same numbers.
    """
    emb = self.class_emb(labels)
    if drop_labels is None:
      return emb
    return jnp.where(jnp.asarray(drop_labels)[:, None], self.fake_latent[None].astype(emb.dtype),
                     emb)

  def null_class_embedding(self, batch: int):
    """`fake_latent` for `batch` rows: the unconditional class embedding of CFG."""
    return jnp.broadcast_to(self.fake_latent[None], (batch, self.encoder_embed_dim))

  def encode(self, x, mask, class_embedding, num_kept: int):
    """`forward_mae_encoder`: [B, L, C] tokens -> [B, buffer + num_kept, D_enc].

    Args:
      x: tokens [B, L, token_dim].
      mask: [B, L], nonzero/True = masked (dropped). No row may keep more than `num_kept`.
      class_embedding: [B, D_enc] (see `class_embedding`), written into every buffer row.
      num_kept: static number of encoder rows for image tokens (buffer rows not counted):
        at least the unmasked count of every row. Rows beyond a row's unmasked count are
        masked tokens used as padding; no query attends to them and the decoder never
        reads them back, so any `num_kept` >= the count gives the same z (a few padded
        sizes then serve every mask; see `arjax.families.masked.model`).
    """
    batch = x.shape[0]
    if x.shape[1] != self.seq_len or mask.shape != (batch, self.seq_len):
      raise ValueError(f"x {x.shape} / mask {mask.shape} do not match seq_len {self.seq_len}")
    if not 0 <= num_kept <= self.seq_len:
      raise ValueError(f"num_kept={num_kept} outside [0, {self.seq_len}]")
    h = self.z_proj(x.astype(self.dtype))
    self.sow("intermediates", "enc_z_proj", h)
    buffer = jnp.broadcast_to(class_embedding[:, None, :].astype(h.dtype),
                              (batch, self.buffer_size, h.shape[-1]))
    h = jnp.concatenate([buffer, h], axis=1)
    h = h + self.encoder_pos_embed_learned[None].astype(h.dtype)
    h = self.z_proj_ln(h)
    self.sow("intermediates", "enc_z_proj_ln", h)
    with_buffer, order = _kept_order(mask, self.buffer_size)
    kept = order[:, : self.buffer_size + num_kept]
    h = jnp.take_along_axis(h, kept[:, :, None], axis=1)
    real = ~jnp.take_along_axis(with_buffer, kept, axis=1)
    self.sow("intermediates", "enc_blocks_in", h)
    if self.scan_layers:
      h, _ = self.encoder_blocks(h, real)
    else:
      for i, block in enumerate(self.encoder_blocks):
        h = block(h, real)
        self.sow("intermediates", f"enc_block{i}", h)
    h = self.encoder_norm(h)
    self.sow("intermediates", "encoder", h)
    return h

  def decode(self, h, mask, positions=None):
    """`forward_mae_decoder`: encoder output [B, buffer + num_kept, D_enc] -> z [B, L, D_dec].

    Row r of `h` past the buffer is the r-th unmasked position; rows past a row's unmasked
    count (padding, see `encode`) are never read.

    positions: optional [B, P] image positions (0 .. L-1) whose z alone is wanted, e.g. the
    tokens a sampling step predicts: returns z [B, P, D_dec] at those positions, equal to
    the full z gathered there. With unrolled blocks the last block then computes queries,
    attention output and MLP for those P rows only (all buffer + L rows still give keys and
    values): at P << L that saves about 5/6 of the last block. Scanned blocks run in full.
    """
    batch, num_rows, _ = h.shape
    h = self.decoder_embed(h)
    self.sow("intermediates", "dec_embed", h)
    with_buffer, _ = _kept_order(mask, self.buffer_size)
    kept = ~with_buffer
    # Scatter as a gather: a kept position's rank among the kept positions is its row in h
    # (MAR writes h into x_after_pad[(1 - mask_with_buffer).nonzero()] in that order).
    rank = jnp.clip(jnp.cumsum(kept, axis=1) - 1, 0, num_rows - 1)
    gathered = jnp.take_along_axis(h, rank[:, :, None], axis=1)
    h = jnp.where(kept[:, :, None], gathered, self.mask_token.astype(h.dtype))
    h = h + self.decoder_pos_embed_learned[None].astype(h.dtype)
    self.sow("intermediates", "dec_blocks_in", h)
    rows = None if positions is None else self.buffer_size + positions
    if self.scan_layers:
      h, _ = self.decoder_blocks(h)
      if rows is not None:
        h = jnp.take_along_axis(h, rows[:, :, None], axis=1)
    else:
      last = len(self.decoder_blocks) - 1
      for i, block in enumerate(self.decoder_blocks):
        h = block(h, None, rows) if i == last and rows is not None else block(h)
        self.sow("intermediates", f"dec_block{i}", h)
    h = self.decoder_norm(h)
    self.sow("intermediates", "dec_norm", h)
    pos_embed = self.diffusion_pos_embed_learned.astype(h.dtype)
    if positions is None:
      z = h[:, self.buffer_size:] + pos_embed[None]
    else:
      z = h + pos_embed[positions]
    self.sow("intermediates", "decoder_z", z)
    return z

  def __call__(self, x, mask, labels, num_kept: int, drop_labels=None, positions=None):
    """Encoder then decoder: tokens [B, L, C], mask [B, L], labels [B] -> z [B, L, D_dec]
    (or [B, P, D_dec] at `positions` [B, P], see `decode`)."""
    class_embedding = self.class_embedding(labels, drop_labels)
    return self.decode(self.encode(x, mask, class_embedding, num_kept), mask, positions)
