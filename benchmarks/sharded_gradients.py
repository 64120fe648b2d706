"""Which gradients a sharded training step gets wrong: every parameter's gradient on a few
meshes of 8 simulated CPU devices against one device, from the same warmed-up state and batch.

    python benchmarks/sharded_gradients.py --config=configs/digits_scale.py:smoke \
        --meshes=2,2,2 4,1,2 --skip_constraints=none qkv,hidden

`--skip_constraints` reruns each mesh with some activation constraints turned off (names:
qkv = Attention's q/k/v, hidden = the MLP's hidden units, embed = the blocks' residual stream,
all), to bisect which constraint a wrong gradient depends on. A sharding constraint never
changes values, so a gradient that moves with one is a partitioning defect. Found with it
(2026-12-08): the scale family's flow net on (2, 2, 2), AdaLN gradients up to 75% off until
its activations were left unconstrained (arjax/families/scale/flow_net.py); to see the defect
again, comment out the `nn.logical_axis_rules(())` there and run the command above.
"""
import argparse
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import family_testing  # noqa: E402  (tests/: the random batch the sharded tests use)
from arjax.config import schema as configs  # noqa: E402
from arjax.layers import attention, dense as dense_lib, mlp  # noqa: E402
from arjax.parallel import sharding  # noqa: E402
from arjax.training import loop as train, step as train_step  # noqa: E402

CONSTRAINTS = {"qkv": tuple(attention.QKV_AXES), "hidden": tuple(mlp.HIDDEN_AXES),
               "embed": ("batch", "length", "embed")}
_skipped = set()


def _constrain(x, axes):
  if "all" in _skipped or tuple(axes) in {CONSTRAINTS[n] for n in _skipped if n != "all"}:
    return x
  return nn.with_logical_constraint(x, tuple(axes))


dense_lib.constrain = _constrain  # the layers look it up at trace time


def gradients(exp, state, batch):
  def loss_and_grad(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    tokens = train_step.training_tokens(exp.tokenizer, batch, rng)
    return jax.value_and_grad(exp.loss_fn)(state.params, tokens, batch["label"], rng)
  fn = sharding.shard_activations(loss_and_grad, exp.mesh, exp.rules)
  return jax.device_get(jax.jit(fn)(state, sharding.global_batch(batch, exp.mesh)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--meshes", nargs="+", default=["2,2,2"])
  parser.add_argument("--skip_constraints", nargs="+", default=["none"])
  parser.add_argument("--warmup_steps", type=int, default=6)
  parser.add_argument("--worst", type=int, default=3)
  args = parser.parse_args()
  config = configs.load(args.config)
  config.train.num_steps = max(config.train.num_steps, 100)
  one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
  single = train.Experiment(config, mesh=one)
  state, shardings = single.init_state()
  step = single.jit_step(shardings)
  batch = family_testing.random_batch(config)
  for _ in range(args.warmup_steps):  # leave zero-started layers
    state, _ = step(state, sharding.global_batch(batch, single.mesh))
  host = jax.device_get(state)
  loss_1, grads_1 = gradients(single, state, batch)
  for mesh in args.meshes:
    config.mesh.shape = tuple(int(n) for n in mesh.split(","))
    exp = train.Experiment(config)
    _, shardings = exp.abstract_state()
    for skip in args.skip_constraints:
      _skipped.clear()
      _skipped.update(() if skip == "none" else skip.split(","))
      loss, grads = gradients(exp, jax.device_put(host, shardings), batch)
      rows = []
      for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                              jax.tree.leaves(grads_1)):
        a, b = np.asarray(a), np.asarray(b)
        rows.append((float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30)),
                     jax.tree_util.keystr(path)))
      rows.sort(reverse=True)
      print(f"mesh {mesh} skipping {skip}: loss rel {abs(loss - loss_1) / abs(loss_1):.2e}; "
            "worst gradients (max |diff| / max |g|): "
            + ", ".join(f"{name} {rel:.2e}" for rel, name in rows[:args.worst]), flush=True)


if __name__ == "__main__":
  main()
