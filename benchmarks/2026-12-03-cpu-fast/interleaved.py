"""Interleaved sampler timing (python benchmarks/2026-12-03-cpu-fast/interleaved.py ROUNDS causal|mar,
from the repository root, untrained parameters: the cost does not depend on them): every method compiled first, then R rounds, each timing every
method once in turn, so a slow spell of the shared machine hits all of them alike."""
import json, os, sys, time
import jax, numpy as np, flax.linen as nn
from arjax import registry
from arjax.config import schema as configs

R = int(sys.argv[1]) if len(sys.argv) > 1 else 4
which = sys.argv[2] if len(sys.argv) > 2 else "causal"
if which == "causal":
  METHODS = [("baseline heun 16", "digits.py", {}),
             ("DiSA linear 16->4", "digits.py", dict(head_step_schedule="linear", head_steps_end=4)),
             ("DiSA linear 16->2", "digits.py", dict(head_step_schedule="linear", head_steps_end=2)),
             ("DiSA 3 levels 16/8/4", "digits.py", dict(head_step_schedule=",".join(["16"] * 4 + ["8"] * 4 + ["4"] * 8))),
             ("shortcut K=1", "digits_shortcut.py", dict(num_steps=1)),
             ("shortcut K=2", "digits_shortcut.py", dict(num_steps=2)),
             ("shortcut K=4", "digits_shortcut.py", dict(num_steps=4))]
else:
  METHODS = [("MAR baseline heun 16", "digits_mar.py", {}),
             ("MAR DiSA linear 16->4", "digits_mar.py", dict(head_step_schedule="linear", head_steps_end=4)),
             ("MAR shortcut K=2", "digits_shortcut.py:mar", dict(num_steps=2))]
labels = np.arange(500) % 10
runs = []
for name, path, over in METHODS:
  c = configs.load(os.path.join("configs", path))
  c.sample.update(over)
  registry.validate(c)
  tok = registry.make_tokenizer(c.tokenizer, c.data)
  model, head, _ = registry.build_model(c, tok)
  fam = registry.family(c)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), *fam.example_inputs(tok))["params"])
  s = fam.sampler(model, head, tok, c)
  call = lambda s=s, params=params, c=c, k=0: jax.block_until_ready(s(
      params, labels, jax.random.PRNGKey(k), cfg_scale=c.sample.cfg_scale,
      cfg_schedule_name=c.sample.cfg_schedule, temperature=c.sample.temperature))
  t0 = time.perf_counter(); call(); compile_s = time.perf_counter() - t0
  from arjax.perf import bench
  runs.append(dict(name=name, call=call, compile_s=compile_s, times=[],
                   head_evaluations=bench.head_evaluations(c),
                   flops=registry.flops(c, "sample", 500)["total"]))
  print(name, "compiled %.1f s" % compile_s, flush=True)
for r in range(R):
  for run in runs:
    t0 = time.perf_counter(); run["call"](k=r + 1); run["times"].append(time.perf_counter() - t0)
base = min(runs[0]["times"])
out = []
for run in runs:
  row = dict(name=run["name"], min_s=min(run["times"]), median_s=float(np.median(run["times"])),
             times_s=run["times"], compile_s=run["compile_s"], images_per_s=500 / min(run["times"]),
             speedup_vs_baseline=base / min(run["times"]), head_evaluations=run["head_evaluations"],
             gflop_per_call=run["flops"] / 1e9)
  out.append(row)
  print("%-24s min %.2f s  median %.2f s  %6.1f img/s  x%.2f  evals %s  %.0f GFLOP  compile %.0f s" % (
      row["name"], row["min_s"], row["median_s"], row["images_per_s"], row["speedup_vs_baseline"],
      row["head_evaluations"], row["gflop_per_call"], row["compile_s"]), flush=True)
json.dump(out, open(os.path.join(os.path.dirname(__file__), f"interleaved_{which}.json"), "w"), indent=1)
