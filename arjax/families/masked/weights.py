"""PyTorch MAR encoder/decoder state_dict -> `MarBackbone` parameters.

Covers every key of a MAR `state_dict()` outside `diffloss.` (that prefix is
`arjax.heads.mar_mlp_weights`'s). Names: the Flax tree of `arjax.families.masked.backbone.MarBackbone`
mirrors the PyTorch module tree with `name.<int>` (ModuleList index) merged into
`name_<int>`. Leaves:

  * `Linear.weight` (out, in) -> `kernel` (in, out) (transposed), `*.bias` -> `bias`,
    `LayerNorm.weight` -> `scale`, `class_emb.weight` -> `class_emb/embedding`;
  * timm's fused `attn.qkv` (weight (3D, D), bias (3D,)) is split into
    `attn/{query,key,value}`: rows [0:D] = q, [D:2D] = k, [2D:3D] = v (timm reshapes the
    qkv output to (B, N, 3, H, D/H)), each kernel reshaped to (D, H, D/H) so head h is
    columns h*D/H:(h+1)*D/H; `attn.proj.weight` (D, D) -> kernel (H, D/H, D) (timm
    concatenates the heads before proj);
  * `fake_latent` (1, D), `mask_token` (1, 1, D), `*_pos_embed_learned` (1, N, D) lose their
    leading 1s.

The module's dimensions come from the MAR constructor arguments (`config`); the expected
key set and shapes then come from the module itself (`jax.eval_shape` of its init), so every
missing, unexpected or mis-shaped key is reported by name, all in one ValueError.
"""
import functools
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arjax.weights import state_dict as state_dict_lib
from arjax.families.masked.backbone import MarBackbone

_INDEXED = re.compile(r"^(.*_blocks)_(\d+)$")
_HEAD_PREFIX = "diffloss."
_QKV = ("query", "key", "value")


def backbone_from_config(config: Mapping[str, Any]) -> MarBackbone:
  """The `MarBackbone` of MAR's constructor arguments (models/mar.py `MAR.__init__`).

  `config` is MAR's kwargs (img_size, vae_stride, patch_size, encoder_embed_dim, ...), or a
  dict holding them under `MAR_kwargs` (a golden file's config_json). LayerNorm eps is
  `norm_layer_eps` when given, else 1e-6 (what mar_base/large/huge pass).
  """
  kw = config.get("MAR_kwargs", config)
  seq_side = kw["img_size"] // kw["vae_stride"] // kw["patch_size"]
  return MarBackbone(
      seq_len=seq_side * seq_side,
      token_dim=kw["vae_embed_dim"] * kw["patch_size"] ** 2,
      encoder_embed_dim=kw["encoder_embed_dim"], encoder_depth=kw["encoder_depth"],
      encoder_num_heads=kw["encoder_num_heads"],
      decoder_embed_dim=kw["decoder_embed_dim"], decoder_depth=kw["decoder_depth"],
      decoder_num_heads=kw["decoder_num_heads"],
      num_classes=kw.get("class_num", 1000), buffer_size=kw.get("buffer_size", 64),
      mlp_ratio=kw.get("mlp_ratio", 4.0), norm_eps=kw.get("norm_layer_eps", 1e-6))


def _torch_name(flax_path: Sequence[str]) -> str:
  """('encoder_blocks_0', 'mlp', 'fc1', 'kernel') -> 'encoder_blocks.0.mlp.fc1.weight'."""
  parts = []
  for part in flax_path[:-1]:
    match = _INDEXED.match(part)
    parts += [match.group(1), match.group(2)] if match else [part]
  leaf = flax_path[-1]
  parts.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf))
  return ".".join(parts)


def _torch_shape(flax_path: Sequence[str], shape: tuple) -> tuple:
  """The PyTorch shape of the tensor that becomes this Flax leaf."""
  name = flax_path[-1]
  if name == "kernel":
    if flax_path[-2] == "proj":  # (H, Dh, D) -> torch (D, H*Dh).
      return (shape[2], shape[0] * shape[1])
    return (int(np.prod(shape[1:])), shape[0])  # (in, *out) -> torch (out, in).
  if flax_path == ("fake_latent",) or flax_path[-1].endswith("_pos_embed_learned"):
    return (1,) + tuple(shape)
  if flax_path == ("mask_token",):
    return (1, 1) + tuple(shape)
  if name == "bias" and flax_path[-2] in _QKV:
    return (int(np.prod(shape)),)
  return tuple(shape)


def _expected(model: MarBackbone):
  """({torch name: (flax path, torch shape, dtype)}, {flax path: flax shape})."""
  init = functools.partial(model.init, num_kept=model.seq_len)  # num_kept is static.
  variables = nn.meta.unbox(jax.eval_shape(
      init, jax.random.PRNGKey(0), jnp.zeros((1, model.seq_len, model.token_dim)),
      jnp.zeros((1, model.seq_len), bool), jnp.zeros((1,), jnp.int32)))
  expected, flax_shapes = {}, {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
    flax_path = tuple(p.key for p in path)
    flax_shapes[flax_path] = tuple(leaf.shape)
    torch_shape = _torch_shape(flax_path, tuple(leaf.shape))
    if len(flax_path) >= 2 and flax_path[-2] in _QKV:
      # The three projections come from one fused torch key: 'attn.qkv.*' of shape (3D, ...).
      fused_path = flax_path[:-2] + ("qkv", flax_path[-1])
      name = _torch_name(fused_path)
      fused_shape = (3 * torch_shape[0],) + torch_shape[1:]
      expected[name] = (fused_path, fused_shape, leaf.dtype)
      continue
    expected[_torch_name(flax_path)] = (flax_path, torch_shape, leaf.dtype)
  return expected, flax_shapes


def _split_qkv_and_reshape(tree, flax_shapes, path=()):
  """Splits every `qkv` node into query/key/value and reshapes leaves to the module's shapes."""
  out = {}
  for key, value in tree.items():
    if key == "qkv":
      for leaf_name, fused in value.items():
        # kernel: torch W.T is (D, 3D), columns [0:D] q, [D:2D] k, [2D:3D] v; bias (3D,).
        parts = jnp.split(fused, 3, axis=-1)
        for proj, part in zip(_QKV, parts):
          target = flax_shapes[path + (proj, leaf_name)]
          out.setdefault(proj, {})[leaf_name] = part.reshape(target)
    elif isinstance(value, dict):
      out[key] = _split_qkv_and_reshape(value, flax_shapes, path + (key,))
    else:
      out[key] = value.reshape(flax_shapes[path + (key,)])
  return out


def backbone_params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                                    config: Mapping[str, Any]):
  """Maps MAR's encoder/decoder weights (exact PyTorch names, numpy arrays) to Flax params.

  Args:
    state_dict: name -> array, e.g. a full MAR `state_dict()`; `diffloss.*` keys are the
      head's (see `arjax.heads.mar_mlp_weights`) and ignored here, every other key must map.
    config: MAR constructor arguments (see `backbone_from_config`).
  Returns:
    The (unboxed) `params` tree for `backbone_from_config(config)`, i.e.
    `MarBackbone(...).apply({"params": params}, x, mask, labels, num_kept)`.
  Raises:
    ValueError naming every missing, unexpected and mis-shaped key.
  """
  model = backbone_from_config(config)
  given = {k: v for k, v in state_dict.items() if not k.startswith(_HEAD_PREFIX)}
  expected, flax_shapes = _expected(model)
  dims = (f"MarBackbone(seq_len={model.seq_len}, token_dim={model.token_dim}, "
          f"encoder={model.encoder_embed_dim}x{model.encoder_depth} "
          f"({model.encoder_num_heads} heads), decoder={model.decoder_embed_dim}x"
          f"{model.decoder_depth} ({model.decoder_num_heads} heads), "
          f"num_classes={model.num_classes}, buffer_size={model.buffer_size})")
  # torch Linear (out, in) -> flax (in, out); the (in, out) kernels are then reshaped to the
  # DenseGeneral shapes, and the fused qkv split, by `_split_qkv_and_reshape`.
  params = state_dict_lib.to_params(
      given, expected, what=f"MAR backbone state_dict (keys outside {_HEAD_PREFIX!r}) "
      f"does not match {dims}", kernel_layout=lambda w: w.T)
  return _split_qkv_and_reshape(params, flax_shapes)
