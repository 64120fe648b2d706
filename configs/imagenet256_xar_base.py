"""xAR-B on ImageNet 256x256 with the KL-16 VAE: the published recipe (FID 1.72 with CFG).

Ren et al. 2025, github.com/OliverRensu/xAR (main_mar.py defaults + README commands): encoder
and decoder 768 wide, 8 blocks each, 12 heads, GEGLU MLP ratio 4; entities = 4 cells of 8 x 8
tokens on the 16 x 16 latent; Noisy Context Learning with logit-normal(0, 1) times per cell;
batch 2048, blr 5e-5 (lr = blr * 2048 / 256 = 4e-4), constant lr after 100 warmup epochs,
800 epochs, AdamW (0.9, 0.96), weight decay 0.02, grad clip 1.0, EMA 0.9999, label drop 0.1,
attention / projection dropout 0.1; sampling: Euler-Maruyama, 40 steps per cell, CFG 2.7 on
xAR's linear ramp over the cells (B; L: 50 steps, 2.3; H: 50 steps, 2.2).

Needs the KL-16 weights (`kl16.ckpt` from MAR's release, which xAR shares):
  python -m arjax convert --source=kl16.ckpt --out=weights/kl16
  python -m arjax convert --source=xAR-B.pth --out=workdirs/xar_b \\
      --config=configs/imagenet256_xar_base.py --config.tokenizer.checkpoint=weights/kl16
  python -m arjax sample --config=workdirs/xar_b/config.py --workdir=workdirs/xar_b

Hardware variants (`:v5p-32`, `:v5p-128`, `:h100x8`; arjax/config/hardware.py says why each
mesh) set the mesh, bf16 compute and a batch that fits:
  python -m arjax describe --config=configs/imagenet256_xar_base.py:v5p-32
"""
import os

import ml_collections

from arjax.config import schema as configs
from arjax.config import hardware

# 1,281,167 ImageNet train images / 2048 per batch.
STEPS_PER_EPOCH = 626

# Global batch per hardware variant where the recipe's 2048 does not fit (the rule in
# arjax/config/hardware.py; `describe` figures in docs/presets.md, "The xAR presets").
# describe: the recipe's 2048 totals 50.3 GiB per v5p chip (fits) and 100 GiB per H100.
BATCH_ON_HARDWARE = {"h100x8": 1024}

# name -> (width, depth of encoder and of decoder, heads, sampling steps, sampling cfg)
SIZES = {
    "base": (768, 8, 12, 40, 2.7),
    "large": (1024, 16, 16, 50, 2.3),
    "huge": (1280, 20, 16, 50, 2.2),
}


def xar_imagenet256(size: str):
  here = os.path.dirname(__file__)
  config = configs.load(os.path.join(here, "imagenet256.py"))
  digits = configs.load(os.path.join(here, "digits_xar.py"))  # field templates
  width, depth, heads, num_steps, cfg = SIZES[size]

  config.tokenizer = type(config.tokenizer)()
  config.tokenizer.name = "kl_vae"
  # Weights: MAR's kl16.ckpt, its state dict as .safetensors / .npz, or a directory written
  # by `python -m arjax convert`. Required; a typed placeholder so the command line can set it.
  config.tokenizer.checkpoint = ml_collections.config_dict.placeholder(str)
  config.tokenizer.architecture = "kl16"
  config.tokenizer.patch_size = 1
  config.tokenizer.latent_scale = 0.2325
  config.tokenizer.sample_posterior = True

  config.model = digits.model
  m = config.model
  m.width = width
  m.encoder_depth = m.decoder_depth = depth
  m.encoder_heads = m.decoder_heads = heads
  m.mlp_ratio = 4.0
  # xAR's released layout: 4 cells of 8 x 8 latent tokens (`clusterify`).
  m.entity, m.entity_k = "cell", 8
  m.t_mean, m.t_std = 0.0, 1.0
  m.label_drop = 0.1
  m.attention_dropout = m.dropout = 0.1
  m.dtype = "bfloat16"
  config.head = digits.head  # 'none': the backbone is the flow model

  t = config.train
  t.global_batch_size = 2048
  t.learning_rate = 5e-5 * 2048 / 256
  t.schedule = "constant"
  t.warmup_steps = 100 * STEPS_PER_EPOCH
  t.num_steps = 800 * STEPS_PER_EPOCH
  t.weight_decay = 0.02
  t.adam_b1, t.adam_b2 = 0.9, 0.96
  t.grad_clip_norm = 1.0
  t.ema_decay = 0.9999

  s = config.sample
  s.solver = "euler_maruyama"
  s.num_steps = num_steps
  s.cfg_scale = cfg
  s.cfg_schedule = "linear"
  s.cfg_interval = (0.0, 1.0)
  s.temperature = 1.0
  s.batch_size = 256
  # The published row `eval` prints beside the numbers (arjax.evaluation.paper_metrics).
  config.eval.paper_row = f"xAR-{size[0].upper()}"
  return config


def get_config(variant: str = ""):
  """variant: '' (base), 'large' / 'huge' as loaded by their own config files, or a
  hardware variant of xAR-B (arjax.config.hardware.HARDWARE)."""
  if variant in SIZES:
    return xar_imagenet256(variant)
  return hardware.hardware_variant(
      xar_imagenet256("base"), variant, "configs/imagenet256_xar_base.py",
      global_batch_size=BATCH_ON_HARDWARE, other_variants=("large", "huge"))
