"""The MAR CPU benchmark preset: dims fixed so timings line up with a reference run of the
official PyTorch MAR code on this project's 2-core CPU machine (issue 6).

  python -m arjax bench --config=configs/mar_cpu_bench.py --mode=train
  python -m arjax bench --config=configs/mar_cpu_bench.py --mode=sample
  python -m arjax bench --config=configs/mar_cpu_bench.py --mode=sample --config.sample.cfg_scale=1.0

The reference: 128 px images through a stride-16 VAE, i.e. 8 x 8 = 64 tokens of dim 16, the
VAE outside the timing. Here the same 64 tokens of dim 16 come from 32 x 32 one-channel
images cut into 4 x 4 patches (the patchify tokenizer), so nothing but the backbone, the head
and the optimizer is timed, exactly as in the reference. Encoder and decoder 256 wide, 4 + 4
blocks, 8 heads, MLP ratio 4, buffer 16, 10 classes; MAR's DDPM head (3 blocks x 256, 1000
training steps, cosine schedule) sampled with 20 respaced steps; head batch multiplier 4;
train batch 32 with AdamW and gradient clipping; sampling 16 images in 16 iterations, CFG 3.0
(MAR's linear ramp) or none.

Reference (official code, same machine kind): 0.67 s per train step; 1.42 s (no CFG) and
2.52 s (CFG 3.0) to sample the 16 images. Results: BENCHMARKS.md.

Variant ':smoke' shrinks everything for tests of the preset's plumbing.
"""
import os

from arjax.config import schema as configs


def get_config(variant: str = ""):
  if variant not in ("", "smoke"):
    raise ValueError(f"configs/mar_cpu_bench.py has no variant {variant!r}; known: 'smoke'")
  here = os.path.dirname(__file__)
  config = configs.load(os.path.join(here, "digits_mar.py:ddpm"))
  mar_model = configs.load(os.path.join(here, "digits_mar.py")).model  # field template

  config.data.image_size = 32
  config.data.channels = 1
  config.data.num_classes = 10
  config.tokenizer.patch_size = 4  # 8 x 8 tokens of 4 * 4 * 1 = 16 values

  m = config.model = mar_model
  m.encoder_width = m.decoder_width = 256
  m.encoder_depth = m.decoder_depth = 4
  m.encoder_heads = m.decoder_heads = 8
  m.mlp_ratio = 4.0
  m.buffer_size = 16
  # MAR's training mask law: ratio ~ N(1, 0.25) truncated to [0.7, 1].
  m.mask_ratio_min = 0.7
  m.mask_ratio_std = 0.25
  m.dtype = "float32"

  h = config.head
  h.name = "mar_diffusion"
  h.width = 256
  h.depth = 3
  h.batch_mul = 4
  h.num_timesteps = 1000
  h.noise_schedule = "cosine"

  t = config.train
  t.global_batch_size = 32
  t.grad_clip_norm = 3.0  # MAR's clip; AdamW (0.9, 0.95), weight decay 0.02 from the base

  s = config.sample
  s.batch_size = 16
  s.num_images = 16
  s.num_iter = 16
  s.num_steps = 20  # DDPM respacing
  s.cfg_scale = 3.0
  s.cfg_schedule = "linear"
  s.temperature = 1.0

  if variant == "smoke":
    m.encoder_width = m.decoder_width = 32
    m.encoder_depth = m.decoder_depth = 1
    m.encoder_heads = m.decoder_heads = 2
    m.buffer_size = 2
    m.mask_buckets = 1  # one encoder size: one compiled branch, seconds instead of a minute
    h.width, h.depth = 32, 1
    t.global_batch_size = 8
    s.batch_size = s.num_images = 4
    s.num_iter = 4
    s.num_steps = 2
  return config
