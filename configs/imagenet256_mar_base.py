"""MAR-B on ImageNet 256x256 with the KL-16 VAE: the published recipe (FID 2.31 with CFG).

Li et al. 2024, github.com/LTH14/mar (main_mar.py defaults + README commands):
encoder and decoder 768 wide, 12 blocks, 12 heads; DiffLoss MLP 6 blocks x 1024;
batch 2048, blr 1e-4 (lr = blr * 2048 / 256 = 8e-4), constant lr after 100 warmup epochs,
400 epochs, AdamW (0.9, 0.95), weight decay 0.02, grad clip 3.0, EMA 0.9999,
diffusion_batch_mul 4, label drop 0.1, buffer 64, mask ratio >= 0.7; sampling 256
iterations, linear CFG 2.9, temperature 1.0, 100 DDPM steps.

Needs the KL-16 weights (`kl16.ckpt` from MAR's release, or its arjax conversion):
  python -m arjax convert --source=kl16.ckpt --out=weights/kl16
  python -m arjax train --config=configs/imagenet256_mar_base.py \\
      --config.tokenizer.checkpoint=weights/kl16 --workdir=/gcs/BUCKET/mar_base

Not reproduced: MAR's attention/projection dropout (0.1 in training), see the MAR notes in
README.md. The large and huge configs change only the sizes and the CFG scale.

Hardware variants (`:v5p-32`, `:v5p-128`, `:h100x8`; arjax/config/hardware.py says why each mesh)
set the mesh, bf16 compute and a batch that fits; see docs/presets.md for the figures:
  python -m arjax describe --config=configs/imagenet256_mar_base.py:v5p-32
"""
import os

import ml_collections

from arjax.config import schema as configs
from arjax.config import hardware

# 1,281,167 ImageNet train images / 2048 per batch.
STEPS_PER_EPOCH = 626

# Global batch per hardware variant where the recipe's 2048 does not fit (the rule in
# arjax/config/hardware.py): 64 images per device, 0.86 GiB of saved activations each.
BATCH_ON_HARDWARE = {"v5p-32": 1024, "h100x8": 512}

# name -> (width, depth, heads, head width, head depth, sampling cfg)
SIZES = {
    "base": (768, 12, 12, 1024, 6, 2.9),
    "large": (1024, 16, 16, 1280, 8, 3.0),
    "huge": (1280, 20, 16, 1536, 12, 3.2),
}
# name -> the paper's row that `eval` prints beside the numbers (arjax.evaluation.paper_metrics)
PAPER_ROWS = {"base": "MAR-B", "large": "MAR-L", "huge": "MAR-H"}


def mar_imagenet256(size: str):
  here = os.path.dirname(__file__)
  config = configs.load(os.path.join(here, "imagenet256.py"))
  mar_model = configs.load(os.path.join(here, "digits_mar.py")).model  # field template
  width, depth, heads, head_width, head_depth, cfg = SIZES[size]

  config.tokenizer = type(config.tokenizer)()
  config.tokenizer.name = "kl_vae"
  # Weights: MAR's kl16.ckpt (read without running its pickle), its state dict as
  # .safetensors / .npz, or a directory written by `python -m arjax convert`. Required.
  # A typed placeholder (None until set) so `--config.tokenizer.checkpoint=...` can set it.
  config.tokenizer.checkpoint = ml_collections.config_dict.placeholder(str)
  config.tokenizer.architecture = "kl16"
  config.tokenizer.patch_size = 1
  config.tokenizer.latent_scale = 0.2325
  # MAR trains on posterior samples (mean + std * noise), samples decode the token as is.
  config.tokenizer.sample_posterior = True

  config.model = mar_model
  config.model.encoder_width = config.model.decoder_width = width
  config.model.encoder_depth = config.model.decoder_depth = depth
  config.model.encoder_heads = config.model.decoder_heads = heads
  config.model.buffer_size = 64
  config.model.mask_ratio_min = 0.7   # MAR's law: N(1, 0.25) truncated to [0.7, 1]
  config.model.mask_ratio_std = 0.25
  config.model.mask_buckets = 4
  config.model.dtype = "bfloat16"
  config.model.attention_dropout = 0.1  # MAR's attn_dropout and proj_dropout (main_mar.py)
  config.model.dropout = 0.1

  config.head = type(config.head)()
  config.head.name = "mar_diffusion"
  config.head.width = head_width
  config.head.depth = head_depth
  config.head.batch_mul = 4
  config.head.dropout = 0.0  # MAR's DiffLoss has none
  config.head.num_timesteps = 1000
  config.head.noise_schedule = "cosine"

  t = config.train
  t.global_batch_size = 2048
  t.learning_rate = 8e-4
  t.schedule = "constant"
  t.warmup_steps = 100 * STEPS_PER_EPOCH
  t.num_steps = 400 * STEPS_PER_EPOCH
  t.weight_decay = 0.02
  t.adam_b1, t.adam_b2 = 0.9, 0.95
  t.grad_clip_norm = 3.0
  t.ema_decay = 0.9999

  s = config.sample
  s.num_iter = 256
  s.kept_buckets = 4
  s.cfg_scale = cfg
  s.cfg_schedule = "linear"
  s.temperature = 1.0
  s.num_steps = 100  # DDPM respacing (MAR's num_sampling_steps)
  s.batch_size = 256
  config.eval.paper_row = PAPER_ROWS[size]
  return config


def get_config(variant: str = ""):
  """variant: '' (base), 'large' / 'huge' as loaded by their own config files, or a
  hardware variant of MAR-B (arjax.config.hardware.HARDWARE)."""
  if variant in SIZES:
    return mar_imagenet256(variant)
  return hardware.hardware_variant(
      mar_imagenet256("base"), variant, "configs/imagenet256_mar_base.py",
      global_batch_size=BATCH_ON_HARDWARE, other_variants=("large", "huge"))
