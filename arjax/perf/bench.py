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
  head (config.head.name), num_steps, solver (null for heads with their own fixed-step
  sampler: DDPM, shortcut), temperature, head_evaluations (ODE evaluations
  or DDPM steps per token, averaged over the generation order), head_step_schedule,
  head_steps_end; MAR family: num_iter, kept_buckets
  decode (causal and recurrent families; a call is ONE token step of the batch, at the middle
  position, so images_per_s = batch / (median_s x num_tokens)): the sample fields, and
  decode_positions [first, middle, last], decode_median_s / decode_min_s / decode_max_s per
  position, decode_last_over_first (median at the last position / at the first),
  decode_state_bytes per position (what decoding carries from step to step: z and the KV
  cache or recurrent state), decode_live_bytes per position (device bytes_in_use after that
  position's steps; null on CPU) and decode_program_peak_bytes (XLA's buffer-assignment peak
  of the compiled step: arguments, outputs and temporaries; one program serves every position)
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
from arjax import registry

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

# Per-device side of the square matmul that measures the peak. Accelerators need a
# large one to reach their matrix units' throughput; on CPU 1024 is as fast as 2048 and
# long enough to time (the measurements: BENCHMARKS.md, "How bench measures the peak").
_PEAK_MATMUL_SIZE = {"cpu": 1024}
_PEAK_MATMUL_SIZE_DEFAULT = 8192


# -----------------------------------------------------------------------------
# Model FLOPs: counted by each family and head for the work it does (`Family.flops`,
# `Head.flops`), asked through the registry.


def is_guided(config) -> bool:
  """Whether sampling runs CFG: the rule of every sampler (a ramp to 1 is the constant 1)."""
  return config.sample.cfg_scale != 1.0


def analytic_flops(config, mode: str, batch_size: int) -> dict:
  """Model FLOPs of one call of the train step, sampler or decode step: {'backbone', 'head',
  'total'}; matmuls only (2 FLOPs per multiply-add), backward counted as its matmuls."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; known: {MODES}")
  return registry.flops(config, mode, batch_size)


def head_evaluations(config):
  """Head-net evaluations per sampled token: the ODE's (flow) or the respaced DDPM steps,
  averaged over the generation order under a DiSA schedule (an int when it is whole)."""
  tokenizer = registry.make_tokenizer(config.tokenizer, config.data, abstract=True)
  return registry.family(config).head_evaluations(config, tokenizer, registry.head(config))


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


def _largest_device_stat(name: str) -> Optional[int]:
  """Largest `memory_stats()[name]` over the local devices, None where the backend keeps no
  stats (CPU)."""
  values = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and name in stats:
      values.append(int(stats[name]))
  return max(values) if values else None


def peak_memory_bytes() -> Optional[int]:
  """Largest `peak_bytes_in_use` over the local devices, None where the backend keeps no stats (CPU)."""
  return _largest_device_stat("peak_bytes_in_use")


def live_memory_bytes() -> Optional[int]:
  """Largest `bytes_in_use` over the local devices now, None where the backend keeps no stats."""
  return _largest_device_stat("bytes_in_use")


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
  """One generation step of the family (`Family.decode_step`: for the causal family the head
  samples token i from z_i and the backbone feeds it at position i against the KV cache),
  jitted alone with its state donated, timed at the family's first, middle and last position.

  The position is an argument, so one compilation serves every position.
  """
  start_fn, step_fn, positions = exp.family.decode_step(exp, batch_size)
  params = _init_params(exp)
  state = jax.jit(start_fn)(params)

  start = time.perf_counter()
  step = jax.jit(step_fn, donate_argnums=(1,)).lower(params, state, jnp.int32(0)).compile()

  def call_at(position):
    def call():
      nonlocal state
      state = step(params, state, jnp.int32(position))
      return state
    return call

  jax.block_until_ready(call_at(positions[0])())
  compile_s = time.perf_counter() - start
  per_position, state_bytes, live = [], [], []
  trace = jax.profiler.trace(profile_dir) if profile_dir else contextlib.nullcontext()
  with trace:
    for position in positions:
      per_position.append(_time_calls(call_at(position), warmup=warmup, repeats=repeats,
                                      profile_dir=None))
      # What decoding holds between two steps (z and the KV cache or recurrent state), and
      # what the device holds after this position's steps (accelerators only).
      state_bytes.append(int(sum(leaf.nbytes for leaf in jax.tree.leaves(state))))
      live.append(live_memory_bytes())
  medians = [statistics.median(t) for t in per_position]
  analysis = step.memory_analysis()
  extra = {"decode_positions": list(positions),
           "decode_median_s": medians,
           "decode_min_s": [min(t) for t in per_position],
           "decode_max_s": [max(t) for t in per_position],
           "decode_last_over_first": medians[-1] / medians[0],
           "decode_state_bytes": state_bytes,
           "decode_live_bytes": live,
           "decode_program_peak_bytes": (None if analysis is None else
                                         int(analysis.peak_memory_in_bytes))}
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
  try:
    exp = Experiment(config)
  except configs.ConfigError as e:
    raise configs.ConfigError(f"{e} (the benchmark's batch: --batch={batch_size})") from e
  if mode == "decode":
    exp.family.decode_step(exp, batch_size)  # a family with no step to time says so here

  # The matmul peak is measured before and after the timed calls and the better one kept:
  # shared machines run at half speed for minutes at a time (BENCHMARKS.md, "How bench
  # measures the peak").
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
    report["batch_mul"] = config.head.get("batch_mul")  # None: no head (xAR)
  else:
    s = config.sample
    report.update(cfg_scale=s.cfg_scale, cfg_schedule=s.cfg_schedule,
                  cfg_interval=s.get("cfg_interval"), guided=is_guided(config),
                  num_steps=s.num_steps,
                  head=config.head.name,
                  solver=s.solver if exp.head_kind.uses_solver else None,
                  temperature=s.temperature, head_evaluations=head_evaluations(config),
                  head_step_schedule=s.head_step_schedule, head_steps_end=s.head_steps_end)
    report.update(exp.family.report_fields(config))
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
    # A solver applies to an ODE/SDE head; the DDPM head's steps are its respacing and the
    # shortcut head's its K fixed steps, so those name the head instead.
    head = r.get("head")  # absent in reports written before the field existed
    solver = r["solver"] or {"mar_diffusion": "DDPM", None: "DDPM"}.get(head, f"{head} head")
    what = f"batch {r['batch_size']}, {solver} {r['num_steps']} steps, cfg {r['cfg_scale']}"
    if r.get("head_step_schedule", "constant") != "constant":  # DiSA
      what += (f", head steps {r['head_step_schedule']} -> {r['head_steps_end']} "
               f"({r['head_evaluations']} evaluations per token)")
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
    state = "  ".join(f"pos {p}: {_si(b, 'B')}" for p, b in zip(r["decode_positions"],
                                                               r["decode_state_bytes"]))
    rows.append(f"  state       {state}  (step program peak "
                f"{_si(r['decode_program_peak_bytes'], 'B')})")
    if any(b is not None for b in r["decode_live_bytes"]):
      live = "  ".join(f"pos {p}: {_si(b, 'B')}" for p, b in zip(r["decode_positions"],
                                                                r["decode_live_bytes"]))
      rows.append(f"  device mem  {live}")
  return "\n".join(rows)
