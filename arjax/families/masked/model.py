"""The masked random-order generative model (MAR): backbone + head, and its training loss.

`MaskedARModel` holds MAR's encoder/decoder (`arjax.families.masked.backbone.MarBackbone`) and a per-token
head network (MAR's `MarMLPAdaLN` for the DDPM head, or `FlowHeadNet`) in one parameter
tree {'backbone', 'head'}, like `ARModel` does for the causal family.

Training masks, as MAR's `MAR.forward` does: one mask ratio per batch from a normal(1, 0.25)
truncated to [mask_ratio_min, 1] (the 0.25 is `mask_ratio_std`, a config field: MAR's law
never shows a short sequence the late sampling steps' many known tokens, see
configs/digits_mar.py), `ceil(L * ratio)` tokens masked in every row, each row
masking the first ones of its own random order; the loss is the head's loss averaged over
the masked tokens only, and the head runs on those tokens alone (`masked_loss`).

Static shapes. The encoder's length is buffer + (number of unmasked tokens), which varies
from batch to batch between 0 and `max_kept = L - ceil(L * mask_ratio_min)`. Compiling one
program per count would give up to max_kept + 1 programs (77 for ImageNet-256), and the
count is drawn on the device, so the host cannot pick one without a sync. Instead the kept
counts are split into `mask_buckets` ranges; each range is one branch of a `lax.switch`
whose encoder is padded to the range's top (padding rows are masked tokens hidden from
attention, `MarBackbone.encode`). So the train step is ONE program however many buckets;
buckets only trade the branch count (compile time, program size) against the padding
(wasted encoder rows: on average a bucket's half width). The mask distribution is exactly
MAR's: padding changes no number.
"""
import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from arjax.layers.dense import dropout_rngs


class MaskedARModel(nn.Module):
  backbone: nn.Module
  head: nn.Module

  def __call__(self, tokens, labels):
    """Touches every parameter (used by init), all tokens kept."""
    mask = jnp.zeros(tokens.shape[:2], bool)
    z = self.backbone(tokens, mask, labels, tokens.shape[1])
    b, t, d = tokens.shape
    return self.head(tokens.reshape(b * t, d), jnp.zeros((b * t,)), z.reshape(b * t, -1))

  def condition(self, tokens, mask, labels, num_kept: int, drop_labels=None, positions=None):
    """z [B, L, W] for tokens [B, L, D] with `mask` (True = masked), or z [B, P, W] at
    `positions` [B, P] only; see MarBackbone."""
    return self.backbone(tokens, mask, labels, num_kept, drop_labels, positions)

  def head_net(self, x_t, t, z):
    return self.head(x_t, t, z)


def min_masked(num_tokens: int, mask_ratio_min: float) -> int:
  """The fewest tokens a training mask hides: ceil(L * mask_ratio_min), and at least one
  (a mask hiding nothing would have no loss)."""
  return max(1, int(np.ceil(num_tokens * mask_ratio_min)))


def max_kept(num_tokens: int, mask_ratio_min: float) -> int:
  """The most unmasked tokens a training mask leaves."""
  return num_tokens - min_masked(num_tokens, mask_ratio_min)


def bucket_sizes(top: int, num_buckets: int) -> Tuple[int, ...]:
  """Padded encoder sizes: the tops of `num_buckets` near-equal ranges covering [0, top]."""
  sizes = sorted({int(np.ceil(top * (i + 1) / num_buckets)) for i in range(num_buckets)})
  return tuple(sizes) if sizes else (0,)


def sample_num_masked(rng, num_tokens: int, mask_ratio_min: float, mask_ratio_std: float = 0.25):
  """MAR's per-batch count: ceil(L * r), r ~ N(1, std) truncated to [mask_ratio_min, 1]."""
  lower = (mask_ratio_min - 1.0) / mask_ratio_std
  ratio = 1.0 + mask_ratio_std * jax.random.truncated_normal(rng, lower, 0.0, (), jnp.float32)
  count = jnp.ceil(num_tokens * ratio).astype(jnp.int32)
  # Float rounding must not leave the documented range.
  return jnp.clip(count, min_masked(num_tokens, mask_ratio_min), num_tokens)


def random_orders(rng, batch: int, num_tokens: int):
  """One uniformly random permutation of positions per row (MAR's `sample_orders`)."""
  return jnp.argsort(jax.random.uniform(rng, (batch, num_tokens)), axis=1).astype(jnp.int32)


def mask_by_order(mask_len, orders):
  """True at positions `orders[b, :mask_len]` (MAR's `mask_by_order`); mask_len may be traced."""
  ranks = jnp.argsort(orders, axis=1)  # ranks[b, p] = index of position p in row b's order
  return ranks < jnp.asarray(mask_len, jnp.int32)


def head_rows(num_tokens: int, buckets: Sequence[int]) -> Tuple[int, ...]:
  """Rows per image the head runs on in each bucket's branch of `masked_loss`: the most tokens
  a mask of that branch hides. Branch i serves kept counts in (buckets[i-1], buckets[i]],
  so it hides at most L - buckets[i-1] - 1 tokens (all L in branch 0)."""
  return tuple(num_tokens - (buckets[i - 1] + 1 if i else 0) for i in range(len(buckets)))


def masked_loss(params, tokens, labels, rng, *, model: MaskedARModel, head,
                label_drop: float, mask_ratio_min: float, buckets: Sequence[int],
                mask_ratio_std: float = 0.25, branch: Optional[int] = None):
  """Mean head loss over the masked tokens of a MAR training mask drawn from `rng`.

  MAR runs its head on all L tokens and weights the unmasked ones by 0. Here the head, and
  the decoder's last block, run only on each image's first `head_rows` positions of its
  random order, which hold its masked tokens (a row past the batch's masked count is
  padding, weighted 0): the same loss, less of the work the zero weights threw away.

  branch: trace only that bucket's branch, as a plain function (`describe` sizes each
  branch's activations with it); its padding must cover the drawn mask for the loss to be
  MAR's, so training never sets it.
  """
  batch, num_tokens, dim = tokens.shape
  count_rng, order_rng, drop_rng, head_rng = jax.random.split(rng, 4)
  num_masked = sample_num_masked(count_rng, num_tokens, mask_ratio_min, mask_ratio_std)
  orders = random_orders(order_rng, batch, num_tokens)
  mask = mask_by_order(num_masked, orders)
  drop = jax.random.uniform(drop_rng, (batch,)) < label_drop

  def loss_padded_to(num_kept, num_rows, params):
    apply = functools.partial(model.apply, {"params": params}, rngs=dropout_rngs(rng))
    # An image's masked positions are the first num_masked of its order (mask_by_order).
    positions = orders[:, :num_rows]
    z = apply(tokens, mask, labels, num_kept, drop, positions, method=MaskedARModel.condition)
    x = jnp.take_along_axis(tokens, positions[:, :, None], axis=1)
    net_fn = lambda x_t, t, zz: apply(x_t, t, zz, method=MaskedARModel.head_net)
    per_token = head.loss(net_fn, x.reshape(-1, dim), z.reshape(batch * num_rows, -1),
                          head_rng).reshape(batch, num_rows)
    weights = jnp.broadcast_to(jnp.arange(num_rows) < num_masked, (batch, num_rows))
    weights = weights.astype(jnp.float32)
    return jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  kept = num_tokens - num_masked
  index = jnp.minimum(jnp.searchsorted(jnp.asarray(buckets, jnp.int32), kept, side="left"),
                      len(buckets) - 1)
  branches = [functools.partial(loss_padded_to, size, rows)
              for size, rows in zip(buckets, head_rows(num_tokens, buckets))]
  if branch is not None:
    return branches[branch](params)
  if len(branches) == 1:
    return branches[0](params)
  return _switch_with_gradients_inside(index, branches, params)


def _switch_with_gradients_inside(index, branches, params):
  """`lax.switch(index, branches, params)`, whose gradient each branch computes itself.

  Differentiating through a plain switch makes every branch return the residuals of every
  other branch (zeros, for a branch that did not run) so that all branches have one output
  type. The branches here differ in shape (encoder size, head rows), so no residual slot is
  shared: each step wrote and copied zeros for three branches' activations, and the MAR CPU
  preset's step took 2.3 s instead of 1.1 s (BENCHMARKS.md). Here each branch runs its own
  forward and backward pass and hands back (loss, gradients), one type for all branches;
  the outer backward pass scales those gradients by the loss's cotangent. Parameters are
  the only differentiable input (tokens, labels and draws are data).
  """
  @jax.custom_vjp
  def switch(params):
    return jax.lax.switch(index, branches, params)

  def forward(params):
    return jax.lax.switch(index, [jax.value_and_grad(branch) for branch in branches], params)

  def backward(grads, cotangent):
    return (jax.tree.map(lambda g: (cotangent * g).astype(g.dtype), grads),)

  switch.defvjp(forward, backward)
  return switch(params)
