"""FlowAR-B on ImageNet 256x256: configs/imagenet256_flowar_small.py's recipe at the
base size (its docstring says which settings are the paper's and which are arjax's choice).

  python -m arjax describe --config=configs/imagenet256_flowar_base.py
  python -m arjax describe --config=configs/imagenet256_flowar_base.py:hybrid   # M-VAR mixer

Hardware variants (`:v5p-32`, `:v5p-128`, `:h100x8`; arjax/config/hardware.py) set the mesh and
bf16 compute.
"""
import os

from arjax.config import schema as configs
from arjax.config import hardware


def get_config(variant: str = ""):
  small = os.path.join(os.path.dirname(__file__), "imagenet256_flowar_small.py")
  if variant == "hybrid":
    return configs.load(small + ":base_hybrid")
  return hardware.hardware_variant(configs.load(small + ":base"), variant,
                                   "configs/imagenet256_flowar_base.py",
                                   other_variants=("hybrid",))
