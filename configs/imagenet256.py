"""ImageNet 256x256, class-conditional, on 16x16 pixel patches (256 tokens of dim 768).

Needs TFDS imagenet2012 prepared as ArrayRecord in the data dir (manual download;
arjax never downloads). A TPU pod or GPU cluster job; on one machine it is a
config to validate and inspect:
  python -m arjax train --config=configs/imagenet256.py --workdir=/gcs/BUCKET/imagenet256

Pixel patches stand in until the KL-16 VAE tokenizer lands (then 16x16 latents of dim 16).

Hardware variants (`:v5p-32`, `:v5p-128`, `:h100x8`; arjax/config/hardware.py says why each mesh)
set the mesh, bf16 compute and a batch that fits; see docs/presets.md for the figures:
  python -m arjax describe --config=configs/imagenet256.py:v5p-32
"""
import os

from arjax.config import schema as configs
from arjax.config import hardware

# Global batch per hardware variant where the recipe's 1024 does not fit (the rule in
# arjax/config/hardware.py): 64 images per GPU, 0.73 GiB of saved activations each.
BATCH_ON_HARDWARE = {"h100x8": 512}


def get_config(variant: str = ""):
  config = configs.load(os.path.join(os.path.dirname(__file__), "digits.py"))
  config.data.name = "imagenet2012"
  config.data.eval_split = "validation"
  config.data.image_size = 256
  config.data.channels = 3
  config.data.num_classes = 1000
  config.data.random_flip = True
  config.data.worker_count = 16

  config.tokenizer.patch_size = 16

  # MAR-B-like widths; FSDP over the batch devices.
  config.model.width = 768
  config.model.depth = 24
  config.model.num_heads = 12
  config.model.num_class_tokens = 16
  config.model.dtype = "bfloat16"
  config.head.width = 1024
  config.head.depth = 6
  config.head.batch_mul = 4  # MAR's diffusion_batch_mul

  config.train.global_batch_size = 1024
  config.train.num_steps = 500_000
  config.train.learning_rate = 8e-4
  config.train.warmup_steps = 10_000
  config.train.schedule = "constant"
  config.train.adam_b2 = 0.95
  config.train.ema_decay = 0.9999
  config.train.log_every = 100
  config.train.sample_every = 10_000
  config.train.checkpoint_every = 5_000
  config.train.keep_checkpoints = 3
  config.mesh.shape = (1, -1, 1)

  config.sample.num_images = 50_000
  config.sample.cfg_scale = 3.0
  config.sample.cfg_schedule = "linear"
  config.sample.num_steps = 50
  config.sample.batch_size = 256

  # The papers' protocol: 50,000 samples on the FID Inception-v3 against ADM's reference batch
  # (VIRTUAL_imagenet256_labeled.npz: mu/sigma of the train set, 10,000 images for
  # precision/recall); set --config.eval.inception=DIR --config.eval.reference=FILE.
  config.eval.metrics = "inception"
  config.eval.batch_size = 256
  return hardware.hardware_variant(config, variant, "configs/imagenet256.py",
                                   global_batch_size=BATCH_ON_HARDWARE)
