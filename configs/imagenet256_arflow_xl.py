"""ARFlow-XL/2 dims on ImageNet 256x256 with the KL-16 VAE: the arflow family's ImageNet preset.

ARFlow ("Autoregressive Flow with Hybrid Linear Attention"; code github.com/TheFllood/ARFlow,
models.py `ARFlow_XL_2`): 28 adaLN-Zero blocks 1152 wide, 18 heads (head dim 64), tanh-GELU MLP
ratio 4, gated retention with gate_logit_normalizer 16, label dropout 0.1; 5 same-class images
per training sequence (its loader's n = 5) at uniform times sorted along the sequence; AdamW
lr 1e-4, betas (0.9, 0.95), weight decay 0.02, EMA 0.9999; sampling: SiT's Euler-Maruyama SDE,
250 steps, the last one its mean (t = 0.04 -> 0), CFG on every step.

Resolution: the paper's headline (FID 4.34 with CFG 1.5) is ImageNet 128 on the SD VAE, whose
16 x 16 x 4 latents at patch 2 give 64 tokens an image. arjax has no SD-VAE tokenizer; it has
MAR's KL-16, so this preset is set at **256 x 256**, where KL-16's 16 x 16 x 16 latents at
patch 1 give 256 tokens of dim 16 -- exactly the sequence ARFlow-XL/2 sees at 256 px on the SD
VAE (32 x 32 x 4 latents, patch 2: 256 tokens of 2 * 2 * 4 = 16). The network, its FLOPs and
memory are ARFlow-XL/2's at 256; the latent space is not (no official weights load into it).
CFG 1.5 is the paper's ImageNet-128 setting (sample.py's default is 4.5); the official code
(after DiT) guides 3 of the SD VAE's 4 latent channels, arjax the whole velocity.

Batch and length: the official script's defaults (--global-batch-size 8 sequences, 1400
epochs) are placeholders, not a recipe; this preset uses 256 sequences = 1280 images a step
(SiT-XL's 256 items) for 400k steps with a 10k-step warmup, arjax's choice.
Needs the KL-16 weights (`kl16.ckpt` from MAR's release):
  python -m arjax convert --source=kl16.ckpt --out=weights/kl16
  python -m arjax describe --config=configs/imagenet256_arflow_xl.py
"""
import os

from arjax.config import schema as configs

# ARFlow-XL/2: width, depth, heads.
WIDTH, DEPTH, HEADS = 1152, 28, 18
GROUP_SIZE = 5


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"configs/imagenet256_arflow_xl.py has no variant {variant!r}")
  here = os.path.dirname(__file__)
  config = configs.load(os.path.join(here, "imagenet256.py"))
  digits = configs.load(os.path.join(here, "digits_arflow.py"))  # field templates
  # MAR's KL-16 (latent scale 0.2325, posterior samples, patch 1) as the xAR presets use it;
  # tokenizer.checkpoint a typed placeholder for the weights (`python -m arjax convert`).
  config.tokenizer = configs.load(os.path.join(here, "imagenet256_xar_base.py")).tokenizer
  # Same-class training sequences of 5 images (the pipeline groups them; a multiple of 5 a batch).
  config.data.group_size = GROUP_SIZE
  config.data.random_flip = True
  config.model = digits.model
  m = config.model
  m.width, m.depth, m.num_heads = WIDTH, DEPTH, HEADS
  m.mlp_ratio = 4.0
  m.gate_normalizer = 16.0
  m.label_drop = 0.1
  m.attention_dropout = m.dropout = 0.0
  m.dtype = "bfloat16"
  m.scan_layers = True
  m.remat = "dots_no_batch"
  config.head = digits.head  # 'none': the backbone is the flow model
  t = config.train
  t.global_batch_size = 256 * GROUP_SIZE
  t.learning_rate = 1e-4
  t.schedule = "constant"
  t.warmup_steps = 10_000
  t.num_steps = 400_000
  t.weight_decay = 0.02
  t.adam_b1, t.adam_b2 = 0.9, 0.95
  t.grad_clip_norm = 1.0
  t.ema_decay = 0.9999
  s = config.sample
  s.solver = "euler_maruyama"
  s.num_steps = 250
  s.cfg_scale = 1.5
  s.cfg_schedule = "constant"
  s.cfg_interval = (0.0, 1.0)
  s.temperature = 1.0
  s.batch_size = 256
  config.eval.paper_row = ""
  return config
