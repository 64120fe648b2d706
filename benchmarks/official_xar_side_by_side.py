"""Side by side: the official PyTorch xAR code against arjax's xar family, same dims, one run.

    /tmp/tvenv/bin/python benchmarks/official_xar_side_by_side.py --official=/path/to/xAR \
        [--repeats=5] [--warmup=1] [--arjax-python=.venv/bin/python] [--threads=2] [--out=FILE]

Run with a Python that has torch, timm, einops, scipy and numpy (never an arjax dependency);
`--official` is a checkout of github.com/OliverRensu/xAR (its `models/` is imported unmodified
via sys.path). The arjax side runs in a worker subprocess with arjax's own venv
(`--arjax-python`, default `.venv/bin/python`): this script re-executed with `--worker`, driven
over stdin/stdout. Both models stay alive for the whole run and the timed calls are interleaved
(official, arjax, official, arjax, ...), one call at a time, so drift of the shared machine hits
both sides alike. Each side: `--warmup` untimed calls after the first one (the first is reported
as `first_s`: for arjax trace + compile + one run; for PyTorch its eager first call), then
`--repeats` timed calls; median and min reported.

Dims: `configs/xar_cpu_bench.py` (the official code cannot be built at configs/digits_xar.py's
16 tokens of dim 4: it hard-codes a 16 x 16 x 16 latent in 4 cells of 8 x 8). The official model
is `models.xar.xAR(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, width, depth,
heads, mlp_ratio, label_drop_prob, class_num=1000, attn_dropout=0, proj_dropout=0)`, as the golden
files built it (/work/shared/golden/README_xar.md), at the preset's width / depths / heads.

What is timed:
  train   official: model.train(); loss = model(x, labels) (xAR.forward: label drop, logit-normal
          times per cell, noise, block-causal encoder + decoder, v-loss); loss.backward();
          clip_grad_norm_(1.0); torch.optim.AdamW(lr 1e-4, betas (0.9, 0.96), wd 0.02) step;
          EMA update of every parameter (engine_xar.update_ema's arithmetic).
          arjax: Experiment.jit_step on a batch of the same shape (what `bench --mode=train` runs:
          the same loss, grad clip 1.0, AdamW (0.9, 0.96), wd 0.02, EMA).
  sample  official: model.eval(); model.sample_tokens(num_steps, cfg, labels) under no_grad: 4
          entities x num_steps Euler-Maruyama calls with the KV cache, rows always doubled (also
          at cfg 1.0), CFG on the linear ramp over entities.
          arjax: Experiment.sampler() (what `bench --mode=sample` runs), the same grid, solver,
          ramp; tokens decoded by the patchify tokenizer (a reshape).

Identical: dims (L = 256 tokens of dim 16, 4 cells of 8 x 8, width, depths, heads, GEGLU hidden
682, 1001-row class table), batch sizes, number of network calls' tokens per step, Euler-Maruyama
grid (linspace(1, 0.04, n) ++ [0]), CFG ramp, float32 compute, optimizer / clip / EMA.
Not identical (say so when quoting the figures):
  * cfg 1.0: the official sampler always doubles the rows (label + null) and discards the null
    half; arjax does not double when unguided. Both are timed: arjax's own unguided sampler, and
    arjax's sampler program forced to the doubled batch (`guided=True`, every scale 1: the
    official's work).
  * KV cache: the official cache grows (entity s attends over 64 s + 64 keys; its first call per
    entity >= 1 re-encodes the previous entity clean with 128 tokens); arjax keeps a static-length
    256-key cache masked block-causally and commits each finished entity in one extra 64-token
    call. Per entity: official num_steps calls (the first of 128 tokens for s >= 1); arjax
    num_steps + 1 calls of 64 tokens, each against 256 keys.
  * The official sampler state is float64 (network in float32); arjax's is float32.
  * Random numbers: torch's generators vs jax's; values differ, amounts are the same.
  * PyTorch runs eagerly on `--threads` intra-op threads (default: the cores this process may
    use), with OMP_WAIT_POLICY=PASSIVE unless set; arjax is XLA:CPU (jit) on every core.
  * The official forward draws its times with scipy/numpy on the host and its loss scaler / AMP
    (engine_xar's NativeScaler under autocast on GPU) is not used: plain float32 here.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PRESET = os.path.join(REPO, "configs", "xar_cpu_bench.py")

TASKS = ("train", "sample_cfg1", "sample_cfg1_doubled", "sample_cfg3")


# -----------------------------------------------------------------------------
# The arjax worker (arjax's venv): reads one task name a line, answers one JSON line.


def worker(preset, variant):
  from arjax.parallel import host_allocator
  host_allocator.keep_freed_memory()  # as the CLI does before JAX starts
  import functools
  import jax
  import jax.numpy as jnp
  import numpy as np
  from arjax.config import schema as configs
  from arjax.perf import bench
  from arjax.training.experiment import Experiment

  config = configs.load(preset + (f":{variant}" if variant else ""))
  exp = Experiment(config)
  state, shardings = exp.init_state()
  step_fn = exp.jit_step(shardings)
  batch = bench._synthetic_batch(config, config.train.global_batch_size, exp.mesh)
  s = config.sample
  params = bench._init_params(exp)
  sampler = exp.sampler()
  labels = np.arange(s.batch_size) % config.data.num_classes
  rng = jax.random.PRNGKey(s.seed)
  doubled = jax.jit(functools.partial(sampler.sample_images, guided=True))
  ones = sampler.guidance_scales(1.0, s.cfg_schedule)
  image_ids = jnp.arange(s.batch_size, dtype=jnp.int32)

  def train():
    nonlocal state
    state, metrics = step_fn(state, batch)
    return state, metrics

  calls = {
      "train": train,
      "sample_cfg1": lambda: sampler(params, labels, rng, cfg_scale=1.0,
                                     cfg_schedule_name=s.cfg_schedule, temperature=1.0),
      "sample_cfg1_doubled": lambda: doubled(params, jnp.asarray(labels, jnp.int32), rng, ones,
                                             jnp.float32(1.0), image_ids),
      "sample_cfg3": lambda: sampler(params, labels, rng, cfg_scale=s.cfg_scale,
                                     cfg_schedule_name=s.cfg_schedule, temperature=1.0),
  }
  info = {"jax_version": jax.__version__, "backend": jax.default_backend(),
          "devices": jax.device_count(),
          "params": int(sum(x.size for x in jax.tree.leaves(params)))}
  print(json.dumps(info), flush=True)
  for line in sys.stdin:
    task = line.strip()
    if not task:
      continue
    start = time.perf_counter()
    jax.block_until_ready(calls[task]())
    print(json.dumps({"task": task, "s": time.perf_counter() - start}), flush=True)


class ArjaxSide:
  def __init__(self, python, variant):
    cmd = [python, os.path.abspath(__file__), "--worker"] + ([f"--variant={variant}"] if variant else [])
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 cwd=REPO)
    self.info = json.loads(self._line())

  def _line(self):
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"arjax worker died (rc {self.proc.wait()})")
    return line

  def call(self, task):
    self.proc.stdin.write(task + "\n")
    self.proc.stdin.flush()
    answer = json.loads(self._line())
    assert answer["task"] == task, answer
    return answer["s"]

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


# -----------------------------------------------------------------------------
# The official side (this process, torch).


class OfficialSide:
  def __init__(self, checkout, config, threads):
    import types
    # On this shared 2-core machine libgomp's default spin-waiting made 2 threads 3x slower
    # than 1 (15-22 s against 4.9 s a train step, load ~5); passive waiting: 4.7-5.4 s.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    # The official code calls .cuda() on small tensors (labels, latents) and imports flash_attn
    # (never called): on CPU, .cuda() is the identity and flash_attn a stub.
    torch.Tensor.cuda = lambda self, *a, **k: self
    stub = types.ModuleType("flash_attn")
    def _flash(*a, **k):
      raise RuntimeError("flash_attn stub: xAR never calls it")
    stub.flash_attn_func = _flash
    sys.modules.setdefault("flash_attn", stub)
    import importlib.util
    if importlib.util.find_spec("torchvision") is None:
      # timm imports torchvision (datasets, transforms, ops) at import time; xAR uses none of
      # it. The golden files were made with the same kind of import stub.
      sys.meta_path.insert(0, _StubFinder("torchvision"))
    sys.path.insert(0, os.path.abspath(checkout))
    from models.xar import xAR  # noqa: E402  (the official code)
    self.torch, self.np = torch, np
    m, t, s = config.model, config.train, config.sample
    torch.manual_seed(0)
    np.random.seed(0)
    self.model = xAR(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16,
                     encoder_embed_dim=m.width, encoder_depth=m.encoder_depth,
                     encoder_num_heads=m.encoder_heads, decoder_embed_dim=m.width,
                     decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_heads,
                     mlp_ratio=m.mlp_ratio, label_drop_prob=m.label_drop,
                     class_num=config.data.num_classes, attn_dropout=m.attention_dropout,
                     proj_dropout=m.dropout)
    self.params = list(self.model.parameters())
    self.ema = [p.detach().clone() for p in self.params]
    self.ema_rate = t.ema_decay
    self.clip = t.grad_clip_norm
    self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(t.adam_b1, t.adam_b2),
                                 weight_decay=t.weight_decay)
    b = t.global_batch_size
    self.x = torch.rand(b, 16, 16, 16) * 2 - 1  # latents (B, C, 16, 16)
    self.y = torch.arange(b) % config.data.num_classes
    self.sample_labels = torch.arange(s.batch_size) % config.data.num_classes
    self.num_steps, self.cfg = s.num_steps, s.cfg_scale
    self.info = {"torch_version": torch.__version__, "threads": torch.get_num_threads(),
                 "params": int(sum(p.numel() for p in self.params))}

  def train(self):
    torch = self.torch
    self.model.train()
    loss = self.model(self.x, self.y)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, self.clip)
    self.opt.step()
    with torch.no_grad():  # engine_xar.update_ema
      for targ, src in zip(self.ema, self.params):
        targ.mul_(self.ema_rate).add_(src.detach(), alpha=1 - self.ema_rate)
    return loss.item()

  def sample(self, cfg):
    self.model.eval()
    with self.torch.no_grad():
      return self.model.sample_tokens(self.num_steps, cfg=cfg, label=self.sample_labels)

  def call(self, task):
    start = time.perf_counter()
    if task == "train":
      self.train()
    elif task in ("sample_cfg1", "sample_cfg1_doubled"):
      self.sample(1.0)  # always doubled
    elif task == "sample_cfg3":
      self.sample(self.cfg)
    else:
      raise ValueError(task)
    return time.perf_counter() - start


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--official", help="checkout of github.com/OliverRensu/xAR")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  p.add_argument("--arjax-python", default=os.path.join(REPO, ".venv", "bin", "python"))
  p.add_argument("--variant", default="", help="preset variant ('smoke' for a plumbing check)")
  p.add_argument("--tasks", default=",".join(TASKS))
  p.add_argument("--out", help="write the JSON report here")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.worker:
    return worker(PRESET, a.variant)
  if not a.official:
    p.error("--official=/path/to/xAR is required")
  tasks = [t for t in a.tasks.split(",") if t]

  # The preset, read without arjax's venv: its values only (ml_collections may be absent here).
  cfg_json = subprocess.run(
      [a.arjax_python, "-c", "import sys; from arjax.config import schema as c; "
       "print(c.load(sys.argv[1]).to_json())", PRESET + (f":{a.variant}" if a.variant else "")],
      cwd=REPO, check=True, capture_output=True, text=True).stdout
  config = _attrs(json.loads(cfg_json))

  official = OfficialSide(a.official, config, a.threads)
  arjax = ArjaxSide(a.arjax_python, a.variant)
  sides = {"official": official, "arjax": arjax}
  results = {name: {t: {"first_s": None, "times_s": []} for t in tasks} for name in sides}
  for task in tasks:
    for name, side in sides.items():  # first call (compile for arjax), then warm-up
      results[name][task]["first_s"] = side.call(task)
      for _ in range(a.warmup):
        side.call(task)
    for r in range(a.repeats):  # interleaved
      for name, side in sides.items():
        t = side.call(task)
        results[name][task]["times_s"].append(t)
        print(f"{task} repeat {r} {name}: {t:.3f} s", file=sys.stderr, flush=True)
  arjax.close()

  report = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "load_1_5_15": os.getloadavg(), "cpus": os.cpu_count(),
            "official_info": official.info, "arjax_info": arjax.info,
            "repeats": a.repeats, "warmup": a.warmup, "results": results}
  for name in sides:
    for task in tasks:
      r = results[name][task]
      r["median_s"], r["min_s"] = statistics.median(r["times_s"]), min(r["times_s"])
  print(json.dumps(report, indent=1))
  print("\n| task | official median [min] | arjax median [min] | speed-up (median) | first call official / arjax |")
  print("|---|---|---|---|---|")
  for task in tasks:
    o, j = results["official"][task], results["arjax"][task]
    print(f"| {task} | {o['median_s']:.3f} s [{o['min_s']:.3f}] | {j['median_s']:.3f} s "
          f"[{j['min_s']:.3f}] | {o['median_s'] / j['median_s']:.2f}x | {o['first_s']:.2f} / "
          f"{j['first_s']:.2f} s |")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(report, f, indent=1)


class _StubModule(__import__("types").ModuleType):
  """A package whose every attribute is a placeholder class (import stubs only)."""
  __path__ = []

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _Placeholder(name, (), {})


class _Placeholder(type):
  """A placeholder class whose every attribute is another placeholder class."""
  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _Placeholder(name, (), {})


class _StubFinder:
  """Finds every module under `root` as a _StubModule."""
  def __init__(self, root):
    self.root = root

  def find_spec(self, fullname, path=None, target=None):
    import importlib.machinery
    if fullname == self.root or fullname.startswith(self.root + "."):
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec):
    return _StubModule(spec.name)

  def exec_module(self, module):
    pass


class _attrs(dict):
  """A JSON dict read with attribute access (config.model.width)."""
  def __getattr__(self, k):
    v = self[k]
    return _attrs(v) if isinstance(v, dict) else v


if __name__ == "__main__":
  main()
