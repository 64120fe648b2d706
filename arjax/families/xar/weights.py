"""The official xAR state_dict (models/xar.py `xAR`) -> `XarBackbone` parameters.

Every key of an official `state_dict()` (what eval.py loads from the released xAR-B/L/H.pth) is
accounted for, and every missing, unexpected and mis-shaped key is named, all in one ValueError:

  * `Linear.weight` (out, in) -> `kernel` (in, out), `*.bias` -> `bias`, RMSNorm `weight` ->
    `scale`, `class_emb.weight` -> `class_emb/embedding`; `name.<i>` -> `name_<i>`
    (`encoder_blocks.3` -> `encoder_blocks_3`, `time_embed.mlp.0` -> `time_embed/mlp_0`), and
    each block's `ada_lin.1` (the Linear after the SiLU of nn.Sequential) -> `ada_lin`;
  * the fused `attn.qkv` (weight (3W, W), bias (3W,)): rows [0:W] q, [W:2W] k, [2W:3W] v, head h
    the rows h*hd:(h+1)*hd of each, -> `attn/{query,key,value}` kernels (W, H, hd); `attn.proj`
    (W, W) -> kernel (H, hd, W) (heads are concatenated before proj);
  * `*_pos_embed_learned` (1, L, W) lose the leading 1 (rows stay in sequence order);
  * the persistent buffers `mask` (1, 1, L, L) and each attention's `attn.rope.freqs`,
    `freqs_cos`, `freqs_sin`: deterministic functions of the entity layout, so they are checked
    against the layout arjax builds (`official_mask`, `official_rope_tables`) and dropped; a file whose buffers
    differ was made for another layout, and saying so beats sampling garbage.
"""
import re
from typing import Any, Dict, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arjax.families.xar.backbone import XarBackbone
from arjax.families.xar.entities import EntityLayout, official_layout
from arjax.layers import transformer as layers
from arjax.weights import state_dict as state_dict_lib

_QKV = ("query", "key", "value")
_INDEXED = re.compile(r"^(.*_blocks|mlp)_(\d+)$")
_BUFFER_ATOL = 1e-5


def backbone_from_config(config: Mapping[str, Any], **overrides) -> XarBackbone:
  """The `XarBackbone` of xAR's constructor arguments (or a dict holding them under
  `xAR_kwargs`, as a golden file's config_json does): the official layout, 4 cells of
  (grid/2)^2 tokens on the img_size / vae_stride / patch_size grid."""
  kw = config.get("xAR_kwargs", config)
  grid = kw["img_size"] // kw["vae_stride"] // kw["patch_size"]
  if kw["encoder_embed_dim"] != kw["decoder_embed_dim"]:
    raise ValueError("xAR needs encoder_embed_dim == decoder_embed_dim (its decoder blocks take "
                     f"the encoder-width condition); got {kw['encoder_embed_dim']} and "
                     f"{kw['decoder_embed_dim']}")
  return XarBackbone(
      layout=official_layout(grid), token_dim=kw["vae_embed_dim"] * kw["patch_size"] ** 2,
      width=kw["encoder_embed_dim"], encoder_depth=kw["encoder_depth"],
      encoder_heads=kw["encoder_num_heads"], decoder_depth=kw["decoder_depth"],
      decoder_heads=kw["decoder_num_heads"], mlp_ratio=kw.get("mlp_ratio", 4.0),
      # The class table has 1000 + 1 rows whatever class_num says; row 1000 is the null class.
      num_classes=1000, **overrides)


def official_mask(layout: EntityLayout) -> np.ndarray:
  """xAR's `mask` buffer (1, 1, L, L) float32: 0 where a query's entity is at or after the
  key's (block-causal), -inf elsewhere."""
  ids = np.repeat(np.arange(layout.num_entities), layout.size)
  return np.where(ids[None, :] <= ids[:, None], 0.0, -np.inf).astype(np.float32)[None, None]


def official_rope_tables(layout: EntityLayout, head_dim: int) -> Dict[str, np.ndarray]:
  """{'freqs', 'freqs_cos', 'freqs_sin'} of VisionRotaryEmbeddingFast for `layout`, float32 as
  xAR builds them: angles [row * f | column * f], each frequency twice (interleaved pairs),
  rows in sequence order."""
  dim = head_dim // 2
  freqs = (1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float32)[: dim // 2] / dim))
           ).astype(np.float32)
  grid = layout.grid_positions().astype(np.float32)
  angle = lambda p: np.repeat(p[:, None] * freqs[None], 2, axis=-1)  # f0 f0 f1 f1 ...
  angles = np.concatenate([angle(grid[:, 0]), angle(grid[:, 1])], axis=-1).astype(np.float32)
  return {"freqs": freqs, "freqs_cos": np.cos(angles), "freqs_sin": np.sin(angles)}


def _torch_name(flax_path: Sequence[str]) -> str:
  """('encoder_blocks_0', 'ada_lin', 'kernel') -> 'encoder_blocks.0.ada_lin.1.weight'."""
  parts = []
  for part in flax_path[:-1]:
    match = _INDEXED.match(part)
    parts += [match.group(1), match.group(2)] if match else [part]
    if part == "ada_lin":
      parts.append("1")
  leaf = flax_path[-1]
  parts.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf))
  return ".".join(parts)


def _torch_shape(flax_path: Sequence[str], shape: tuple) -> tuple:
  name = flax_path[-1]
  if name == "kernel":
    if flax_path[-2] == "proj":  # (H, hd, W) -> torch (W, H * hd)
      return (shape[2], shape[0] * shape[1])
    return (int(np.prod(shape[1:])), shape[0])  # (in, *out) -> (out, in)
  if name.endswith("_pos_embed_learned"):
    return (1,) + tuple(shape)
  return (int(np.prod(shape)),) if flax_path[-2:-1] in [(q,) for q in _QKV] else tuple(shape)


def _expected(model: XarBackbone):
  """({torch name: (flax path, torch shape, dtype)}, {flax path: flax shape})."""
  length = model.seq_len
  entities = model.layout.num_entities
  variables = nn.meta.unbox(jax.eval_shape(
      model.init, jax.random.PRNGKey(0), jnp.zeros((1, length, model.token_dim)),
      jnp.zeros((1,), jnp.int32), jnp.zeros((1, entities))))
  expected, flax_shapes = {}, {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
    flax_path = tuple(p.key for p in path)
    flax_shapes[flax_path] = tuple(leaf.shape)
    torch_shape = _torch_shape(flax_path, tuple(leaf.shape))
    if len(flax_path) > 1 and flax_path[-2] in _QKV:  # one fused torch key for the three projections
      fused = flax_path[:-2] + ("qkv", flax_path[-1])
      expected[_torch_name(fused)] = (fused, (3 * torch_shape[0],) + torch_shape[1:], leaf.dtype)
    else:
      expected[_torch_name(flax_path)] = (flax_path, torch_shape, leaf.dtype)
  return expected, flax_shapes


def _buffer_problems(state_dict, model: XarBackbone):
  """(the buffer keys, one line per missing, mis-shaped or mis-valued buffer)."""
  wanted = {}
  for part, depth, heads in (("encoder", model.encoder_depth, model.encoder_heads),
                             ("decoder", model.decoder_depth, model.decoder_heads)):
    tables = official_rope_tables(model.layout, model.width // heads)
    for i in range(depth):
      for name in ("freqs", "freqs_cos", "freqs_sin"):
        wanted[f"{part}_blocks.{i}.attn.rope.{name}"] = tables[name]
  wanted["mask"] = official_mask(model.layout)
  problems = []
  for key, value in sorted(wanted.items()):
    if key not in state_dict:
      problems.append(f"  missing: {key}")
      continue
    given = np.asarray(state_dict[key], np.float32)
    if given.shape != value.shape:
      problems.append(f"  mis-shaped: {key}: got {given.shape}, expected {value.shape}")
    elif not np.allclose(given, value, rtol=0, atol=_BUFFER_ATOL):  # -inf == -inf is close
      problems.append(f"  mis-valued buffer: {key}: not the table of {model.layout} "
                      f"(max |diff| {np.nanmax(np.abs(np.where(np.isinf(value), 0, given - value))):.3g})")
  return set(wanted), problems


def _split_qkv_and_reshape(tree, flax_shapes, path=()):
  out = {}
  for key, value in tree.items():
    if key == "qkv":
      for leaf_name, fused in value.items():
        for proj, part in zip(_QKV, jnp.split(fused, 3, axis=-1)):
          out.setdefault(proj, {})[leaf_name] = part.reshape(flax_shapes[path + (proj, leaf_name)])
    elif isinstance(value, dict):
      out[key] = _split_qkv_and_reshape(value, flax_shapes, path + (key,))
    else:
      out[key] = value.reshape(flax_shapes[path + (key,)])
  return out


def backbone_params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                                    model: XarBackbone) -> dict:
  """The (unboxed) params of `model` (unrolled or scanned) from an official xAR state dict.

  Raises ValueError naming every missing, unexpected, mis-shaped (and mis-valued buffer) key."""
  unrolled = model.clone(scan_layers=False, parent=None)
  buffers, problems = _buffer_problems(state_dict, unrolled)
  given = {k: v for k, v in state_dict.items() if k not in buffers}
  expected, flax_shapes = _expected(unrolled)
  what = (f"xAR state_dict does not match XarBackbone(width={model.width}, encoder "
          f"{model.encoder_depth} blocks ({model.encoder_heads} heads), decoder "
          f"{model.decoder_depth} blocks ({model.decoder_heads} heads), {model.seq_len} tokens "
          f"of dim {model.token_dim}, {model.num_classes} + 1 classes)")
  try:
    params = state_dict_lib.to_params(given, expected, what=what, kernel_layout=lambda w: w.T)
  except ValueError as e:
    raise ValueError("\n".join([str(e)] + problems)) from None
  if problems:
    raise ValueError("\n".join([what + ":"] + problems))
  params = _split_qkv_and_reshape(params, flax_shapes)
  if model.scan_layers:
    for name, depth in (("encoder_blocks", model.encoder_depth),
                        ("decoder_blocks", model.decoder_depth)):
      params = layers.stack_unrolled_blocks(params, name, depth, name)
  return params

