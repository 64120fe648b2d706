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

Files are read by `arjax.weights.state_dict.load_checkpoint`: `.npz` (allow_pickle=False),
`.safetensors` (if the `safetensors` package is installed), or a PyTorch `.pth`/`.ckpt` zip
through arjax's restricted unpickler (`arjax.weights.torch_zip`: no torch needed; a pickle that
names anything but tensors and plain containers is refused). Nested dicts become
`<group>/<name>` keys: MAR's kl16.ckpt is {'model': state_dict}, read with prefix="model/".
A directory is an Orbax checkpoint of the already-converted Flax params tree. `load_vae_params`
reads all three and is what `config.tokenizer.checkpoint` goes through.
"""
import os
import re
from typing import Mapping, Sequence

import jax
import numpy as np

from arjax.weights import state_dict as state_dict_lib
from arjax.tokenizers import kl_vae

_INDEXED = re.compile(r"^(.*)_(\d+)$")
# LDM-trained checkpoints carry their training loss (discriminator, LPIPS) beside the autoencoder.
LDM_LOSS_PREFIXES = ("loss.",)


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


def state_dict_from_vae_params(params) -> dict:
  """The inverse of `vae_params_from_state_dict`: Flax params -> PyTorch-named numpy state dict
  (e.g. to write a `.npz` that `load_vae_params` reads back)."""
  state_dict = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    flax_path = tuple(p.key for p in path)
    value = np.asarray(jax.device_get(leaf))
    if flax_path[-1] == "kernel":
      value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW.
    state_dict[_torch_name(flax_path)] = value
  return state_dict


def load_state_dict(path, prefix: str = "") -> dict:
  """Reads `{name: np.ndarray}` from a checkpoint file; never unpickles arbitrary code.

  Only keys starting with `prefix` are kept, with the prefix removed (e.g. prefix="param/" for
  the golden files, "model/" for kl16.ckpt, or "vae." for a state dict nested in a larger
  model). Formats and refusals: `arjax.weights.state_dict.load_checkpoint`.
  """
  arrays = state_dict_lib.load_flat(path)
  return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def _params_from_orbax(path, config: kl_vae.KLVAEConfig):
  """A Flax params tree saved with Orbax `StandardSave` (as `python -m arjax convert` writes it),
  checked key by key against the module's own tree like a state dict."""
  import orbax.checkpoint as ocp  # Only directories need Orbax.

  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(os.path.abspath(os.fspath(path)))
  expected = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(kl_vae.param_shapes(config))[0]:
    expected["/".join(p.key for p in key_path)] = (
        tuple(p.key for p in key_path), tuple(leaf.shape), leaf.dtype)
  given = {"/".join(str(getattr(p, "key", p)) for p in key_path): leaf
           for key_path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]}
  # Already Flax-laid-out: kernels pass through unchanged.
  return state_dict_lib.to_params(given, expected, what=f"VAE params do not match {config}",
                                  kernel_layout=lambda w: w)


def load_vae_params(path, config: kl_vae.KLVAEConfig = kl_vae.KLVAEConfig(), prefix: str = "",
                    ignore_prefixes: Sequence[str] = ()):
  """The one entry point for VAE weights, whatever form they come in:

    a directory                 an Orbax checkpoint of the Flax params tree (StandardSave), as
                                `python -m arjax convert` writes it; `prefix` does not apply
    .npz / .safetensors file    a PyTorch `AutoencoderKL.state_dict()`, converted here
    .ckpt / .pth file           the same (restricted unpickler, no torch); a release file nesting it
                                as {'model': state_dict} (kl16.ckpt) is unwrapped, its `loss.*`
                                weights (the LDM training loss) left out

  Every failure names `path`: FileNotFoundError if nothing is there, ValueError listing each
  missing, unexpected or mis-shaped parameter if the weights are not `config`'s.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no VAE weights there (expected a .ckpt/.pth, .npz or "
                            ".safetensors state dict, or a directory written by "
                            "`python -m arjax convert`)")
  try:
    if os.path.isdir(path):
      return _params_from_orbax(path, config)
    state_dict = load_state_dict(path, prefix)
    if not prefix and state_dict and all(k.startswith("model/") for k in state_dict):
      # An LDM/MAR release file such as kl16.ckpt: {'model': state_dict}, whose state dict
      # also carries the training loss's weights (LPIPS, discriminator): not the autoencoder.
      state_dict = {k[len("model/"):]: v for k, v in state_dict.items()}
      ignore_prefixes = tuple(ignore_prefixes) + LDM_LOSS_PREFIXES
    return vae_params_from_state_dict(state_dict, config, ignore_prefixes)
  except (ValueError, KeyError) as e:
    raise ValueError(f"{path}: {e}") from e
