"""Random FID Inception weights for tests that need the network but not its trained weights.

The distributions are the golden files' (README_inception.md): He-uniform convs and BatchNorm
statistics near identity keep activations O(1) through all 94 convs, so features differ from
image to image as a trained network's do (a careless init collapses them to a constant).
"""
import os

import numpy as np

from arjax.evaluation import inception


def random_state_dict(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  bounds = {"bn.weight": (0.75, 1.25), "bn.bias": (-0.25, 0.25),
            "bn.running_mean": (-0.25, 0.25), "bn.running_var": (0.5, 1.5),
            "fc.bias": (-1.0, 1.0)}
  sd = {}
  for name, shape in inception.state_dict_shapes().items():
    kind = ".".join(name.split(".")[-2:])
    if kind in bounds:
      lo, hi = bounds[kind]
    else:  # conv.weight, fc.weight
      a = np.sqrt((6.0 if len(shape) == 4 else 3.0) / np.prod(shape[1:]))
      lo, hi = -a, a
    sd[name] = rng.uniform(lo, hi, shape).astype(np.float32)
  return sd


def random_params(seed: int = 0) -> dict:
  return inception.params_from_state_dict(random_state_dict(seed))


def write_random_params(directory: str, seed: int = 0) -> str:
  """A directory as `convert --kind=inception` writes it (the params file only)."""
  os.makedirs(directory)
  inception.save_params(os.path.join(directory, "fid_inception_v3.npz"), random_params(seed))
  return directory
