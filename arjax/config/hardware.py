"""Accelerator slices the ImageNet-256 presets target, and the config variant that fits one.

    python -m arjax train --config=configs/imagenet256_mar_large.py:v5p-32 ...

`hardware_variant` is the one helper the preset files share: it sets the mesh this
module suggests for the slice, the compute dtype, and a global batch (the recipe's
unless the file names another for that slice). Per-device figures for every preset
(parameters, FLOPs, memory against the HBM below) are in docs/presets.md, printed by
`python -m arjax describe --config=...`.

How a preset's batch is chosen: the recipe's if its `describe` total per device is at
most 75% of the device's HBM, else the largest power-of-two batch per device that is
(75% leaves room for XLA's temporaries, which `describe` does not count, and is what XLA
preallocates on a GPU by default). The train step keeps every layer's activations for the
backward pass (no rematerialisation yet), so these are the activations' limits.
"""
import dataclasses
from typing import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Hardware:
  devices: int              # JAX devices: TPU v5p chips (one device per chip) or GPUs
  memory_gib: float         # HBM per device
  mesh: tuple               # suggested config.mesh.shape (data, fsdp, tensor)
  description: str


# Why these meshes. Every preset model is narrow (widths 768-1536) and small (0.2-1 B
# parameters): 20 bytes per parameter for float32 params, EMA, gradients and Adam moments is
# at most 19 GB (MAR-H), and most of a device's memory goes to the activations of its share of
# the batch. So the batch is split over every device and the state over the `fsdp` axis, which
# the batch shares (rule batch -> (data, fsdp)); tensor parallelism stays 1, because splitting
# 64-128-dim heads or a 3-6k MLP hidden would add two activation all-reduces per block while a
# device's share of the batch already gives its matmuls thousands of rows.
HARDWARE: Mapping[str, Hardware] = {
    # TPU v5p names count TensorCores: v5p-32 is 16 chips (4 hosts), 95 GiB HBM each. FSDP over
    # all 16: the ICI torus connects the whole slice, so the per-layer all-gathers and
    # reduce-scatters are cheap, and the state per chip is 1/16.
    "v5p-32": Hardware(16, 95, (1, 16, 1), "TPU v5p-32: 16 chips, 95 GiB HBM each"),
    # 64 chips (16 hosts). FSDP within groups of 16 chips, data parallel over 4 groups: the same
    # state per chip as on v5p-32, and FSDP collectives over 16 chips instead of 64 (a MAR-B
    # shard over 64 chips would be ~3M parameters: latency-bound all-gathers).
    "v5p-128": Hardware(64, 95, (4, 16, 1), "TPU v5p-128: 64 chips, 95 GiB HBM each"),
    # One host with 8 NVLink-connected H100 80GB. FSDP over the 8 GPUs: NVLink makes its
    # collectives cheap, and the memory it frees (13 GiB per GPU for MAR-H, see
    # docs/presets.md) goes to a larger share of the batch.
    "h100x8": Hardware(8, 80, (1, 8, 1), "8 x NVIDIA H100 80GB (one host, NVLink)"),
}


def hardware_variant(config, variant: str, config_file: str, *,
                     global_batch_size: Mapping[str, int] = None,
                     other_variants: Sequence[str] = ()):
  """`config` set up for the slice named `variant` (a key of HARDWARE); '' returns it as is.

  Sets config.mesh.shape to the slice's suggested mesh and model.dtype to bfloat16 (every
  target's matrix units run bf16 at full rate; parameters and optimizer state stay float32).
  `global_batch_size` maps slices to a batch other than the recipe's (where the recipe's does
  not fit in memory); changing it keeps the recipe's schedule in images: the learning rate
  scales linearly with the batch (MAR's lr = blr * batch / 256), num_steps and warmup_steps
  inversely, and the EMA decay to the power batch / recipe batch, so that the average spans
  as many images. `config_file` and `other_variants` (the file's own non-hardware variants)
  name the known variants when `variant` is unknown.
  """
  if not variant:
    return config
  if variant not in HARDWARE:
    known = ", ".join(repr(v) for v in (*other_variants, *HARDWARE))
    raise ValueError(f"{config_file} has no variant {variant!r}; known: {known}")
  hardware = HARDWARE[variant]
  config.mesh.shape = hardware.mesh
  config.model.dtype = "bfloat16"
  batch = (global_batch_size or {}).get(variant, config.train.global_batch_size)
  t = config.train
  if batch != t.global_batch_size:
    ratio = batch / t.global_batch_size
    t.learning_rate = t.learning_rate * ratio
    t.num_steps = round(t.num_steps / ratio)
    t.warmup_steps = round(t.warmup_steps / ratio)
    t.ema_decay = t.ema_decay ** ratio
    t.global_batch_size = batch
  return config
