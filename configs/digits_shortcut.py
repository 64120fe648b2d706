"""The digits recipes with FAR's few-step shortcut head (arjax/heads/shortcut.py).

  python -m arjax train --config=configs/digits_shortcut.py --workdir=workdirs/digits_shortcut
  python -m arjax sample --config=configs/digits_shortcut.py --workdir=workdirs/digits_shortcut \
      --config.sample.num_steps=2
  python -m arjax train --config=configs/digits_shortcut.py:mar --workdir=workdirs/mar_shortcut

Variants: '' (causal, configs/digits.py), 'mar' (configs/digits_mar.py), and 'smoke' /
'mar_smoke' (their smoke sizes, for tests).
"""
import os

import ml_collections

from arjax.config import schema as configs

VARIANTS = {"": "digits.py", "smoke": "digits.py:smoke", "mar": "digits_mar.py",
            "mar_smoke": "digits_mar.py:smoke"}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"configs/digits_shortcut.py has no variant {variant!r}; known: "
                     f"{sorted(v for v in VARIANTS if v)}")
  config = configs.load(os.path.join(os.path.dirname(__file__), VARIANTS[variant]))
  config.head.name = "shortcut"
  if variant == "":
    # The settings docs/fast_sampling.md was measured with (digits.py's recipe now draws 2
    # per token at CFG 2.0): the consistency share below is one of 4 draws.
    config.head.batch_mul = 4
    config.sample.cfg_scale = 1.6
  # Share of each token's batch_mul draws trained on self-consistency (two half steps = one
  # full step), as Frans et al. (2024): 1/4, one of the 4 draws of a token.
  config.head.shortcut_fraction = 0.25
  # Consistency step sizes 1/2 .. 1/128; the 1/128 half steps query the flow velocity (d = 0).
  config.head.shortcut_levels = 7
  # Shortcut steps per token at sampling (the head's whole cost: one evaluation each).
  config.sample.num_steps = 1 if variant.endswith("smoke") else 2
  return config
