"""xAR-H on ImageNet 256x256: xAR-B's recipe (configs/imagenet256_xar_base.py) at the huge size.

Encoder/decoder 1280 wide, 20 blocks each, 16 heads; 50 Euler-Maruyama steps per cell, linear CFG 2.2 (FID 1.24).

Hardware variants (`:v5p-32`, `:v5p-128`, `:h100x8`; arjax/config/hardware.py says why each mesh)
set the mesh, bf16 compute and a batch that fits:
  python -m arjax describe --config=configs/imagenet256_xar_huge.py:v5p-32
"""
import os

from arjax.config import schema as configs
from arjax.config import hardware

# Global batch per hardware variant where the recipe's 2048 does not fit (the rule in
# arjax/config/hardware.py).
# describe totals per device: v5p-32 50.6 GiB at 512, v5p-128 50.6 GiB at 2048, H100 52 GiB
# at 256.
BATCH_ON_HARDWARE = {"v5p-32": 512, "h100x8": 256}


def get_config(variant: str = ""):
  config = configs.load(os.path.join(os.path.dirname(__file__), "imagenet256_xar_base.py:huge"))
  return hardware.hardware_variant(config, variant, "configs/imagenet256_xar_huge.py",
                                   global_batch_size=BATCH_ON_HARDWARE)
