"""The masked family (MAR) as a plug-in: random-order masked AR with an encoder-decoder.

Training masks a random share of each image's tokens and predicts them from the rest
(arjax/families/masked/model.py); sampling fills the tokens in over `sample.num_iter`
iterations along a random order per image (arjax/families/masked/sampler.py). Official MAR
checkpoints import into this family (`python -m arjax convert`, through the converter of
arjax/families/masked/convert.py).
"""
import functools
from typing import Optional

import numpy as np

from arjax.config.schema import positive
from arjax.families import base
from arjax.families.masked import model as masked_ar
from arjax.families.masked.backbone import MarBackbone
from arjax.families.masked.convert import MarConverter
from arjax.families.masked.model import MaskedARModel
from arjax.families.masked.sampler import MarSampler, mask_schedule
from arjax.sampling.base import sampler_settings
from arjax.util.flops import matmul


def _vit_blocks(rows: int, keys: int, width: int, mlp_ratio: float, depth: int) -> int:
  """MAR's timm ViT blocks: q, k, v, proj (W x W), scores and probs.v, fc1 / fc2 (W x rW)."""
  hidden = int(width * mlp_ratio)
  return depth * (4 * matmul(rows, width, width) + 2 * matmul(rows, width, keys)
                  + 2 * matmul(rows, width, hidden))


def backbone_flops(config, num_tokens: int, token_dim: int, rows: int, known: int,
                   queries: Optional[int] = None) -> int:
  """One MAR encoder + decoder forward on `rows` images with `known` unmasked tokens each:
  z_proj on all L tokens, encoder over buffer + known rows, decoder_embed, decoder over
  buffer + L rows. With `queries` (z wanted at that many positions per image, as the
  sampler asks) the last decoder block projects keys and values of all rows but runs the
  query projection, attention, output projection and MLP on `queries` rows only."""
  m = config.model
  we, wd, buf = m.encoder_width, m.decoder_width, m.buffer_size
  n = buf + known
  seq = buf + num_tokens
  full_decoder = m.decoder_depth if queries is None else m.decoder_depth - 1
  flops = (matmul(rows * num_tokens, token_dim, we)
           + _vit_blocks(rows * n, n, we, m.mlp_ratio, m.encoder_depth)
           + matmul(rows * n, we, wd)
           + _vit_blocks(rows * seq, seq, wd, m.mlp_ratio, full_decoder))
  if queries is not None:
    hidden = int(wd * m.mlp_ratio)
    q = rows * queries
    flops += (2 * matmul(rows * seq, wd, wd)                        # keys, values
              + 2 * matmul(q, wd, wd) + 2 * matmul(q, wd, seq)      # query, proj; attention
              + 2 * matmul(q, wd, hidden))                          # fc1, fc2
  return flops


def expected_over_mask_law(num_tokens: int, mask_ratio_min: float, mask_ratio_std: float,
                           f) -> float:
  """E[f(kept)] for MAR's kept = L - ceil(L r), r ~ N(1, std) truncated to [min, 1]."""
  r = np.linspace(mask_ratio_min, 1.0, 20001)
  weights = np.exp(-0.5 * ((r - 1.0) / mask_ratio_std) ** 2)
  kept = num_tokens - np.maximum(np.ceil(num_tokens * r), 1)
  # f once per distinct count (at most L + 1 of them), not once per point of the grid.
  counts, index = np.unique(kept, return_inverse=True)
  f_kept = np.array([f(count) for count in counts])[index]
  return float(np.sum(weights * f_kept) / np.sum(weights))


class MaskedFamily(base.Family):
  """`model.family='mar'`."""
  name = "mar"
  cond_width_field = "decoder_width"
  head_splits = (("encoder_width", "encoder_heads"), ("decoder_width", "decoder_heads"))
  schema = {
      "model.encoder_width": ((int,), positive, "> 0"),
      "model.encoder_depth": ((int,), positive, "> 0"),
      "model.encoder_heads": ((int,), positive, "> 0"),
      "model.decoder_width": ((int,), positive, "> 0"),
      "model.decoder_depth": ((int,), positive, "> 0"),
      "model.decoder_heads": ((int,), positive, "> 0"),
      "model.mlp_ratio": ((float, int), positive, "> 0"),
      "model.buffer_size": ((int,), positive, "> 0"),
      "model.norm_eps": ((float,), positive, "> 0"),
      "model.mask_ratio_min": ((float, int), lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
      "model.mask_ratio_std": ((float, int), positive, "> 0"),
      "model.mask_buckets": ((int,), positive, "> 0"),
      **base.BLOCK_STACK_SCHEMA,
  }
  sample_schema = {
      "sample.num_iter": ((int,), positive, "> 0"),
      "sample.kept_buckets": ((int,), positive, "> 0"),
  }

  def build(self, config, tokenizer, head_net, head):
    m = config.model
    dtype = base.compute_dtype(config)
    backbone = MarBackbone(
        seq_len=tokenizer.num_tokens, token_dim=tokenizer.token_dim,
        encoder_embed_dim=m.encoder_width, encoder_depth=m.encoder_depth,
        encoder_num_heads=m.encoder_heads, decoder_embed_dim=m.decoder_width,
        decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_heads,
        num_classes=config.data.num_classes, buffer_size=m.buffer_size, mlp_ratio=m.mlp_ratio,
        norm_eps=m.norm_eps, dtype=dtype, scan_layers=m.scan_layers, remat=m.remat,
        attention_dropout=m.attention_dropout, dropout=m.dropout)
    model = MaskedARModel(backbone=backbone, head=head_net)
    top = masked_ar.max_kept(tokenizer.num_tokens, m.mask_ratio_min)
    loss = functools.partial(masked_ar.masked_loss, model=model, head=head,
                             label_drop=m.label_drop, mask_ratio_min=m.mask_ratio_min,
                             mask_ratio_std=m.mask_ratio_std,
                             buckets=masked_ar.bucket_sizes(top, m.mask_buckets))
    return model, loss

  def sampler(self, model, head, tokenizer, config):
    s = config.sample
    return MarSampler(model, head, tokenizer, num_iter=s.num_iter,
                      kept_buckets=s.kept_buckets, **sampler_settings(s))

  def converters(self):
    return (MarConverter(),)

  def flops(self, config, tokenizer, head_kind, mode, batch_size):
    """Expected values over the mask law.

    train: z_proj on all L tokens; encoder blocks over buffer + kept rows (unpadded: the
      padding of the bucketed program is waste), decoder_embed on them; decoder blocks over
      buffer + L rows, the last one's queries on the masked tokens only; the head on
      B * masked tokens (MAR's loss weights the unmasked tokens by zero, so arjax runs the
      head on the masked ones; the branch's padding rows are waste). Backward = 2 x forward,
      but z_proj (its input is data) gets 1x.
    sample: per step k, with B' rows (2B under CFG), the encoder over buffer + known_k,
      decoder over buffer + L (its last block's queries on the num_pred_k predicted tokens
      only, as the sampler runs it), the head on B' x num_pred_k tokens. Unpadded counts:
      the sampler's padding to segment sizes is waste, not model FLOPs.
    """
    if mode not in ("train", "sample"):
      raise ValueError(f"mode={mode!r}: the masked family counts 'train' and 'sample'")
    m = config.model
    d, length = tokenizer.token_dim, tokenizer.num_tokens
    head = functools.partial(head_kind.flops, config, token_dim=d, cond_width=m.decoder_width)
    if mode == "train":
      z_proj = matmul(batch_size * length, d, m.encoder_width)
      law = lambda f: expected_over_mask_law(length, m.mask_ratio_min, m.mask_ratio_std, f)
      blocks = law(lambda kept: backbone_flops(config, length, d, batch_size, int(kept),
                                               queries=length - int(kept))) - z_proj
      backbone = 3 * blocks + 2 * z_proj
      head_flops = law(lambda kept: head(mode="train", tokens=batch_size * (length - int(kept))))
    else:
      schedule = mask_schedule(length, config.sample.num_iter)
      rows = batch_size * (2 if config.sample.cfg_scale != 1.0 else 1)
      backbone = sum(backbone_flops(config, length, d, rows, int(known), int(pred))
                     for known, pred in zip(schedule.num_known_before, schedule.num_pred))
      # Every token is predicted once, in num_iter head calls, each with its iteration's
      # step count (DiSA).
      head_flops = sum(head(mode="sample", tokens=rows * tokens, calls=1, num_steps=steps)
                       for tokens, steps in self.head_steps(config, tokenizer))
    return {"backbone": int(backbone), "head": int(head_flops),
            "total": int(backbone + head_flops)}

  def head_units(self, config, tokenizer):
    """One unit per iteration: the tokens MAR's schedule predicts in it."""
    return tuple(int(n) for n in mask_schedule(tokenizer.num_tokens,
                                               config.sample.num_iter).num_pred)

  def stack_depths(self, config):
    return (("model", "encoder_depth"), ("model", "decoder_depth"), ("head", "depth"))

  def loss_branches(self, loss):
    # The step runs one bucket's branch, forward and backward inside it (masked_loss): its
    # activations are the largest branch's, not all branches' at once.
    buckets = loss.keywords["buckets"]
    if len(buckets) == 1:
      return (loss,)
    return tuple(functools.partial(loss, branch=i) for i in range(len(buckets)))

  def describe_line(self, config):
    m = config.model
    return (f"mar: encoder {m.encoder_width} x {m.encoder_depth} ({m.encoder_heads} heads), "
            f"decoder {m.decoder_width} x {m.decoder_depth} ({m.decoder_heads} heads)")

  def report_fields(self, config):
    return {"num_iter": config.sample.num_iter, "kept_buckets": config.sample.kept_buckets}
