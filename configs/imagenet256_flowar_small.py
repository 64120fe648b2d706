"""FlowAR on ImageNet 256x256 with the KL-16 VAE: the scale family at FlowAR's sizes.

FlowAR (Ren et al. 2024, "Scale-wise Autoregressive Image Generation Meets Flow Matching")
reports FID 3.61 / 2.90 / 1.90 / 1.65 for FlowAR-S / B / L / H with CFG, at about 170M / 300M /
589M / 1.9B parameters; SIZES below are sized to those counts (describe: 170M / 300M / 586M /
1.91B, the 52M flow net included, the VAE not).

From the paper: the scales are the doubling sides 1, 2, 4, 8, 16 of an off-the-shelf VAE's
16 x 16 latent (here MAR's KL-16, 16 channels: the scale pyramid of
arjax/families/scale/pyramid.py, area-averaged), the AR input of a scale is the up-sampled
previous scale, block-causal attention over the concatenated scales, class conditioning,
flow matching per scale conditioned on the Transformer's output for that scale, CFG.

arjax's choices (the paper's exact widths, depths, optimizer and head were not available
offline when this was written; `python -m arjax describe` gives the sizes these make):
width / depth / heads per size in SIZES below; the per-scale flow Transformer with spatially
adaptive AdaLN (`model.flow_net='scale'`, arjax/families/scale/flow_net.py) at 768 x 6 for every
size (FlowAR's flow-net sizes were not available); AdaLN on
the class in every block; learned position and scale embeddings; nearest-neighbour
up-sampling; the MAR-like optimizer of configs/imagenet256.py (batch 1024, lr 8e-4 constant after
10k warmup steps, AdamW b2 0.95, EMA 0.9999); 50 Heun steps per token, CFG on MAR's linear
ramp (over the scales here).

  python -m arjax describe --config=configs/imagenet256_flowar_small.py
  python -m arjax train --config=configs/imagenet256_flowar_base.py --workdir=/gcs/BUCKET/flowar_b
      --config.tokenizer.checkpoint=weights/kl16

Hardware variants (`:v5p-32`, `:v5p-128`, `:h100x8`; arjax/config/hardware.py) set the mesh and
bf16 compute. Variant `hybrid` of any size (`imagenet256_flowar_base.py:hybrid`) switches to
M-VAR's intra-scale attention + linear inter-scale mixer (`model.mixer='hybrid'`).
"""
import os

import ml_collections

from arjax.config import schema as configs
from arjax.config import hardware

# name -> (width, depth, heads, CFG scale): arjax's choice, at the paper's parameter counts.
SIZES = {
    "small": (768, 11, 12, 3.0),
    "base": (1024, 13, 16, 3.0),
    "large": (1280, 18, 16, 3.0),
    "huge": (1792, 32, 28, 3.0),
}


def flowar_imagenet256(size: str, mixer: str = "attention"):
  here = os.path.dirname(__file__)
  config = configs.load(os.path.join(here, "imagenet256.py"))
  digits = configs.load(os.path.join(here, "digits_scale.py"))  # field templates
  width, depth, heads, cfg = SIZES[size]

  config.tokenizer = type(config.tokenizer)()
  config.tokenizer.name = "kl_vae"
  # MAR's kl16.ckpt (or a directory written by `python -m arjax convert`); required.
  config.tokenizer.checkpoint = ml_collections.config_dict.placeholder(str)
  config.tokenizer.architecture = "kl16"
  config.tokenizer.patch_size = 1
  config.tokenizer.latent_scale = 0.2325
  config.tokenizer.sample_posterior = True

  config.model = digits.model
  m = config.model
  m.width, m.depth, m.num_heads = width, depth, heads
  m.scales = (1, 2, 4, 8, 16)  # FlowAR's
  m.mixer = mixer
  m.chunk_size = 64
  m.attention_dropout = m.dropout = 0.0
  m.dtype = "bfloat16"
  # FlowAR's flow Transformer over each scale (spatially adaptive AdaLN): 768 wide, 6 blocks,
  # 12 heads, 4 draws per image (arjax's choice).
  m.flow_net, m.flow_heads = "scale", 12
  h = config.head
  h.width, h.depth, h.batch_mul, h.dropout = 768, 6, 4, 0.0

  s = config.sample
  s.cfg_scale = cfg
  s.cfg_schedule = "linear"
  s.num_steps = 50
  s.solver = "heun"
  s.temperature = 1.0
  return config


def get_config(variant: str = ""):
  """variant: '' (small), 'hybrid' (M-VAR mixer), a size of SIZES or '<size>_hybrid' (what the
  other sizes' files load), or a hardware variant of FlowAR-S (arjax.config.hardware)."""
  size, _, hybrid = variant.partition("_")
  if variant == "hybrid":
    return flowar_imagenet256("small", "hybrid")
  if size in SIZES and hybrid in ("", "hybrid"):
    return flowar_imagenet256(size, "hybrid" if hybrid else "attention")
  return hardware.hardware_variant(flowar_imagenet256("small"), variant,
                                   "configs/imagenet256_flowar_small.py",
                                   other_variants=("hybrid", *SIZES))
