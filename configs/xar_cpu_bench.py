"""The xAR CPU benchmark preset: dims the official PyTorch xAR code (OliverRensu/xAR) can be
built at, so `benchmarks/official_xar_side_by_side.py` times the two on the same work.

  python benchmarks/official_xar_side_by_side.py --official=/path/to/xAR
  python -m arjax bench --config=configs/xar_cpu_bench.py --mode=train
  python -m arjax bench --config=configs/xar_cpu_bench.py --mode=sample

The official code hard-codes ImageNet's layout (`/work/shared/golden/README_xar.md`, "Hard-coded
layout"): a 16 x 16 latent of 16 channels (L = 256), 4 entities of 8 x 8 tokens, 1001 class rows,
encoder width = decoder width, head dim % 4 == 0. configs/digits_xar.py (16 tokens of dim 4) cannot
be built there, hence this preset: 64 x 64 one-channel images cut into 4 x 4 patches give the
same 16 x 16 tokens of dim 16 (the patchify tokenizer: no VAE timed on either side, exactly as
the official training, which is fed cached latents), 1000 classes (1001-row table, label 1000 =
null, as the official). Encoder and decoder 256 wide, 4 + 4 AdaLN blocks, 8 heads (head dim 32),
GEGLU MLP ratio 4 (hidden int(256 * 4 * 2/3) = 682 on both sides), no dropout, label drop 0.1;
train batch 32, AdamW (0.9, 0.96), weight decay 0.02, grad clip 1.0, EMA (main_mar.py's
optimizer settings); sampling 4 images, Euler-Maruyama 10 steps per entity, CFG 3.0 on xAR's
linear ramp over the entities (or 1.0).

Variant ':smoke' shrinks the model for tests of the preset's plumbing.
"""
import os

from arjax.config import schema as configs


def get_config(variant: str = ""):
  if variant not in ("", "smoke"):
    raise ValueError(f"configs/xar_cpu_bench.py has no variant {variant!r}; known: 'smoke'")
  here = os.path.dirname(__file__)
  config = configs.load(os.path.join(here, "digits_xar.py"))

  config.data.image_size = 64
  config.data.channels = 1
  config.data.num_classes = 1000
  config.tokenizer.patch_size = 4  # 16 x 16 tokens of 4 * 4 * 1 = 16 values

  m = config.model
  m.width = 256
  m.encoder_depth = m.decoder_depth = 4
  m.encoder_heads = m.decoder_heads = 8
  m.mlp_ratio = 4.0
  m.entity, m.entity_k = "cell", 8  # xAR's 4 cells of 8 x 8 tokens
  m.t_mean, m.t_std = 0.0, 1.0
  m.label_drop = 0.1
  m.attention_dropout = m.dropout = 0.0
  m.dtype = "float32"

  t = config.train
  t.global_batch_size = 32
  t.weight_decay = 0.02
  t.adam_b1, t.adam_b2 = 0.9, 0.96
  t.grad_clip_norm = 1.0

  s = config.sample
  s.solver = "euler_maruyama"
  # 4 images x 10 steps: 4 entities x 10 calls of 2 x 4 rows x 64 tokens, about the token
  # passes of one train step (16 x 20 would be 6.7x a train step, ~30 s a call on this machine).
  s.batch_size = s.num_images = 4
  s.num_steps = 10
  s.cfg_scale = 3.0
  s.cfg_schedule = "linear"
  s.temperature = 1.0

  if variant == "smoke":
    m.width = 48
    m.encoder_depth = m.decoder_depth = 1
    m.encoder_heads = m.decoder_heads = 2
    t.global_batch_size = 4
    s.batch_size = s.num_images = 2
    # At least 3: with 2 the official sampler's last step reuses the loop's i == 0 and
    # re-fills its KV cache (a 192-vs-256 key mismatch at the next entity).
    s.num_steps = 3
  return config
