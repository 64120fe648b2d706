"""ARFlow (autoregressive flow over same-class image sequences, gated retention across images)
on the bundled 8x8 digits: the arflow family's CPU recipe.

  python -m arjax train --config=configs/digits_arflow.py --workdir=workdirs/digits_arflow
  python -m arjax sample --config=configs/digits_arflow.py --workdir=workdirs/digits_arflow
  python -m arjax eval --config=configs/digits_arflow.py --workdir=workdirs/digits_arflow

Same data, tokenizer (2x2 patches: 16 tokens of dim 4 per image), optimizer and evaluation as
configs/digits.py. A training example is a sequence of config.data.group_size = 5 digits of
one class (ARFlow's n = 5; the input pipeline groups them), each noised at its own time: 5
uniform draws sorted descending, the noisiest digit first. train.global_batch_size counts
images (a multiple of 5). The network is ARFlow's (arjax/families/arflow): DiT blocks with
adaLN-Zero, softmax attention inside a digit, gated retention across the digits; it is the flow
model itself (config.head.name='none'). Sampling: the published Euler-Maruyama SDE, each step
one autoregressive step (the current image fed against the state of the earlier steps), CFG as
published (constant, every step) in the smoke variant; the recipe ramps it over the steps.
Variant ':smoke' (seconds, for tests: 4 images per sequence).

Measured against the embedded default's quality bar (README's Results, 2026-12-08): 3000 steps
without dropout meet four of the five bars; recall stays at 0.846 (0.85 asked).
"""
import os

import ml_collections

from arjax.config import schema as configs

# ARFlow's images per training sequence (its loader's n = 5).
GROUP_SIZE = 5


def arflow_model(width, depth, heads, *, dtype="float32"):
  """config.model for the arflow family."""
  m = ml_collections.ConfigDict()
  m.family = "arflow"
  m.width = width
  m.depth = depth
  m.num_heads = heads
  # The tanh-GELU MLP's hidden width is mlp_ratio * width (DiT's 4).
  m.mlp_ratio = 4.0
  # Log-gates log_sigmoid(.) / 16, ARFlow's gate_logit_normalizer: a slow decay across images.
  m.gate_normalizer = 16.0
  # Share of sequences whose label is replaced by the null class in training (ARFlow's 0.1).
  m.label_drop = 0.1
  # Dropout of the blocks' residual branches in training; the retention has no attention
  # dropout (attention_dropout must stay 0).
  m.attention_dropout = 0.0
  m.dropout = 0.0
  m.scan_layers = False
  m.remat = "none"
  m.dtype = dtype
  return m


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant not in ("", "smoke"):
    raise ValueError(f"configs/digits_arflow.py has no variant {variant!r}; known: 'smoke'")
  smoke = variant == "smoke"
  config = configs.load(os.path.join(os.path.dirname(__file__),
                                     "digits.py:smoke" if smoke else "digits.py"))
  config.head = ml_collections.ConfigDict({"name": "none"})  # the backbone is the flow model
  s = config.sample
  # The published sampler: Euler-Maruyama on t = linspace(1, 0.04, num_steps) then 0.
  s.solver = "euler_maruyama"
  # CFG as published: one scale at every step.
  s.cfg_schedule = "constant"
  s.cfg_interval = (0.0, 1.0)
  s.temperature = 1.0
  if smoke:
    config.data.group_size = 4
    config.model = arflow_model(32, 2, 2)
    config.train.global_batch_size = 16  # 4 sequences of 4
    s.num_steps = 3
  else:
    config.data.group_size = GROUP_SIZE
    config.model = arflow_model(128, 4, 4)
    config.train.global_batch_size = 160  # 32 sequences of 5
    # 2000 steps with dropout 0.1 under-fitted (precision 0.890, recall 0.759, memorisation
    # 0.112: README's Results); no dropout and 3000 steps.
    config.train.num_steps = 3000
    config.train.eval_every = 500
    s.num_steps = 50
    # Measured (README's Results, 2026-12-08), the closest of the settings tried: CFG ramped
    # over the SDE steps (1 -> 1.5) at temperature 1.05: FD 10.13, precision 0.901, recall
    # 0.846 (the bar asks 0.85), consistency 0.992. Constant 1.5 as published: precision 0.926,
    # recall 0.768.
    s.cfg_scale = 1.5
    s.cfg_schedule = "linear"
    s.temperature = 1.05
  return config
