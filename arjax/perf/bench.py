"""`bench`: time the real jitted train step or sampler of a config, count its FLOPs, report MFU.

    python -m arjax bench --config=configs/digits.py --mode=train|sample|decode [--batch=N]
        [--repeats=N] [--warmup=N] [--profile=DIR] [--out=FILE] [--workdir=DIR]

What is timed is exactly what `train` and `sample` run: `Experiment.jit_step`
on a sharded synthetic batch of the config's shape (random pixels, labels
cycling over the classes), or `Experiment.sampler()` with the config's sample
settings (CFG scale and schedule, solver, ODE steps, temperature), or (decode, causal
family) one token step of that sampler, the head's sampling of token i and the backbone's
KV-cached step at position i, at the first, middle and last position. Parameters
are freshly initialised: the arithmetic does not depend on their values.

Every call is followed by `jax.block_until_ready`, so a time is one call's
device time plus its dispatch. The first call (trace + compile + one run) is
reported apart as `compile_s`.

FLOPs are counted analytically (`analytic_flops`, matmuls only: they are what
the accelerator's matrix units run, and what "MFU" conventionally divides) and
set against a peak this command measures itself, on the same devices, with a
large matmul of the compute dtype. For the train step, XLA's own count
(`cost_analysis()` of the compiled step) is reported beside the analytic one.
The sampler has none: its decode and ODE loops are XLA while loops, whose
bodies cost analysis counts once rather than once per iteration. On CPU, XLA's
count is the analytic one plus ~1-5% of elementwise work (tests/test_bench.py
pins this down). On GPU it is only a lower bound: XLA:GPU emits many matmuls as
cuBLAS custom calls (`__cublas$lt$matmul`), to which its cost analysis assigns
no FLOPs (seen on an H100: 0.68x the analytic count for digits, 0.04x for
imagenet256 in bf16), so trust the analytic count there.

The report (JSON; `run` returns it as a dict):
  mode, config, command, date         what ran, when (UTC), from which command line
  jax_version, backend, device_kind, device_count, process_count, mesh_shape
  compute_dtype, batch_size, num_tokens, repeats, warmup
  compile_s                           first call: trace + compile + one run
  median_s, min_s, max_s, times_s     seconds per timed call
  images_per_s, tokens_per_s          batch_size (x num_tokens) / median_s
  flops_per_call                      analytic model FLOPs = flops_backbone + flops_head
  xla_flops_per_device                train: XLA's count for one device's program; else null
  xla_flops_per_call                  that times device_count
  achieved_flops_per_s                flops_per_call / median_s
  peak_flops_per_s                    {'float32', 'bfloat16'}: measured, all devices together
                                      (bfloat16 null on CPU; on CPU the better of a reading
                                      before and one after the timed calls). float32 uses JAX's default
                                      matmul precision, as the model does: TF32 on GPUs
  peak_dtype, mfu                     the peak used (compute dtype where measured), and
                                      achieved_flops_per_s / that peak
  datasheet_peak_flops_per_s          the chips' datasheet dense peak for the compute dtype
  mfu_datasheet                       (DATASHEET_PEAK_FLOPS; TF32 for float32 on NVIDIA), all
                                      devices together, and MFU against it; null on CPU
  peak_memory_bytes                   max over devices of peak_bytes_in_use; null on CPU
  profile_dir                         where --profile wrote the trace of the timed calls
  train only: batch_mul; sample only: cfg_scale, cfg_schedule, cfg_interval, guided,
  num_steps, solver (null for the DDPM head), temperature, head_evaluations (ODE evaluations
  or DDPM steps per token); MAR family: num_iter, kept_buckets
  decode (causal only; a call is ONE token step of the batch, at the middle position, so
  images_per_s = batch / (median_s x num_tokens)): the sample fields, and decode_positions
  [first, middle, last], decode_median_s / decode_min_s / decode_max_s per position,
  decode_last_over_first (median at the last position / at the first)
"""
import contextlib
import copy
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from arjax.config import schema as configs
from arjax.parallel import sharding
from arjax import tokenizers
from arjax.layers import transformer as layers

MODES = ("train", "sample", "decode")

# Datasheet dense peaks per chip, FLOP/s: (bfloat16, float32 as the model's default matmul
# precision runs it: TF32 on NVIDIA, bf16 passes on TPU). Matched on jax's device_kind.
# Sources: NVIDIA H100/H200 SXM and A100 datasheets (dense, no sparsity), Google Cloud TPU
# system-architecture pages. A measured peak below these is the usual case.
DATASHEET_PEAK_FLOPS = {
    "H100": (989e12, 494e12),   # SXM; the PCIe card is lower (756 / 378), see _datasheet_peak
    "H200": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),  # v5e
    "TPU v5p": (459e12, 459e12),
    "TPU v5": (459e12, 459e12),
    "TPU v6 lite": (918e12, 918e12),  # v6e (Trillium)
}

# The flow head's sinusoidal time-embedding size (`timestep_embedding(t, 256)` in
# arjax/heads/flow.py): the input width of its first time-MLP layer.
TIME_EMBED_DIM = 256

# Per-device side of the square matmul that measures the peak. Accelerators need a
# large one to reach their matrix units' throughput. On a 2-core CPU, 512 gave
# 215-410 GFLOP/s from run to run (too short to time: ~1 ms) and 1024 gave
# 377-406, the same as 2048; 1024 keeps the measurement about a second.
_PEAK_MATMUL_SIZE = {"cpu": 1024}
_PEAK_MATMUL_SIZE_DEFAULT = 8192


# -----------------------------------------------------------------------------
# Analytic FLOP count.


def _matmul(rows: int, fan_in: int, fan_out: int) -> int:
  """FLOPs of [rows, fan_in] @ [fan_in, fan_out]: one multiply and one add per MAC."""
  return 2 * rows * fan_in * fan_out


def _backbone_blocks(rows: int, keys: int, width: int, hidden: int, depth: int) -> int:
  """`depth` decoder blocks over `rows` (= batch x positions) queries, each attending to `keys` keys.

  Per block: q, k, v and out projections (W x W each); attention scores q.k^T
  and probs.v (heads x head_dim = W per key, both computed in full under the
  causal mask, as the implementation does); SwiGLU gate, up (W x hidden) and
  down (hidden x W).
  """
  projections = 4 * _matmul(rows, width, width)
  attention = 2 * _matmul(rows, width, keys)
  mlp = 2 * _matmul(rows, width, hidden) + _matmul(rows, hidden, width)
  return depth * (projections + attention + mlp)


def _head_net(rows: int, token_dim: int, cond_width: int, width: int, depth: int,
              out_dim: Optional[int] = None, *, cond_rows: Optional[int] = None,
              time_rows: Optional[int] = None):
  """One head-network evaluation on `rows` rows -> (FLOPs of layers fed by data, of all others).

  Layers: time MLP (256 -> Wh -> Wh), cond projection (W -> Wh), input
  projection (D -> Wh); per residual block the AdaLN modulation (Wh -> 3 Wh),
  fc1 and fc2 (Wh -> Wh); final modulation (Wh -> 2 Wh) and output (Wh -> D, or
  `out_dim`: 2D for MAR's DDPM net, whose second half is the variance).
  The first time-MLP layer and the input projection read data (t's embedding,
  x_t) that no parameter influences; backprop needs no gradient of their inputs.
  The cond projection runs on `cond_rows` (training: one per token, shared by its
  batch_mul draws) and the time MLP on `time_rows` (a timestep table's size); both
  default to `rows`.
  """
  cond_rows = rows if cond_rows is None else cond_rows
  time_rows = rows if time_rows is None else time_rows
  data_fed = _matmul(time_rows, TIME_EMBED_DIM, width) + _matmul(rows, token_dim, width)
  others = (_matmul(time_rows, width, width) + _matmul(cond_rows, cond_width, width)
            + depth * (_matmul(rows, width, 3 * width) + 2 * _matmul(rows, width, width))
            + _matmul(rows, width, 2 * width) + _matmul(rows, width, out_dim or token_dim))
  return data_fed, others


def _training_head(h, tokens: int, token_dim: int, cond_width: int, out_dim: int) -> int:
  """The head's training FLOPs (forward + backward) on `tokens` tokens x batch_mul draws: the
  condition projected once per token; MAR's DDPM net embeds its integer timesteps as a table
  of num_timesteps rows when there are more rows than that (`MarMLPAdaLN`)."""
  rows = tokens * h.batch_mul
  time_rows = (min(rows, h.num_timesteps) if h.name == "mar_diffusion" else rows)
  data_fed, others = _head_net(rows, token_dim, cond_width, h.width, h.depth, out_dim,
                               cond_rows=tokens, time_rows=time_rows)
  return 2 * data_fed + 3 * others


def _sampling_head(evals: int, calls: int, token_dim: int, cond_width: int, h,
                   out_dim: Optional[int]) -> int:
  """`evals` head-net row evaluations made in `calls` net calls of a sampler: every call
  shares one time t over its rows, which the nets embed once (a scalar t), so the time MLP
  counts once per call, not once per row."""
  return sum(_head_net(evals, token_dim, cond_width, h.width, h.depth, out_dim, time_rows=calls))


def _vit_blocks(rows: int, keys: int, width: int, mlp_ratio: float, depth: int) -> int:
  """MAR's timm ViT blocks: q, k, v, proj (W x W), scores and probs.v, fc1 / fc2 (W x rW)."""
  hidden = int(width * mlp_ratio)
  return depth * (4 * _matmul(rows, width, width) + 2 * _matmul(rows, width, keys)
                  + 2 * _matmul(rows, width, hidden))


def head_evaluations(config) -> int:
  """Head-net evaluations per sampled token: the ODE's (flow) or the respaced DDPM steps."""
  s = config.sample
  if config.head.name == "mar_diffusion":
    return s.num_steps
  return ode_evaluations(s.num_steps, s.solver)


def _expected_over_mask_law(num_tokens: int, mask_ratio_min: float, mask_ratio_std: float,
                            f) -> float:
  """E[f(kept)] for MAR's kept = L - ceil(L r), r ~ N(1, std) truncated to [min, 1]."""
  r = np.linspace(mask_ratio_min, 1.0, 20001)
  weights = np.exp(-0.5 * ((r - 1.0) / mask_ratio_std) ** 2)
  kept = num_tokens - np.maximum(np.ceil(num_tokens * r), 1)
  # f once per distinct count (at most L + 1 of them), not once per point of the grid.
  counts, index = np.unique(kept, return_inverse=True)
  f_kept = np.array([f(count) for count in counts])[index]
  return float(np.sum(weights * f_kept) / np.sum(weights))


def mar_backbone_flops(config, num_tokens: int, token_dim: int, rows: int, known: int,
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
  flops = (_matmul(rows * num_tokens, token_dim, we)
           + _vit_blocks(rows * n, n, we, m.mlp_ratio, m.encoder_depth)
           + _matmul(rows * n, we, wd)
           + _vit_blocks(rows * seq, seq, wd, m.mlp_ratio, full_decoder))
  if queries is not None:
    hidden = int(wd * m.mlp_ratio)
    q = rows * queries
    flops += (2 * _matmul(rows * seq, wd, wd)                        # keys, values
              + 2 * _matmul(q, wd, wd) + 2 * _matmul(q, wd, seq)      # query, proj; attention
              + 2 * _matmul(q, wd, hidden))                           # fc1, fc2
  return flops


def _mar_flops(config, mode: str, batch_size: int, tokenizer) -> dict:
  """`analytic_flops` for the masked family (see there); expected values over the mask law.

  train: z_proj on all L tokens; encoder blocks over buffer + kept rows (unpadded: the
    padding of the bucketed program is waste), decoder_embed on them; decoder blocks over
    buffer + L rows, the last one's queries on the masked tokens only; the head net on
    B * masked * M rows (MAR's loss weights the unmasked tokens by zero, so arjax runs the
    head on the masked ones; the branch's padding rows are waste). Backward as for the
    causal family; z_proj's and the head's data-fed layers get 1x.
  sample: per step k, with B' rows (2B under CFG), the encoder over buffer + known_k,
    decoder over buffer + L (its last block's queries on the num_pred_k predicted tokens
    only, as the sampler runs it), the head on B' x num_pred_k tokens x head evaluations.
    Unpadded counts: the sampler's padding to segment sizes is waste, not model FLOPs.
  """
  from arjax.families.masked import sampler as mar_sampling  # the schedule the sampler really runs

  m, h = config.model, config.head
  d, length = tokenizer.token_dim, tokenizer.num_tokens
  wd = m.decoder_width
  out_dim = 2 * d if h.name == "mar_diffusion" else d
  if mode == "train":
    z_proj = _matmul(batch_size * length, d, m.encoder_width)
    law = lambda f: _expected_over_mask_law(length, m.mask_ratio_min, m.mask_ratio_std, f)
    blocks = law(lambda kept: mar_backbone_flops(config, length, d, batch_size, int(kept),
                                                 queries=length - int(kept))) - z_proj
    backbone = 3 * blocks + 2 * z_proj
    head = law(lambda kept: _training_head(h, batch_size * (length - int(kept)), d, wd, out_dim))
  else:
    schedule = mar_sampling.mask_schedule(length, config.sample.num_iter)
    rows = batch_size * (2 if is_guided(config) else 1)
    backbone = sum(mar_backbone_flops(config, length, d, rows, int(known), int(pred))
                   for known, pred in zip(schedule.num_known_before, schedule.num_pred))
    evals = rows * length * head_evaluations(config)  # every token is predicted once
    head = _sampling_head(evals, len(schedule.num_pred) * head_evaluations(config), d, wd, h,
                          out_dim)
  return {"backbone": int(backbone), "head": int(head), "total": int(backbone + head)}


def is_guided(config) -> bool:
  """Whether sampling runs CFG: the rule of `Sampler.__call__` (a ramp to 1 is the constant 1)."""
  return config.sample.cfg_scale != 1.0


def ode_evaluations(num_steps: int, solver: str) -> int:
  """Head evaluations per token that the ODE solver needs: Euler 1 per step; Heun 2 per step,
  but only 1 in the last step, which keeps the Euler value."""
  return num_steps if solver == "euler" else 2 * num_steps - 1


def analytic_flops(config, mode: str, batch_size: int) -> dict:
  """Model FLOPs of one call of the train step or sampler: {'backbone', 'head', 'total'}.

  Notation: B batch, T tokens of dim D, P class-prefix tokens, W / L backbone
  width / depth, Hd its SwiGLU hidden, Wh / Lh head width / depth, M = head.batch_mul.
  Matmuls only (2 FLOPs per multiply-add); norms, softmax, activations, the
  loss and the optimizer are elementwise and left out.

  train: the teacher-forced backbone over S = P + T - 1 positions (keys = S),
    with token_in on the T - 1 fed tokens; the head net on B * T * M rows.
    Backward = 2 x forward (gradients of each matmul's input and weight),
    except token_in and the head's input projection and first time layer,
    whose inputs are data: only their weight gradient (1 x forward).
  sample: with CFG (scale != 1) every row is doubled, B' = 2B, else B' = B.
    Prefill of the P class tokens, then T - 1 decode steps that feed the
    tokens x_0 .. x_{T-2} (one position each); every query attends to the
    whole KV cache of P + T positions (masked, computed in full). The head net
    runs on B' rows, T tokens x `ode_evaluations` times; its time MLP once per net call
    (every row of a call shares t, which the nets embed once).

  The sampler as implemented runs slightly more than these model FLOPs: it
  also feeds the last token (whose z is never used), and Heun's last step
  evaluates the correction that `jnp.where` then discards; those are waste,
  which MFU by convention does not credit.
  """
  m, h = config.model, config.head
  # Token shapes only: a VAE tokenizer's weights are not read, so FLOPs need no checkpoint.
  tokenizer = tokenizers.make_tokenizer(config.tokenizer, config.data, abstract=True)
  if m.family == "mar":
    return _mar_flops(config, mode, batch_size, tokenizer)
  d, t = tokenizer.token_dim, tokenizer.num_tokens
  out_dim = 2 * d if h.name == "mar_diffusion" else d
  p, w = m.num_class_tokens, m.width
  hidden = layers.swiglu_hidden(w, m.mlp_ratio)
  if mode == "train":
    seq = p + t - 1
    blocks = _backbone_blocks(batch_size * seq, seq, w, hidden, m.depth)
    token_in = _matmul(batch_size * (t - 1), d, w)
    backbone = 3 * blocks + 2 * token_in
    head = _training_head(h, batch_size * t, d, w, out_dim)
  elif mode == "sample":
    rows = batch_size * (2 if is_guided(config) else 1)
    cache = p + t
    backbone = (_backbone_blocks(rows * p, cache, w, hidden, m.depth)
                + _backbone_blocks(rows * (t - 1), cache, w, hidden, m.depth)
                + _matmul(rows * (t - 1), d, w))
    evals = rows * t * head_evaluations(config)
    head = _sampling_head(evals, t * head_evaluations(config), d, w, h, out_dim)
  elif mode == "decode":
    # One token step: the head samples a token from z, the backbone feeds it against the
    # full static cache (every position attends to all P + T slots, masked).
    rows = batch_size * (2 if is_guided(config) else 1)
    backbone = (_backbone_blocks(rows, p + t, w, hidden, m.depth) + _matmul(rows, d, w))
    head = _sampling_head(rows * head_evaluations(config), head_evaluations(config), d, w, h,
                          out_dim)
  else:
    raise ValueError(f"mode={mode!r}; known: {MODES}")
  return {"backbone": int(backbone), "head": int(head), "total": int(backbone + head)}


# -----------------------------------------------------------------------------
# Measurements.


def xla_flops(compiled) -> Optional[float]:
  """FLOPs XLA's cost analysis counts for a compiled program (per device under SPMD), or None."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (backends may not implement it)
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def peak_memory_bytes() -> Optional[int]:
  """Largest `peak_bytes_in_use` over the local devices, None where the backend keeps no stats (CPU)."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def measure_peak_flops(dtype, size: Optional[int] = None, repeats: int = 10) -> Optional[float]:
  """FLOP/s of all devices together on one [size, size] @ [size, size] matmul per device.

  The matmuls form one program sharded over every device, so the peak counts
  exactly the devices the benchmark uses, and devices that share hardware
  (CPU devices simulated with --xla_force_host_platform_device_count) share it
  here too. Best of `repeats` runs: a peak is the rate the hardware reaches.
  None where the backend cannot run the dtype.
  """
  devices = jax.devices()
  platform = devices[0].platform
  size = size or _PEAK_MATMUL_SIZE.get(platform, _PEAK_MATMUL_SIZE_DEFAULT)
  mesh = Mesh(np.asarray(devices), ("d",))
  split = NamedSharding(mesh, P("d"))
  n = len(devices)
  try:
    make = jax.jit(lambda key: jax.random.normal(key, (n, size, size), dtype), out_shardings=split)
    a, b = make(jax.random.PRNGKey(1)), make(jax.random.PRNGKey(2))
    matmul = jax.jit(lambda a, b: jnp.einsum("nij,njk->nik", a, b), out_shardings=split)
    jax.block_until_ready(matmul(a, b))  # compile, and a first run off the clock
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(matmul(a, b))
      best = min(best, time.perf_counter() - start)
  except Exception:  # pylint: disable=broad-except  (a dtype the backend lacks)
    return None
  return 2.0 * n * size ** 3 / best


def datasheet_peak(device_kind: str, dtype: str) -> Optional[float]:
  """Datasheet dense FLOP/s of one chip of `device_kind` for `dtype`, None where unknown (CPU)."""
  if "PCIe" in device_kind and "H100" in device_kind:
    return {"bfloat16": 756e12, "float32": 378e12}.get(dtype)
  # Longest key first: "TPU v5 lite" must not match "TPU v5".
  for key in sorted(DATASHEET_PEAK_FLOPS, key=len, reverse=True):
    if key in device_kind:
      bf16, f32 = DATASHEET_PEAK_FLOPS[key]
      return {"bfloat16": bf16, "float32": f32}.get(dtype)
  return None


def _time_calls(call, *, warmup: int, repeats: int, profile_dir: Optional[str]):
  """Seconds of each of `repeats` device-synchronised calls, after `warmup` untimed ones."""
  for _ in range(warmup):
    jax.block_until_ready(call())
  trace = jax.profiler.trace(profile_dir) if profile_dir else contextlib.nullcontext()
  times = []
  with trace:
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(call())
      times.append(time.perf_counter() - start)
  return times


def _synthetic_batch(config, batch_size: int, mesh):
  """A global batch like the data pipeline's: images float32 in [-1, 1], int labels."""
  d = config.data
  local = batch_size // jax.process_count()
  rng = np.random.default_rng(jax.process_index())
  batch = {"image": rng.uniform(-1, 1, (local, d.image_size, d.image_size, d.channels))
                    .astype(np.float32),
           "label": (np.arange(local) % d.num_classes).astype(np.int32)}
  return sharding.global_batch(batch, mesh)


def _bench_train(exp, batch_size, warmup, repeats, profile_dir):
  state, shardings = exp.init_state()
  step_fn = exp.jit_step(shardings)
  batch = _synthetic_batch(exp.config, batch_size, exp.mesh)

  def call():
    nonlocal state  # the step donates its input state: each call feeds the next its output
    state, metrics = step_fn(state, batch)
    return state, metrics

  start = time.perf_counter()
  jax.block_until_ready(call())
  compile_s = time.perf_counter() - start
  # After the first call, so that the call pays the compilation (this lowering
  # hits jit's cache) and compile_s is what a training run's first step costs.
  compiled_flops = xla_flops(step_fn.lower(state, batch).compile())
  times = _time_calls(call, warmup=warmup, repeats=repeats, profile_dir=profile_dir)
  return compile_s, times, compiled_flops, {}


def _init_params(exp):
  """Parameters alone, sharded by the rules (no optimizer state: it would inflate peak memory)."""
  _, shardings = exp.abstract_state()
  init = jax.jit(
      lambda rng: nn.meta.unbox(exp.model.init(rng, exp.example_tokens, exp.example_labels)["params"]),
      out_shardings=shardings.params)
  return init(jax.random.PRNGKey(exp.config.seed))


def _bench_sample(exp, batch_size, warmup, repeats, profile_dir):
  s = exp.config.sample
  params = _init_params(exp)
  sampler = exp.sampler()
  labels = np.arange(batch_size) % exp.config.data.num_classes
  rng = jax.random.PRNGKey(s.seed)

  def call():
    return sampler(params, labels, rng, cfg_scale=s.cfg_scale, cfg_schedule_name=s.cfg_schedule,
                   temperature=s.temperature)

  start = time.perf_counter()
  jax.block_until_ready(call())
  compile_s = time.perf_counter() - start
  times = _time_calls(call, warmup=warmup, repeats=repeats, profile_dir=profile_dir)
  return compile_s, times, None, {}


def decode_positions(num_tokens: int):
  """The positions whose decode cost `--mode decode` reports: first, middle, last."""
  return (0, num_tokens // 2, num_tokens - 1)


def _bench_decode(exp, batch_size, warmup, repeats, profile_dir):
  """One token step of the causal sampler (the head samples token i from z_i, the backbone
  feeds it at position i against the KV cache) timed at the first, middle and last position.

  The step is `arjax.families.causal.sampler.token_step`, the body of the sampler's scan, jitted alone with
  the cache donated; the position is an argument, so one compilation serves every position.
  The cache has its full static length at every position (masked attention over all of it),
  which is what makes the cost flat; the test of that claim is this measurement.
  """
  from arjax.families.causal.model import ARModel
  from arjax.families.causal.sampler import token_step
  from arjax.sampling.base import head_with_solver, image_keys

  config = exp.config  # the causal family: `run` refuses others
  s = config.sample
  params = _init_params(exp)
  model, head = exp.model, head_with_solver(exp.head, s.solver)
  guided = is_guided(config)
  labels = jnp.arange(batch_size, dtype=jnp.int32) % config.data.num_classes
  if guided:
    labels = jnp.concatenate([labels, jnp.full_like(labels, model.backbone.num_classes)])
  keys = image_keys(jax.random.PRNGKey(s.seed), jnp.arange(batch_size))
  scale = jnp.float32(s.cfg_scale)

  def prefill(params, labels):
    cache = model.backbone.init_cache(labels.shape[0], jnp.float32)
    return model.apply({"params": params}, labels, cache, method=ARModel.prefill)

  def one_token(params, z, cache, position):
    _, z, cache = token_step(
        params, z, cache, position, keys, scale, s.temperature, model=model, head=head,
        guided=guided, num_steps=s.num_steps, cfg_interval=tuple(s.cfg_interval),
        value_range=exp.tokenizer.value_range)
    return z, cache

  step = jax.jit(one_token, donate_argnums=(2,))
  z, cache = jax.jit(prefill)(params, labels)
  positions = decode_positions(exp.tokenizer.num_tokens)

  def call_at(position):
    def call():
      nonlocal z, cache
      z, cache = step(params, z, cache, jnp.int32(position))
      return z, cache
    return call

  start = time.perf_counter()
  jax.block_until_ready(call_at(positions[0])())
  compile_s = time.perf_counter() - start
  per_position = []
  trace = jax.profiler.trace(profile_dir) if profile_dir else contextlib.nullcontext()
  with trace:
    for position in positions:
      per_position.append(_time_calls(call_at(position), warmup=warmup, repeats=repeats,
                                      profile_dir=None))
  medians = [statistics.median(t) for t in per_position]
  extra = {"decode_positions": list(positions),
           "decode_median_s": medians,
           "decode_min_s": [min(t) for t in per_position],
           "decode_max_s": [max(t) for t in per_position],
           "decode_last_over_first": medians[-1] / medians[0]}
  return compile_s, per_position[1], None, extra


def run(config, *, mode: str, batch_size: Optional[int], repeats: int, warmup: int,
        profile_dir: Optional[str], config_name: Optional[str] = None,
        command: Optional[str] = None) -> dict:
  """Benchmarks one mode of `config`; returns the report (fields: see the module docstring).

  `config_name` and `command` only label the report (the CLI passes --config
  and its own command line; the default command is this process's argv).
  """
  from arjax.training.experiment import Experiment

  if mode not in MODES:
    raise configs.ConfigError(f"--mode={mode!r}: known modes are {MODES}")
  if repeats < 1 or warmup < 0:
    raise configs.ConfigError(f"--repeats={repeats} must be >= 1 and --warmup={warmup} >= 0")
  if batch_size is not None and batch_size <= 0:
    raise configs.ConfigError(f"--batch={batch_size} must be > 0")
  config = copy.deepcopy(config)
  if mode == "train":
    batch_size = batch_size or config.train.global_batch_size
    # The Experiment checks the batch against the mesh; through the config it
    # names the field, so say which flag set it.
    config.train.global_batch_size = batch_size
  else:
    batch_size = batch_size or config.sample.batch_size
  if mode == "decode" and config.model.family != "causal":
    raise configs.ConfigError(
        f"--mode=decode times the causal family's KV-cached token step; config.model.family="
        f"{config.model.family!r} re-runs its encoder and decoder every iteration (bidirectional "
        "attention keeps no KV cache): time it with --mode=sample")
  try:
    exp = Experiment(config)
  except configs.ConfigError as e:
    raise configs.ConfigError(f"{e} (the benchmark's batch: --batch={batch_size})") from e

  # The matmul peak is measured before and after the timed calls and the better one kept:
  # shared machines (this project's 2-core CPU) run at half speed for minutes at a time, and
  # one short reading in such a spell made an MFU over 100% (BENCHMARKS.md, 2026-12-01).
  # (CPU only: on an accelerator the first reading would count in peak_memory_bytes.)
  on_cpu = jax.devices()[0].platform == "cpu"
  peak_before = measure_peak_flops(jnp.float32) if on_cpu else None
  measure = {"train": _bench_train, "sample": _bench_sample, "decode": _bench_decode}[mode]
  compile_s, times, compiled_flops, extra = measure(exp, batch_size, warmup, repeats,
                                                    profile_dir)
  memory = peak_memory_bytes()  # before the peak matmuls below allocate their own

  median = statistics.median(times)
  num_tokens = exp.tokenizer.num_tokens
  flops = analytic_flops(config, mode, batch_size)
  achieved = flops["total"] / median
  peaks = {"float32": max(filter(None, (peak_before, measure_peak_flops(jnp.float32))),
                          default=None)}
  # XLA:CPU converts bf16 dot operands to f32 and runs an f32 dot (slower than f32 alone):
  # a bf16 "peak" there would measure that conversion, not bf16 hardware.
  peaks["bfloat16"] = None if on_cpu else measure_peak_flops(jnp.bfloat16)
  peak_dtype = config.model.dtype if peaks.get(config.model.dtype) else "float32"
  peak = peaks[peak_dtype]
  devices = jax.devices()
  datasheet = datasheet_peak(devices[0].device_kind, config.model.dtype)
  datasheet_all = None if datasheet is None else datasheet * len(devices)
  # decode: a call is one token; an image is num_tokens of them.
  images_per_s = batch_size / median / (num_tokens if mode == "decode" else 1)
  report = {
      "mode": mode,
      "config": config_name,
      "command": command if command is not None else shlex.join(sys.argv),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax_version": jax.__version__,
      "backend": devices[0].platform,
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "process_count": jax.process_count(),
      "mesh_shape": dict(exp.mesh.shape),
      "compute_dtype": config.model.dtype,
      "batch_size": batch_size,
      "num_tokens": num_tokens,
      "repeats": repeats,
      "warmup": warmup,
      "compile_s": compile_s,
      "median_s": median,
      "min_s": min(times),
      "max_s": max(times),
      "times_s": times,
      "images_per_s": images_per_s,
      "tokens_per_s": images_per_s * num_tokens,
      "flops_per_call": flops["total"],
      "flops_backbone": flops["backbone"],
      "flops_head": flops["head"],
      # XLA counts the partitioned program of one device; times the device count
      # it is the whole mesh's (pure data parallelism repeats the optimizer on each).
      # A lower bound on GPU (see the module docstring).
      "xla_flops_per_device": compiled_flops,
      "xla_flops_per_call": None if compiled_flops is None else compiled_flops * len(devices),
      "achieved_flops_per_s": achieved,
      "peak_flops_per_s": peaks,
      "peak_dtype": peak_dtype,
      "mfu": None if not peak else achieved / peak,
      "datasheet_peak_flops_per_s": datasheet_all,
      "mfu_datasheet": None if datasheet_all is None else achieved / datasheet_all,
      "peak_memory_bytes": memory,
      "profile_dir": profile_dir,
  }
  report.update(extra)
  if mode == "train":
    report["batch_mul"] = config.head.batch_mul
  else:
    s = config.sample
    report.update(cfg_scale=s.cfg_scale, cfg_schedule=s.cfg_schedule,
                  cfg_interval=s.get("cfg_interval"), guided=is_guided(config),
                  num_steps=s.num_steps,
                  solver=None if config.head.name == "mar_diffusion" else s.solver, temperature=s.temperature,
                  head_evaluations=head_evaluations(config))
    if config.model.family == "mar":
      report.update(num_iter=s.num_iter, kept_buckets=s.kept_buckets)
  return report


# -----------------------------------------------------------------------------
# Output.


def report_path(mode: str, out: Optional[str], workdir: Optional[str]) -> Optional[str]:
  """--out if given, else workdir/bench_<mode>.json if a workdir is given, else None (print only)."""
  if out:
    return out
  if workdir:
    return os.path.join(workdir, f"bench_{mode}.json")
  return None


def write_report(report: dict, path: str) -> None:
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
    f.write("\n")


def _si(value: Optional[float], unit: str) -> str:
  if value is None:
    return "n/a"
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.3g} {prefix}{unit}"
  return f"{value:.3g} {unit}"


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:.3g} ms"


def format_table(r: dict) -> str:
  """A compact human summary of a report."""
  xla = r["xla_flops_per_call"]
  xla_text = "" if xla is None else f", XLA {_si(xla, 'FLOP')} (x{xla / r['flops_per_call']:.3f})"
  mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.2f}%"
  if r["mode"] == "train":
    what = f"batch {r['batch_size']}"
  else:
    # The DDPM head's steps are its respacing; a solver only applies to the flow head's ODE.
    solver = "DDPM" if r["solver"] is None else r["solver"]
    what = f"batch {r['batch_size']}, {solver} {r['num_steps']} steps, cfg {r['cfg_scale']}"
  rows = [
      f"bench {r['mode']}  {r['config'] or ''}  {what}",
      f"  device      {r['device_count']} x {r['device_kind']} ({r['backend']}), jax {r['jax_version']}",
      f"  compile     {r['compile_s']:.3g} s (first call)",
      f"  per call    median {_ms(r['median_s'])}  min {_ms(r['min_s'])}  max {_ms(r['max_s'])}"
      f"  ({r['repeats']} calls after {r['warmup']} warm-up)",
      f"  throughput  {r['images_per_s']:.4g} images/s  {r['tokens_per_s']:.4g} tokens/s",
      f"  FLOPs/call  {_si(r['flops_per_call'], 'FLOP')} analytic{xla_text}",
      f"  achieved    {_si(r['achieved_flops_per_s'], 'FLOP/s')}  MFU {mfu} of "
      f"{_si(r['peak_flops_per_s'][r['peak_dtype']], 'FLOP/s')} measured {r['peak_dtype']} peak",
      f"  peak memory {_si(r['peak_memory_bytes'], 'B')}",
  ]
  if r["mfu_datasheet"] is not None:
    rows.insert(-1, f"  datasheet   MFU {100 * r['mfu_datasheet']:.2f}% of "
                    f"{_si(r['datasheet_peak_flops_per_s'], 'FLOP/s')} {r['compute_dtype']}")
  if r["mode"] == "decode":
    per = "  ".join(f"pos {p}: {_ms(t)}" for p, t in zip(r["decode_positions"], r["decode_median_s"]))
    rows.append(f"  per token   {per}  (last/first {r['decode_last_over_first']:.3f})")
  return "\n".join(rows)
