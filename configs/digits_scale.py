"""Next-scale AR (FlowAR) on the bundled 8x8 digits: the scale family's CPU recipe.

  python -m arjax train --config=configs/digits_scale.py --workdir=workdirs/digits_scale
  python -m arjax sample --config=configs/digits_scale.py --workdir=workdirs/digits_scale
  python -m arjax eval --config=configs/digits_scale.py --workdir=workdirs/digits_scale

Same data, tokenizer (2x2 patches: a 4x4 map of 16 tokens of dim 4), optimizer, head and
evaluation as configs/digits.py. The map's pyramid is its doubling scales 1, 2, 4 (FlowAR's
rule: 21 tokens in 3 scales), each scale generated at once by FlowAR's flow Transformer over the
whole scale given the backbone's z for its tokens (`model.flow_net='scale'`), so a digit takes 3
backbone calls (the causal default: 16).
Variants: ':smoke' (seconds, for tests), ':hybrid' (M-VAR's intra-scale attention + linear
inter-scale mixer instead of block-causal attention), ':hybrid_smoke'.
"""
import os

import ml_collections

from arjax.config import schema as configs

VARIANTS = ("", "smoke", "hybrid", "hybrid_smoke")


def scale_model(width, depth, heads, *, scales=(), mixer="attention", dtype="float32"):
  """config.model for the scale family."""
  m = ml_collections.ConfigDict()
  m.family = "scale"
  m.width = width
  m.depth = depth
  m.num_heads = heads
  m.mlp_ratio = 4.0
  # Sides of the scales, coarse to fine; the last is the token map's side. () = doubling.
  m.scales = tuple(scales)
  # Scale k's AR input is scale k-1 up-sampled: 'nearest' or 'bilinear'.
  m.upsample = "nearest"
  # 'attention' (FlowAR's block-causal Transformer) or 'hybrid' (M-VAR).
  m.mixer = mixer
  # Chunk length of the hybrid's linear attention (training form).
  m.chunk_size = 64
  # 'token': the flow head draws each token alone given its z; 'scale': FlowAR's flow
  # Transformer over a whole scale (config.head's width / depth), its tokens drawn jointly.
  m.flow_net = "token"
  m.flow_heads = 4
  # Share of labels replaced by the null class in training (CFG).
  m.label_drop = 0.1
  m.attention_dropout = 0.1
  m.dropout = 0.1
  m.scan_layers = False
  m.remat = "none"
  m.dtype = dtype
  return m


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"configs/digits_scale.py has no variant {variant!r}; known: {VARIANTS[1:]}")
  smoke = variant.endswith("smoke")
  mixer = "hybrid" if variant.startswith("hybrid") else "attention"
  config = configs.load(os.path.join(os.path.dirname(__file__),
                                     "digits.py:smoke" if smoke else "digits.py"))
  s = config.sample
  # 'linear': CFG ramps over the scales, 1 -> cfg_scale at the finest.
  s.cfg_schedule = "linear"
  if smoke:
    config.model = scale_model(32, 2, 2, scales=(1, 2, 4), mixer=mixer)
    config.model.attention_dropout = config.model.dropout = 0.0
    config.model.flow_net, config.model.flow_heads = "scale", 2
    config.head.batch_mul = 2
  else:
    # 4 blocks (the causal default has 6): the head sees 21 tokens per digit instead of 16, and
    # 4 blocks keep the step at the causal default's cost (~34 GFLOP).
    config.model = scale_model(128, 4, 4, scales=(1, 2, 4), mixer=mixer)
    # FlowAR's flow Transformer per scale: 2 blocks 128 wide (4 heads). Drawn one token at a
    # time given z (flow_net='token', the 3 x 128 MLP head), the 16 tokens of the finest scale
    # came out speckled: FD 12.4, precision 0.873, recall 0.796 (README, Results).
    config.model.flow_net = "scale"
    # The scale the README's figures were measured with (digits.py's causal recipe uses 2.0).
    s.cfg_scale = 1.6
    config.head.depth = 2
    # 2 draws per image: each draw is a whole scale of tokens (the per-token head's 4 draws
    # per token would double the head's cost).
    config.head.batch_mul = 2
  return config
