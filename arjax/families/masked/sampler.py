"""MAR's iterative masked sampler (`MAR.sample_tokens`) as a jitted scan.

    tokens = 0, mask = all masked, orders = one random permutation per image
    for step k = 0 .. K-1:                                  (lax.scan)
        z        = decoder(encoder(tokens, mask, class))    (CFG: [class; null] rows)
        predict  = orders[b, next_k : next_k + n_k]         (n_k tokens per image)
        tokens[predict] = head.sample(z[predict])
        mask     = orders[b, :next_k]

The schedule (how many tokens stay masked after each step, `next_k`, and the CFG scale of
each step) depends only on (L, K) and is computed on the host with MAR's exact float
arithmetic (`mask_schedule`); it reaches the scan as arrays, so a new CFG scale does not
recompile.

Static shapes. MAR gathers `z[mask_to_pred.nonzero()]`, whose size changes every step.
Here the tokens predicted at step k are a contiguous slice of each row's order, so they are
read with a fixed-size `dynamic_slice` of `slots` entries (the largest n_k), and slots past
n_k are dropped when written back. The encoder, whose length MAR lets grow with the number
of known tokens, is padded (`MarBackbone.encode`): the steps are split into `kept_buckets`
consecutive segments, one scan each, padded to the segment's largest known count and placed
to waste the fewest encoder rows (`segments`). One segment gives one scan whose encoder
always holds the last step's count; more segments save the early steps' encoder work at the
price of one more compiled scan body each (kept_buckets = num_iter: no padding at all).

Seeds. Image b of a call is image `first_index + b` of the request; its key is
fold_in(rng, that index) (`arjax.sampling.base.image_keys`), split into an order key (its
generation order) and a step key, from which slot j of step k draws with
fold_in(fold_in(step key, k), j). Slot j of step k is the j-th token of the image's own order
predicted at step k, fixed by (L, K) alone, so an image depends on (rng, its index) and its
label, not on the batch it is sampled in (up to float reduction order).

Head-step annealing (DiSA). `head_steps` gives each iteration its own head step count; each
segment's scan is cut further into runs of equal count (`step_schedule.runs`), so every
count stays static; the constant schedule leaves the segments as they are.

Replay. `orders` and, for the DDPM head, every noise draw can be passed in
(`replay_noise` converts draws recorded from PyTorch, in MAR's row-major order), which
reproduces the official sampler token for token (tests/test_golden_mar.py).
"""
import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from arjax.heads import noise as noise_draws
from arjax.families.masked.model import MaskedARModel, random_orders
from arjax.sampling import step_schedule
from arjax.sampling.base import ImageSampler, image_keys


@dataclasses.dataclass(frozen=True)
class MaskSchedule:
  """Per-step quantities of MAR's cosine schedule for L tokens and K steps (host numpy).

  mask_ratio   float64 cos(pi/2 * (k+1)/K)
  floor_len    float32 floor(L * mask_ratio), before clamps
  mask_len     float32 max(1, min(#masked - 1, floor_len)): what MAR passes to mask_by_order
  num_masked   int     tokens still masked after step k (mask_len, but 0 after the last step)
  num_pred     int     tokens predicted at step k, per image
  """
  num_tokens: int
  mask_ratio: np.ndarray
  floor_len: np.ndarray
  mask_len: np.ndarray
  num_masked: np.ndarray
  num_pred: np.ndarray

  @property
  def num_known_before(self) -> np.ndarray:
    """Unmasked tokens the encoder sees at each step."""
    return self.num_tokens - (self.num_masked + self.num_pred)


def mask_schedule(num_tokens: int, num_iter: int) -> MaskSchedule:
  """MAR's `sample_tokens` bookkeeping, step by step, with its clamps (see MaskSchedule)."""
  if num_tokens < 1 or num_iter < 1:
    raise ValueError(f"mask_schedule needs num_tokens >= 1 and num_iter >= 1, got "
                     f"{num_tokens}, {num_iter}")
  ratios, floors, lens, masked_after, preds = [], [], [], [], []
  masked = num_tokens
  for step in range(num_iter):
    ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
    floor_len = np.float32(np.floor(num_tokens * ratio))
    mask_len = np.float32(max(1.0, min(masked - 1.0, floor_len)))
    after = 0 if step == num_iter - 1 else int(mask_len)
    ratios.append(ratio)
    floors.append(floor_len)
    lens.append(mask_len)
    preds.append(masked - after)
    masked_after.append(after)
    masked = after
  return MaskSchedule(num_tokens, np.asarray(ratios, np.float64), np.asarray(floors, np.float32),
                      np.asarray(lens, np.float32), np.asarray(masked_after, np.int64),
                      np.asarray(preds, np.int64))


def cfg_scales(schedule: MaskSchedule, cfg: float, cfg_schedule: str) -> np.ndarray:
  """Per-step CFG scale: MAR's 'linear' 1 + (cfg - 1) * (L - mask_len) / L, or 'constant'."""
  if cfg_schedule == "linear":
    length = np.float32(schedule.num_tokens)
    return (np.float32(1.0) + (np.float32(cfg) - np.float32(1.0)) * (length - schedule.mask_len)
            / length).astype(np.float32)
  if cfg_schedule == "constant":
    return np.full(schedule.mask_len.shape, cfg, np.float32)
  raise ValueError(f"cfg_schedule={cfg_schedule!r}; known: 'constant', 'linear'")


def segments(schedule: MaskSchedule, num_buckets: int):
  """[(first step, end step, padded encoder size, head slots)] covering all steps in order.

  At most `num_buckets` segments of consecutive steps, each padded to its largest known
  count, placed to minimise the padded encoder rows summed over all steps (an exact dynamic
  program over the K steps; ties: fewer padded head slots). The known count never
  decreases from step to step, so a segment's size is its last step's count. The encoder's
  cost per step is affine in its rows (buffer + size), so this also minimises its FLOPs.
  """
  known = [int(k) for k in schedule.num_known_before]
  preds = [int(n) for n in schedule.num_pred]
  steps = len(known)
  buckets = max(1, min(num_buckets, steps))

  def cost(i, j):  # steps i .. j-1 as one segment
    return ((j - i) * known[j - 1], (j - i) * max(preds[i:j]))

  inf = (float("inf"), float("inf"))
  # best[m][j]: least cost of steps 0 .. j-1 in m segments; cut[m][j]: where the last begins.
  best = [[inf] * (steps + 1) for _ in range(buckets + 1)]
  cut = [[0] * (steps + 1) for _ in range(buckets + 1)]
  best[0][0] = (0, 0)
  for m in range(1, buckets + 1):
    for j in range(1, steps + 1):
      for i in range(m - 1, j):
        if best[m - 1][i] == inf:
          continue
        c = cost(i, j)
        total = (best[m - 1][i][0] + c[0], best[m - 1][i][1] + c[1])
        if total < best[m][j]:
          best[m][j], cut[m][j] = total, i
  m = min(range(1, buckets + 1), key=lambda m: best[m][steps])
  bounds, j = [], steps
  while m > 0:
    i = cut[m][j]
    bounds.append((i, j))
    j, m = i, m - 1
  return [(i, j, known[j - 1], max(1, max(preds[i:j]))) for i, j in reversed(bounds)]


def replay_noise(schedule: MaskSchedule, orders: np.ndarray, init_noise: Sequence[np.ndarray],
                 step_noise: Sequence[np.ndarray]):
  """Recorded PyTorch draws -> the sampler's layout (init [K, B, P, C], steps [K, S, B, P, C]).

  MAR draws one noise row per predicted token in row-major (image, position) order
  (`z[mask_to_pred.nonzero()]`), while the sampler's slot j of image b holds the token
  `orders[b, num_masked[k] + j]`. With CFG the recorded step noise has 2n rows; only the
  first n (the conditional half, the one kept) matter. P = the largest num_pred.
  """
  orders = np.asarray(orders)
  batch = orders.shape[0]
  slots = max(1, int(schedule.num_pred.max()))
  k_steps = len(schedule.num_pred)
  c = np.asarray(init_noise[0]).shape[-1]
  s = np.asarray(step_noise[0]).shape[0]
  init = np.zeros((k_steps, batch, slots, c), np.float32)
  steps = np.zeros((k_steps, s, batch, slots, c), np.float32)
  for k in range(k_steps):
    n = int(schedule.num_pred[k])
    start = int(schedule.num_masked[k])
    for b in range(batch):
      predicted = orders[b, start:start + n]
      rank = np.argsort(np.argsort(predicted))  # row-major = increasing position
      rows = b * n + rank
      init[k, b, :n] = np.asarray(init_noise[k])[rows]
      steps[k, :, b, :n] = np.asarray(step_noise[k])[:, rows]
  return init, steps


def sample_tokens(params, labels, rng, scales, temperature, *, model: MaskedARModel, head,
                  schedule: MaskSchedule, guided: bool, num_steps, kept_buckets: int = 1,
                  cfg_interval=(0.0, 1.0), orders=None, noise=None, value_range=None,
                  image_ids=None, head_steps=None):
  """labels [B] -> tokens [B, L, C].

  scales: [K] float32 CFG scale per step (ignored unless `guided`).
  num_steps: the head's sampling steps (ODE steps; DDPM respacing).
  orders: optional [B, L] int generation orders (default: random from `rng`).
  noise: optional (init [K, B, P, C], steps [K, S, B, P, C]) for the DDPM head (`replay_noise`).
  value_range: optional (lo, hi): sampled tokens are clipped into it before they are kept
    and fed back (bounded tokenizers such as pixel patches; MAR's VAE latents have none).
  image_ids: int [B], each row's index in the whole request (default 0 .. B-1); see Seeds
    in the module docstring.
  head_steps: the head's steps at each iteration (static, K entries; default `num_steps`
    everywhere): DiSA (module docstring).
  """
  batch = labels.shape[0]
  length, dim = schedule.num_tokens, model.backbone.token_dim
  if image_ids is None:
    image_ids = jnp.arange(batch)
  order_keys, row_step_keys = noise_draws.split(image_keys(rng, image_ids))
  if orders is None:
    orders = jax.vmap(lambda key: random_orders(key, 1, length)[0])(order_keys)
  orders = jnp.asarray(orders, jnp.int32)
  apply = functools.partial(model.apply, {"params": params})
  net_fn = lambda x_t, t, z: apply(x_t, t, z, method=MaskedARModel.head_net)
  rows = 2 * batch if guided else batch
  all_labels = jnp.concatenate([labels, labels]) if guided else labels
  drop = jnp.arange(rows) >= batch  # the null half of a CFG batch
  head_kwargs = dict(temperature=temperature, cfg_interval=tuple(cfg_interval))
  num_iter = len(schedule.num_pred)
  if head_steps is None:
    head_steps = (num_steps,) * num_iter
  if len(head_steps) != num_iter:
    raise ValueError(f"head_steps has {len(head_steps)} entries for {num_iter} iterations")
  tokens = jnp.zeros((batch, length, dim), jnp.float32)
  known = jnp.zeros((batch, length), bool)

  pieces = [(first + i, first + j, num_kept, slots, steps)
            for first, end, num_kept, slots in segments(schedule, kept_buckets)
            for i, j, steps in step_schedule.runs(head_steps[first:end])]
  for first, end, num_kept, slots, head_step_count in pieces:
    # Slot j beyond n_k reads past the order; pad the order with an out-of-range position L.
    padded = jnp.concatenate([orders, jnp.full((batch, slots), length, jnp.int32)], axis=1)

    def step(carry, xs, num_kept=num_kept, slots=slots, padded=padded,
             head_step_count=head_step_count):
      tokens, known = carry
      start, count, scale, step_index, step_noise = xs
      mask = ~known
      doubled = lambda a: jnp.concatenate([a, a]) if guided else a
      positions = jax.lax.dynamic_slice_in_dim(padded, start, slots, axis=1)  # [B, P]
      valid = jnp.arange(slots)[None, :] < count
      read = jnp.minimum(positions, length - 1)
      # z at the predicted positions only: the decoder's last block runs P query rows.
      z_slots = apply(doubled(tokens), doubled(mask), all_labels, num_kept, drop, doubled(read),
                      method=MaskedARModel.condition)
      z_slots = z_slots.reshape(rows * slots, -1)
      kwargs = dict(head_kwargs, cfg_scale=scale if guided else None, steps=head_step_count)
      if step_noise is not None:
        kwargs["noise"] = (step_noise[0].reshape(batch * slots, dim),
                           step_noise[1].reshape(step_noise[1].shape[0], batch * slots, dim))
      # [B, P] keys: slot j of image b at this step draws from its own key only.
      step_keys = noise_draws.fold_in(row_step_keys, step_index)
      keys = jax.vmap(lambda k: noise_draws.fold_in_each(k, jnp.arange(slots)))(step_keys)
      sampled = head.sample(net_fn, z_slots, keys.reshape(batch * slots, -1),
                            **kwargs).reshape(batch, slots, dim)
      if value_range is not None:
        sampled = jnp.clip(sampled, *value_range)
      write = jnp.where(valid, positions, length)  # index L: dropped
      b = jnp.arange(batch)[:, None]
      tokens = tokens.at[b, write].set(sampled, mode="drop")
      known = known.at[b, write].set(True, mode="drop")
      return (tokens, known), None

    steps_noise = None
    if noise is not None:
      steps_noise = (jnp.asarray(noise[0])[first:end, :, :slots],
                     jnp.asarray(noise[1])[first:end, :, :, :slots])
    xs = (jnp.asarray(schedule.num_masked[first:end], jnp.int32),
          jnp.asarray(schedule.num_pred[first:end], jnp.int32),
          scales[first:end], jnp.arange(first, end), steps_noise)
    (tokens, known), _ = jax.lax.scan(step, (tokens, known), xs)
  return tokens


@dataclasses.dataclass
class MarSampler(ImageSampler):
  """Samples images from class labels; compiles once per batch size and guidance on/off.

  Row b of a call is image `first_index + b` of the request (see Seeds in the module
  docstring). `num_iter`: MAR's steps (tokens predicted per step: `mask_schedule`);
  `kept_buckets`: encoder segments (see the module docstring).
  """
  num_iter: int
  kept_buckets: int = 4

  def __post_init__(self):
    if isinstance(self.num_iter, bool) or not isinstance(self.num_iter, int) or self.num_iter <= 0:
      raise ValueError(f"num_iter={self.num_iter!r}: must be an integer > 0")
    super().__post_init__()
    self.schedule = mask_schedule(self.tokenizer.num_tokens, self.num_iter)

  def guidance_scales(self, cfg_scale, cfg_schedule_name):
    return cfg_scales(self.schedule, cfg_scale, cfg_schedule_name)

  def sample_images(self, params, labels, rng, scales, temperature, image_ids, *, guided):
    return self.tokenizer.decode(sample_tokens(
        params, labels, rng, scales, temperature, model=self.model, head=self.head_for_sampling,
        schedule=self.schedule, guided=guided, num_steps=self.num_steps,
        kept_buckets=self.kept_buckets, cfg_interval=tuple(self.cfg_interval),
        value_range=self.value_range, image_ids=image_ids,
        head_steps=self.head_steps(self.num_iter)))
