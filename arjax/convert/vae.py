"""PyTorch MAR/LDM `AutoencoderKL` state_dict -> arjax `KLVAETokenizer` parameters.

Names: the Flax tree of `arjax.tokenizers.kl_vae.AutoencoderKL` mirrors the PyTorch module tree
with `name.<int>` (ModuleList index) merged into `name_<int>`; `mid.block_1`/`mid.attn_1` are
plain attributes in PyTorch (models/vae.py Encoder/Decoder) and keep their names. Leaves:
`Conv2d.weight` (OIHW) -> `kernel` (HWIO, `transpose(2, 3, 1, 0)`), `GroupNorm.weight` -> `scale`,
`*.bias` -> `bias`.

The expected key set comes from the module itself (`jax.eval_shape` of its init for the given
config), so every missing, unexpected or mis-shaped key is reported by name, all in one
ValueError; nothing is silently skipped. Checkpoints that carry extra, known-irrelevant entries
(LDM's `loss.*` discriminator/LPIPS weights) must name them in `ignore_prefixes`.

Files: `.npz` (loaded with allow_pickle=False) or `.safetensors` (only if the `safetensors`
package is installed). PyTorch `.pth`/`.ckpt` pickles are refused: convert them elsewhere with
`safetensors.torch.save_file(sd, ...)` or `np.savez(path, **{k: v.numpy() ...})`.
"""
import pathlib
import re
from typing import Mapping, Sequence

import jax
import numpy as np

from arjax.convert import state_dict as state_dict_lib
from arjax.tokenizers import kl_vae

_INDEXED = re.compile(r"^(.*)_(\d+)$")


def _torch_name(flax_path: Sequence[str]) -> str:
  """('encoder', 'down_4', 'attn_0', 'q', 'kernel') -> 'encoder.down.4.attn.0.q.weight'."""
  parts = []
  for i, part in enumerate(flax_path[:-1]):
    match = _INDEXED.match(part)
    # mid.block_1 / mid.attn_1 / mid.block_2 are attribute names in PyTorch, not list indices.
    if match and not (i > 0 and flax_path[i - 1] == "mid"):
      parts += [match.group(1), match.group(2)]
    else:
      parts.append(part)
  leaf = flax_path[-1]
  parts.append({"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf])
  return ".".join(parts)


def _expected(config: kl_vae.KLVAEConfig):
  """{torch name: (flax path, torch shape, dtype)} for every parameter of the module."""
  shapes = kl_vae.param_shapes(config)
  expected = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    flax_path = tuple(p.key for p in path)
    shape = tuple(leaf.shape)
    if flax_path[-1] == "kernel":
      shape = (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW.
    expected[_torch_name(flax_path)] = (flax_path, shape, leaf.dtype)
  return expected


def vae_params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                               config: kl_vae.KLVAEConfig = kl_vae.KLVAEConfig(),
                               ignore_prefixes: Sequence[str] = ()):
  """Maps an `AutoencoderKL.state_dict()` (exact PyTorch names, numpy arrays) to Flax params.

  Args:
    state_dict: name -> array, e.g. from `load_state_dict`.
    config: the ddconfig the weights were trained with (default: MAR KL-16).
    ignore_prefixes: key prefixes deliberately dropped (e.g. ("loss.",) for LDM checkpoints).
  Returns:
    The `params` tree for `kl_vae.AutoencoderKL(config)` / `KLVAETokenizer(params, config)`.
  Raises:
    ValueError naming every missing, unexpected and mis-shaped key.
  """
  expected = _expected(config)
  given = {k: v for k, v in state_dict.items()
           if not any(k.startswith(p) for p in ignore_prefixes)}
  return state_dict_lib.to_params(
      given, expected, what=f"VAE state_dict does not match {config}",
      kernel_layout=lambda w: w.transpose(2, 3, 1, 0))  # OIHW -> HWIO.


def load_state_dict(path, prefix: str = "") -> dict:
  """Reads `{name: np.ndarray}` from a `.npz` or `.safetensors` file; never unpickles.

  Only keys starting with `prefix` are kept, with the prefix removed (e.g. prefix="param/" for
  the golden files, or "vae." for a state dict nested in a larger model).
  """
  path = pathlib.Path(path)
  if path.suffix == ".npz":
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files if k.startswith(prefix)}
  elif path.suffix == ".safetensors":
    try:
      from safetensors.numpy import load_file  # Optional dependency.
    except ImportError as e:
      raise ImportError(f"reading {path} needs the 'safetensors' package; "
                        "install it or convert the weights to .npz") from e
    arrays = {k: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
  else:
    raise ValueError(f"{path}: only .npz and .safetensors are read (PyTorch pickles such as "
                     ".pth/.ckpt are refused; re-save the state_dict as .npz or .safetensors)")
  return {k[len(prefix):]: v for k, v in arrays.items()}


def load_vae_params(path, config: kl_vae.KLVAEConfig = kl_vae.KLVAEConfig(), prefix: str = "",
                    ignore_prefixes: Sequence[str] = ()):
  """`load_state_dict` then `vae_params_from_state_dict`."""
  return vae_params_from_state_dict(load_state_dict(path, prefix), config, ignore_prefixes)
