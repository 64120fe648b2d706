"""CIFAR-10 (32x32 RGB), class-conditional, on 4x4 pixel patches (64 tokens of dim 48).

Needs TFDS cifar10 prepared as ArrayRecord in the data dir (arjax never downloads):
  tfds build cifar10 --file_format=array_record --data_dir=$ARJAX_DATA_DIR
  python -m arjax train --config=configs/cifar10.py --workdir=workdirs/cifar10

Starts from the digits recipe and changes what differs; pixel patches stand in
until a VAE tokenizer lands.
"""
import os

from arjax.config import schema as configs


def get_config(variant: str = ""):
  config = configs.load(os.path.join(os.path.dirname(__file__), "digits.py"))
  config.data.name = "cifar10"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = True
  config.data.worker_count = 4

  config.tokenizer.patch_size = 4

  config.model.width = 512
  config.model.depth = 12
  config.model.num_heads = 8
  config.model.num_class_tokens = 8
  config.model.dtype = "bfloat16"
  config.head.width = 512
  config.head.depth = 6
  config.head.batch_mul = 4  # MAR's diffusion_batch_mul

  config.train.global_batch_size = 256
  config.train.num_steps = 200_000
  config.train.learning_rate = 4e-4
  config.train.warmup_steps = 5_000
  config.train.adam_b2 = 0.95
  config.train.ema_decay = 0.9999
  config.train.log_every = 100
  config.train.sample_every = 5_000
  config.train.checkpoint_every = 5_000
  config.train.keep_checkpoints = 3

  config.sample.num_images = 10_000
  config.sample.cfg_scale = 2.0
  config.sample.cfg_schedule = "linear"
  config.sample.num_steps = 32
  config.sample.batch_size = 500
  if variant:
    raise ValueError(f"configs/cifar10.py has no variant {variant!r}")
  return config
