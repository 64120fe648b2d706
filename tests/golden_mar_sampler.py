"""Golden checks of MAR's sampling bookkeeping and whole sampling runs (run by test_golden_mar.py).

On whichever of these keys a golden file holds (see the golden README):
  * `out/schedule/L{L}_it{K}/*`: `mask_schedule(L, K)` (mask_ratio in float64; floor_len,
    mask_len and num_pred are counts, compared exactly) and `cfg_iter_cfg{s}` =
    `cfg_scales(schedule, s, 'linear')`;
  * `out/mask_by_order` from `in/mbo_orders` and the float32 `in/mbo_mask_len` (as MAR
    passes `mask_len[0]`);
  * every replayed iteration's `out/sample_*/iter{k}/{mask_len, mask_next, mask_to_pred,
    cfg_iter}` from the run's `settings` and `orders`. The arjax sampler predicts the slice
    `orders[b, num_masked[k] : num_masked[k] + num_pred[k]]` of each row, so mask_to_pred is
    built that way here: that checks the slice against MAR's `mask xor mask_next` (and the
    "all still masked" of the last step);
  * `out/sample_*/tokens_nchw`: the jitted `sample_tokens` scan fed the recorded orders and
    noise (`replay_noise`), compared token for token. It runs with kept_buckets 1 (encoder
    padded to all L tokens at every step) and 2 (two padded sizes, one scan each): the
    padding must not change the result.
"""
import functools
import re

import jax
import numpy as np

from arjax.families.masked import sampler as mar_sampling
from arjax.families.masked import backbone as mar
from arjax.families.masked.model import mask_by_order

KEPT_BUCKETS = (1, 2)
_SCHEDULE_KEY = re.compile(r"out/schedule/L(\d+)_it(\d+)/(.+)")
_CFG_FIELD = re.compile(r"cfg_iter_cfg(\d+(?:\.\d*)?)")

_mask_by_order_stack = jax.jit(jax.vmap(mask_by_order, in_axes=(0, None)))


def _mask_by_orders(mask_lens, orders):
  """mask_by_order for a stack of lengths: [K] x [B, L] orders -> numpy [K, B, L]."""
  return np.asarray(_mask_by_order_stack(mask_lens, orders))


@functools.lru_cache(maxsize=None)
def _sampler(model, head, num_tokens, num_iter, guided, kept_buckets):
  """One jitted `sample_tokens` per static set-up, reused by every file that shares it."""
  return jax.jit(functools.partial(
      mar_sampling.sample_tokens, model=model, head=head,
      schedule=mar_sampling.mask_schedule(num_tokens, num_iter), guided=guided, num_steps=None,
      kept_buckets=kept_buckets))


def _check_schedules(check):
  for key in check.keys("out/schedule/"):
    match = _SCHEDULE_KEY.fullmatch(key)
    if not match:
      check.fail(key, "not of the form out/schedule/L<tokens>_it<steps>/<field>")
      continue
    schedule = mar_sampling.mask_schedule(int(match[1]), int(match[2]))
    field, cfg = match[3], _CFG_FIELD.fullmatch(match[3])
    if cfg:
      check.compare(key, mar_sampling.cfg_scales(schedule, float(cfg[1]), "linear"))
    elif field in ("mask_ratio", "floor_len", "mask_len", "num_pred"):
      check.compare(key, getattr(schedule, field), exact=field != "mask_ratio")
    else:
      check.fail(key, "no arjax counterpart known to this check")


def _check_run(check, imported, run):
  num_iter, cfg, temperature = (float(v) for v in check[f"in/{run}/settings"])
  num_iter = int(num_iter)
  cfg_schedule = check.config.get("sample_tokens", {}).get(run, {}).get("cfg_schedule", "linear")
  num_tokens = imported.backbone.seq_len
  schedule = mar_sampling.mask_schedule(num_tokens, num_iter)
  scales = mar_sampling.cfg_scales(schedule, cfg, cfg_schedule)
  orders = check[f"in/{run}/orders"]

  # MAR's per-iteration bookkeeping. Each mask_by_order stack covers all iterations at once.
  mask_next = _mask_by_orders(schedule.mask_len, orders)
  masked_after = _mask_by_orders(schedule.num_masked, orders)
  masked_before = _mask_by_orders(schedule.num_masked + schedule.num_pred, orders)
  for k in range(num_iter):
    expected = {"mask_len": schedule.mask_len[k:k + 1], "mask_next": mask_next[k],
                "mask_to_pred": masked_before[k] & ~masked_after[k], "cfg_iter": scales[k]}
    for field, value in expected.items():
      key = f"out/{run}/iter{k}/{field}"
      if key in check:
        check.compare(key, value, exact=field == "mask_len")

  key = f"out/{run}/tokens_nchw"
  if key not in check:
    return
  noise = mar_sampling.replay_noise(
      schedule, orders, [check[f"in/{run}/iter{k}/init_noise"] for k in range(num_iter)],
      [check[f"in/{run}/iter{k}/step_noise"] for k in range(num_iter)])
  kw = check.config["MAR_kwargs"]
  seq_side = kw["img_size"] // kw["vae_stride"] // kw["patch_size"]  # MAR's seq_h = seq_w
  for kept_buckets in KEPT_BUCKETS:
    sample = _sampler(imported.model, imported.head, num_tokens, num_iter, cfg != 1.0,
                      kept_buckets)
    # The rng is unused: orders and every noise draw are the recorded ones.
    tokens = sample(imported.params, np.asarray(check[f"in/{run}/labels"], np.int32),
                    jax.random.PRNGKey(0), scales, np.float32(temperature), orders=orders,
                    noise=noise)
    nchw = mar.unpatchify(tokens, kw["patch_size"], kw["vae_embed_dim"], seq_side, seq_side)
    check.compare(key, nchw, label=f"{key} (kept_buckets={kept_buckets})")


def check_sampler(check, imported):
  _check_schedules(check)
  if "out/mask_by_order" in check:
    check.compare("out/mask_by_order",
                  _mask_by_orders(check["in/mbo_mask_len"], check["in/mbo_orders"]))
  for run in sorted({k.split("/")[1] for k in check.keys("in/sample_")}):
    _check_run(check, imported, run)
