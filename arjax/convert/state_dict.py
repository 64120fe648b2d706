"""Matching a PyTorch state dict against the parameters a Flax module expects.

Every importer goes through `to_params`, so all of them refuse a mismatched
checkpoint the same way: one ValueError listing every missing, unexpected and
mis-shaped key by name; nothing is skipped silently.
"""
from typing import Callable, Mapping, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

# torch name -> (flax path, expected torch shape, dtype)
Expected = Mapping[str, Tuple[Sequence[str], tuple, object]]


def to_params(given: Mapping[str, np.ndarray], expected: Expected, *, what: str,
              kernel_layout: Callable[[np.ndarray], np.ndarray], key_prefix: str = "") -> dict:
  """The nested Flax params tree; `kernel_layout` turns a torch weight into a Flax kernel.

  `what` names the model in the error; `key_prefix` is prepended to key names in it.
  """
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  misshaped = sorted(
      f"{key_prefix}{k}: got {tuple(np.shape(given[k]))}, expected {tuple(expected[k][1])}"
      for k in set(given) & set(expected) if tuple(np.shape(given[k])) != tuple(expected[k][1]))
  if missing or unexpected or misshaped:
    lines = [f"{what}:"]
    lines += [f"  missing: {key_prefix}{k}" for k in missing]
    lines += [f"  unexpected: {key_prefix}{k}" for k in unexpected]
    lines += [f"  mis-shaped: {k}" for k in misshaped]
    raise ValueError("\n".join(lines))

  params = {}
  for name, (flax_path, _, dtype) in expected.items():
    value = np.asarray(given[name])
    if flax_path[-1] == "kernel":
      value = kernel_layout(value)
    node = params
    for part in flax_path[:-1]:
      node = node.setdefault(part, {})
    node[flax_path[-1]] = jnp.asarray(value, dtype=dtype)
  return params
