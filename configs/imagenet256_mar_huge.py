"""MAR-H on ImageNet 256x256: MAR-B's recipe (configs/imagenet256_mar_base.py) at the huge size.

Encoder/decoder 1280 wide, 20 blocks, 16 heads; DiffLoss 12 x 1536; linear CFG 3.2 (FID 1.55).
"""
import os

from arjax import configs


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"configs/imagenet256_mar_huge.py has no variant {variant!r}")
  return configs.load(os.path.join(os.path.dirname(__file__), "imagenet256_mar_base.py:huge"))
