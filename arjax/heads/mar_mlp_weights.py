"""PyTorch MAR `DiffLoss.net` (`SimpleMLPAdaLN`) state_dict -> `MarMLPAdaLN` parameters.

Names: the Flax tree of `arjax.heads.mar_mlp.MarMLPAdaLN` mirrors the PyTorch module
tree (models/diffloss.py) with `name.<int>` (ModuleList / Sequential index) merged into
`name_<int>`. Leaves: `Linear.weight` (out, in) -> `kernel` (in, out) (transposed),
`LayerNorm.weight` -> `scale`, `*.bias` -> `bias`.

The network's dimensions (C, width, z_channels, depth, learn_sigma) are read off the
state_dict itself; the expected key set then comes from the module (`jax.eval_shape` of its
init), so every missing, unexpected or mis-shaped key is reported by name, all in one
ValueError. Keys outside `prefix` belong to other parts of MAR (encoder, decoder, ...) and
are not this converter's to judge; every key inside `prefix` must map to a parameter.
"""
import re
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arjax.weights import state_dict as state_dict_lib
from arjax.heads.mar_mlp import MarMLPAdaLN

_INDEXED = re.compile(r"^(.*)_(\d+)$")


def _torch_name(flax_path: Sequence[str]) -> str:
  """('res_blocks_0', 'adaLN_modulation_1', 'kernel') -> 'res_blocks.0.adaLN_modulation.1.weight'."""
  parts = []
  for part in flax_path[:-1]:
    match = _INDEXED.match(part)
    parts += [match.group(1), match.group(2)] if match else [part]
  parts.append({"kernel": "weight", "scale": "weight", "bias": "bias"}[flax_path[-1]])
  return ".".join(parts)


def net_from_state_dict(state_dict: Mapping[str, np.ndarray], prefix: str = "diffloss.net."
                        ) -> MarMLPAdaLN:
  """The `MarMLPAdaLN` whose shapes the state_dict implies (diffloss.py constructor args)."""
  def shape(name):
    key = prefix + name
    if key not in state_dict:
      raise ValueError(f"cannot infer the DiffLoss net's dimensions: missing {key}")
    return tuple(np.shape(state_dict[key]))

  width, in_channels = shape("input_proj.weight")
  z_channels = shape("cond_embed.weight")[1]
  out_channels = shape("final_layer.linear.weight")[0]
  freq_size = shape("time_embed.mlp.0.weight")[1]
  block = re.compile(re.escape(prefix) + r"res_blocks\.(\d+)\.")
  indices = {int(m.group(1)) for k in state_dict if (m := block.match(k))}
  depth = max(indices) + 1 if indices else 0
  if out_channels not in (in_channels, 2 * in_channels):
    raise ValueError(f"{prefix}final_layer.linear.weight has {out_channels} outputs; "
                     f"expected {in_channels} or {2 * in_channels} (learn_sigma)")
  return MarMLPAdaLN(in_channels=in_channels, model_channels=width, z_channels=z_channels,
                     num_res_blocks=depth, learn_sigma=out_channels == 2 * in_channels,
                     frequency_embedding_size=freq_size)


def _expected(net: MarMLPAdaLN):
  """{torch name: (flax path, torch shape, dtype)} for every parameter of the module."""
  variables = nn.meta.unbox(jax.eval_shape(
      net.init, jax.random.PRNGKey(0), jnp.zeros((1, net.in_channels)), jnp.zeros((1,)),
      jnp.zeros((1, net.z_channels))))
  expected = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
    flax_path = tuple(p.key for p in path)
    shape = tuple(leaf.shape)
    if flax_path[-1] == "kernel":
      shape = shape[::-1]  # (in, out) -> torch (out, in).
    expected[_torch_name(flax_path)] = (flax_path, shape, leaf.dtype)
  return expected


def diffloss_params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                                    prefix: str = "diffloss.net."):
  """Maps MAR's `DiffLoss.net` weights (exact PyTorch names, numpy arrays) to Flax params.

  Args:
    state_dict: name -> array, e.g. a full MAR `state_dict()` (keys `diffloss.net.*`), or the
      net's own state_dict with `prefix=""`.
    prefix: the net's key prefix; keys without it are not part of the head and are ignored.
  Returns:
    The (unboxed) `params` tree for `net_from_state_dict(state_dict, prefix)`, i.e.
    `MarMLPAdaLN(...).apply({"params": params}, x_t, t, c)`.
  Raises:
    ValueError naming every missing, unexpected and mis-shaped key.
  """
  given = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  try:
    net = net_from_state_dict(state_dict, prefix)
  except ValueError as e:
    raise ValueError(f"DiffLoss state_dict (prefix {prefix!r}) is not a SimpleMLPAdaLN: {e}; "
                     f"keys present: {sorted(given)}") from None
  dims = (f"MarMLPAdaLN(in_channels={net.in_channels}, model_channels={net.model_channels}, "
          f"z_channels={net.z_channels}, num_res_blocks={net.num_res_blocks}, "
          f"learn_sigma={net.learn_sigma})")
  # torch Linear (out, in) -> flax Dense (in, out).
  return state_dict_lib.to_params(
      given, _expected(net), what=f"DiffLoss state_dict (prefix {prefix!r}) does not match {dims}",
      kernel_layout=lambda w: w.T, key_prefix=prefix)
