"""MAR-L on ImageNet 256x256: MAR-B's recipe (configs/imagenet256_mar_base.py) at the large size.

Encoder/decoder 1024 wide, 16 blocks, 16 heads; DiffLoss 8 x 1280; linear CFG 3.0 (FID 1.78).
"""
import os

from arjax import configs


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"configs/imagenet256_mar_large.py has no variant {variant!r}")
  return configs.load(os.path.join(os.path.dirname(__file__), "imagenet256_mar_base.py:large"))
