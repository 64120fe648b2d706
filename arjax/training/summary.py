"""What a run is about to do, said before it spends minutes compiling: the start-up summaries.

`train` prints where it runs (devices, processes, mesh), what it trains (parameters, analytic
FLOPs per step from the family's and head's accounting, `arjax.registry.flops`), on what (examples, batch, steps, epochs) and
where it writes (workdir, fresh or resumed); `sample` and `eval` print a line or two. Pure
functions of their arguments, so the tests read the text without running anything.
"""
import math
from typing import Optional

import jax

from arjax import registry
from arjax.util.numbers import count as _count, flops as _flops


def count_parameters(tree) -> int:
  """Elements of every array (or ShapeDtypeStruct) in `tree`."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def num_examples(config, split: Optional[str] = None) -> int:
  """Examples in `split` (default the train split): the latent cache's, or the TFDS split's."""
  from arjax.data import latents, pipeline

  d = config.data
  split = d.train_split if split is None else split
  if d.latents is not None and split == d.train_split:
    return len(latents.LatentSource(d.latents, split))
  return len(pipeline.data_source(d, split))


def devices_line(mesh) -> str:
  """'8 cpu devices (cpu) in 1 process; mesh data 1 x fsdp 8 x tensor 1'."""
  devices = mesh.devices.flatten()
  kinds = sorted({d.device_kind for d in devices})
  processes = jax.process_count()
  axes = " x ".join(f"{name} {size}" for name, size in mesh.shape.items())
  return (f"{len(devices)} {devices[0].platform} device{'s' * (len(devices) != 1)} "
          f"({', '.join(kinds)}) in {processes} process{'es' * (processes != 1)}; "
          f"mesh {axes}")


def training(config, mesh, workdir: str, *, num_params: int, num_examples: int,
             resume_step: Optional[int], checkpoints: str) -> str:
  """The summary `train` prints before compiling (see the module docstring); `resume_step`:
  the step of the checkpoint restored from `checkpoints`, None on a fresh start."""
  c = config
  batch, steps = c.train.global_batch_size, c.train.num_steps
  flops = registry.flops(c, "train", batch)
  epochs = steps * batch / max(num_examples, 1)
  source = (f"latent cache {c.data.latents}" if c.data.latents is not None
            else f"TFDS {c.data.name!r}")
  start = ("fresh start (no checkpoint)" if resume_step is None
           else f"resuming from checkpoint step {resume_step} in {checkpoints}")
  return "\n".join([
      "arjax train",
      f"  devices     {devices_line(mesh)}",
      f"  parameters  {_count(num_params)} (backbone + head; {c.model.family} family, "
      f"{c.head.name} head)",
      f"  FLOPs       {_flops(flops['total'])} per train step (analytic, forward + backward; "
      f"`python -m arjax describe` breaks it down)",
      f"  data        {source}, split {c.data.train_split!r}: {num_examples} examples; "
      f"batch {batch} x {steps} steps = {epochs:.3g} epochs",
      f"  workdir     {workdir}: {start}",
  ])


def sampling(config, mesh, workdir: str, *, step: int, num_images: int) -> str:
  """One line for `sample`: what is drawn, how, from which checkpoint, where."""
  s = config.sample
  cfg = ("no CFG" if s.cfg_scale == 1.0
         else f"CFG {s.cfg_scale:g} ({s.cfg_schedule})")
  return (f"arjax sample: {num_images} images in batches of {s.batch_size} from checkpoint step "
          f"{step} in {workdir} ({'EMA' if s.use_ema else 'raw'} params; {cfg}, temperature "
          f"{s.temperature:g}, {s.solver} {s.num_steps} steps, seed {s.seed})\n"
          f"  devices     {devices_line(mesh)}")


def evaluation(config, samples_path: str, *, num_samples: int, num_train: int,
               num_eval: int) -> str:
  """One line for `eval`: what is scored against what."""
  d = config.data
  return (f"arjax eval: {num_samples} samples of {samples_path} against {num_eval} held-out "
          f"{d.eval_split!r} images of {d.name!r} (features and memorisation use the "
          f"{num_train} {d.train_split!r} images)")
