"""What a slot step and a sampler call cost alone: the ceiling the serving engines work under.

    python benchmarks/serve_step_cost.py --workdir=DIR

For a trained workdir (its config.json, EMA parameters), on one device: the slot engine's
step (arjax/sampling/slots.py) with every slot live, for 8, 32 and 64 slots, and the family
sampler's call (16 tokens per image) at batch 1 .. 32, guided (CFG 1.6, linear ramp). Prints
milliseconds and the images/s each would give if kept busy.
"""
import argparse
import time

import jax
import numpy as np

from arjax.config import schema as configs
from arjax.training import checkpoint
from arjax.training.experiment import Experiment


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args()
  exp = Experiment(configs.load_json(f"{args.workdir}/config.json"))
  params, _ = checkpoint.restore_params(exp, args.workdir, True)
  params = jax.device_put(params, jax.devices()[0])
  sampler = exp.sampler()
  for slots in (8, 32, 64):
    decoder = exp.family.slot_decoder(sampler, slots)
    state = jax.device_put(decoder.init(), jax.devices()[0])
    scales = decoder.guidance_scales(1.6, "linear")
    for s in range(slots):
      state = decoder.admit(params, state, s, label=s % 10, seed=0, index=s, scales=scales,
                            temperature=1.0)
    state = jax.block_until_ready(decoder.step(params, state, slots))
    start = time.perf_counter()
    for _ in range(16):
      state = decoder.step(params, state, slots)
    jax.block_until_ready(state)
    step = (time.perf_counter() - start) / 16
    print(f"slot step, {slots} live slots: {step * 1000:.1f} ms "
          f"({slots / (step * decoder.num_units):.1f} images/s if kept full)", flush=True)
  for batch in (1, 4, 8, 16, 32):
    labels = np.arange(batch) % 10
    call = lambda: jax.block_until_ready(sampler(  # noqa: E731
        params, labels, jax.random.PRNGKey(0), cfg_scale=1.6, cfg_schedule_name="linear",
        temperature=1.0))
    call()
    start = time.perf_counter()
    call()
    call()
    seconds = (time.perf_counter() - start) / 2
    print(f"sampler, batch {batch}: {seconds * 1000:.1f} ms ({batch / seconds:.1f} images/s)",
          flush=True)


if __name__ == "__main__":
  main()
