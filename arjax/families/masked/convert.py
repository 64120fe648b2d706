"""MAR's release files -> the masked family: what `python -m arjax convert --kind=mar` uses.

A MAR checkpoint (main_mar.py's `checkpoint-last.pth`: {'model', 'model_ema', 'optimizer',
'epoch', 'scaler', 'args'}) becomes params <- 'model', ema_params <- 'model_ema' of a
`config.model.family='mar'` workdir (written by arjax/convert/official.py). The config is the
user's (default configs/imagenet256_mar_base.py) with the fields the checkpoint's own `args`
determine (model size, buffer, DiffLoss size, classes, ...; see `config_from_mar_args`) taken
from them; every dimension the weights show is then checked against it, and a mismatch names
the config field and the key that disagree. Attention head counts are invisible in the
weights: they come from args.model (mar_base/large/huge) or the config.

The key-by-key mapping is the backbone's (arjax/families/masked/weights.py) and the DiffLoss
head's (arjax/heads/mar_mlp_weights.py); this module puts them together for one checkpoint.
"""
import math
import os
import pathlib
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from arjax.errors import ConfigError
from arjax.families.masked.weights import backbone_params_from_state_dict
from arjax.heads.mar_mlp_weights import diffloss_params_from_state_dict
from arjax.layers import transformer as layers
from arjax.weights import converter
from arjax.weights.state_dict import CheckpointError, num_indexed

# What MAR's released models are checked against when no --config is given.
DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[3] / "configs"
                     / "imagenet256_mar_base.py")

# models/mar.py factories: name -> (embed dim, depth, heads), encoder and decoder alike.
MAR_MODELS = {
    "mar_base": (768, 12, 12),
    "mar_large": (1024, 16, 16),
    "mar_huge": (1280, 20, 16),
}

# main_mar.py argument / MAR constructor keyword -> config field it sets.
_ARG_FIELDS = (
    ("encoder_embed_dim", "model.encoder_width"),
    ("encoder_depth", "model.encoder_depth"),
    ("encoder_num_heads", "model.encoder_heads"),
    ("decoder_embed_dim", "model.decoder_width"),
    ("decoder_depth", "model.decoder_depth"),
    ("decoder_num_heads", "model.decoder_heads"),
    ("mlp_ratio", "model.mlp_ratio"),
    ("norm_layer_eps", "model.norm_eps"),
    ("buffer_size", "model.buffer_size"),
    ("mask_ratio_min", "model.mask_ratio_min"),
    ("label_drop_prob", "model.label_drop"),
    ("class_num", "data.num_classes"),
    ("diffloss_d", "head.depth"),
    ("diffloss_w", "head.width"),
    ("diffusion_batch_mul", "head.batch_mul"),
    ("ema_rate", "train.ema_decay"),
    ("grad_clip", "train.grad_clip_norm"),
    ("weight_decay", "train.weight_decay"),
)
# Only meaningful with MAR's own tokenizer: a pixel-patch config keeps its geometry.
_VAE_ARG_FIELDS = (
    ("img_size", "data.image_size"),
    ("patch_size", "tokenizer.patch_size"),
)


# -----------------------------------------------------------------------------
# The config.


def _get(config, field: str):
  node = config
  for part in field.split("."):
    if part not in node:
      return KeyError
    node = node[part]
  return node


def _set(config, field: str, value) -> None:
  section, _, name = field.rpartition(".")
  node = config
  for part in section.split("."):
    node = node[part]
  node[name] = value


def config_from_mar_args(config, args: Mapping[str, Any]):
  """(config copy with the fields MAR's training `args` determine, ['field=value (args.x)'...]).

  `args` is vars() of main_mar.py's argparse Namespace, or MAR constructor kwargs. args.model
  (mar_base/large/huge) gives widths, depths and heads; explicit constructor kwargs
  (encoder_embed_dim, ...) override it. Image size and patch size are taken only for MAR's own
  tokenizer (config.tokenizer.name='kl_vae'). Sampling settings stay the config's: MAR's args
  hold the training run's online-eval defaults (e.g. cfg=1.0), not the published ones.
  Fields the config does not have are left alone.
  """
  config = config.copy_and_resolve_references()
  values: Dict[str, Tuple[Any, str]] = {}
  size = MAR_MODELS.get(args.get("model"))
  if size is not None:
    for part in ("encoder", "decoder"):
      for field, value in zip(("width", "depth", "heads"), size):
        values[f"model.{part}_{field}"] = (value, f"args.model={args['model']!r}")
  fields = _ARG_FIELDS
  if _get(config, "tokenizer.name") == "kl_vae":
    fields += _VAE_ARG_FIELDS
  for arg, field in fields:
    if args.get(arg) is not None:
      values[field] = (args[arg], f"args.{arg}")
  derived = []
  for field, (value, source) in values.items():
    current = _get(config, field)
    if current is KeyError:
      continue
    if isinstance(current, (bool, int, float)) and not isinstance(value, bool):
      value = type(current)(value)
    if value != current:
      _set(config, field, value)
      derived.append(f"config.{field}={value!r} ({source})")
  return config, derived


def _tokenizer_fields(config) -> str:
  t = config.tokenizer
  extra = ("config.tokenizer.architecture" if t.name == "kl_vae" else "config.data.channels")
  return f"config.data.image_size, config.tokenizer.patch_size, {extra}"


def check_fits_config(state_dict: Mapping[str, np.ndarray], config, tokenizer) -> None:
  """Raises ValueError naming each config field whose value the weights contradict.

  Each line: the field, its value, what the weights say and the key(s) that say it. Keys the
  file lacks are left to the key-by-key match that follows (which names them).
  """
  problems = []
  m, h = config.model, config.head
  if m.family != "mar":
    problems.append(f"config.model.family={m.family!r}: a MAR checkpoint needs 'mar'")
  if h.name != "mar_diffusion":
    problems.append(f"config.head.name={h.name!r}: a MAR checkpoint holds a DiffLoss MLP; "
                    "use 'mar_diffusion'")
  shape = lambda k: tuple(np.shape(state_dict[k])) if k in state_dict else None

  def expect(field, configured, found, evidence):
    if found is not None and configured != found:
      problems.append(f"config.{field}={configured!r}, the checkpoint has {found!r} ({evidence})")

  z_proj, diff_pos = shape("z_proj.weight"), shape("diffusion_pos_embed_learned")
  enc_pos, dec_embed = shape("encoder_pos_embed_learned"), shape("decoder_embed.weight")
  if m.family == "mar":
    if z_proj:
      expect("model.encoder_width", m.encoder_width, z_proj[0], f"z_proj.weight {z_proj}")
    if dec_embed:
      expect("model.decoder_width", m.decoder_width, dec_embed[0],
             f"decoder_embed.weight {dec_embed}")
    for part in ("encoder", "decoder"):
      expect(f"model.{part}_depth", m[f"{part}_depth"],
             num_indexed(state_dict, f"{part}_blocks."), f"{part}_blocks.<i>.* keys")
    fc1 = shape("encoder_blocks.0.mlp.fc1.weight")
    if fc1 and z_proj:
      expect("model.mlp_ratio", float(m.mlp_ratio), fc1[0] / z_proj[0],
             f"encoder_blocks.0.mlp.fc1.weight {fc1}")
    if enc_pos and diff_pos:
      expect("model.buffer_size", m.buffer_size, enc_pos[1] - diff_pos[1],
             f"encoder_pos_embed_learned {enc_pos} minus diffusion_pos_embed_learned {diff_pos}")
  class_emb = shape("class_emb.weight")
  if class_emb:
    expect("data.num_classes", config.data.num_classes, class_emb[0],
           f"class_emb.weight {class_emb}")
  if h.name == "mar_diffusion":
    net = "diffloss.net."
    proj = shape(net + "input_proj.weight")
    if proj:
      expect("head.width", h.width, proj[0], f"{net}input_proj.weight {proj}")
    expect("head.depth", h.depth, num_indexed(state_dict, net + "res_blocks."),
           f"{net}res_blocks.<i>.* keys")
  if diff_pos and z_proj and (diff_pos[1], z_proj[1]) != (tokenizer.num_tokens,
                                                          tokenizer.token_dim):
    problems.append(
        f"the config's tokenizer ({_tokenizer_fields(config)}) gives {tokenizer.num_tokens} "
        f"tokens of dim {tokenizer.token_dim}, the checkpoint {diff_pos[1]} of dim {z_proj[1]} "
        f"(diffusion_pos_embed_learned {diff_pos}, z_proj.weight {z_proj})")
  if problems:
    raise ValueError("the checkpoint does not fit the config (fix these fields, e.g. "
                     "--config.model.encoder_width=..., or pick another --config):\n  "
                     + "\n  ".join(problems))


# -----------------------------------------------------------------------------
# Weights.


def _mar_kwargs(backbone) -> dict:
  """MAR constructor kwargs describing an arjax `MarBackbone` (for the backbone converter)."""
  side = math.isqrt(backbone.seq_len)
  if side * side != backbone.seq_len:
    raise ValueError(f"MAR checkpoints need a square token grid, the config gives "
                     f"{backbone.seq_len} tokens")
  return dict(img_size=side, vae_stride=1, patch_size=1, vae_embed_dim=backbone.token_dim,
              encoder_embed_dim=backbone.encoder_embed_dim, encoder_depth=backbone.encoder_depth,
              encoder_num_heads=backbone.encoder_num_heads,
              decoder_embed_dim=backbone.decoder_embed_dim, decoder_depth=backbone.decoder_depth,
              decoder_num_heads=backbone.decoder_num_heads, class_num=backbone.num_classes,
              buffer_size=backbone.buffer_size, mlp_ratio=backbone.mlp_ratio,
              norm_layer_eps=backbone.norm_eps)


def mar_params(state_dict: Mapping[str, np.ndarray], model) -> dict:
  """{'backbone', 'head'} params of a `MaskedARModel` from a MAR state dict.

  Raises ValueError naming every missing, unexpected and mis-shaped key, backbone and head
  together.
  """
  errors = []
  # Each converter judges only its own keys; a 'diffloss.' key outside the net is neither's.
  strays = sorted(k for k in state_dict if k.startswith("diffloss.")
                  and not k.startswith("diffloss.net."))
  if strays:
    errors.append("MAR state dict:\n" + "\n".join(f"  unexpected: {k}" for k in strays))
  params = {}
  try:
    backbone = model.backbone
    params["backbone"] = backbone_params_from_state_dict(state_dict, _mar_kwargs(backbone))
    if backbone.scan_layers:  # MAR's per-block weights onto the scanned 'layers' axis
      for name, depth in (("encoder_blocks", backbone.encoder_depth),
                          ("decoder_blocks", backbone.decoder_depth)):
        params["backbone"] = layers.stack_unrolled_blocks(params["backbone"], name, depth, name)
  except ValueError as e:
    errors.append(str(e))
  try:
    params["head"] = diffloss_params_from_state_dict(state_dict)
  except ValueError as e:
    errors.append(str(e))
  if errors:
    raise ValueError("keys do not match the config's model\n" + "\n".join(errors))
  return params


# -----------------------------------------------------------------------------
# The converter.


class MarConverter(converter.FamilyConverter):
  """`--kind=mar`: main_mar.py's checkpoint-last.pth."""
  name = "mar"
  what = "MAR"
  groups = ("model", "model_ema")
  evidence = "z_proj.weight"
  default_config = DEFAULT_CONFIG

  def detect(self, ckpt):
    names = converter.parameter_names(ckpt)
    # MAR's ViT blocks have no AdaLN modulation: a file with `ada_lin` layers shares MAR's
    # z_proj name but is another model (xAR's).
    if any(".ada_lin." in n for n in names):
      return False
    return self.evidence in names or any(n.startswith("diffloss.") for n in names)

  def configure(self, config, ckpt, log):
    derived = []
    if ckpt.args:
      config, derived = config_from_mar_args(config, ckpt.args)
      if ckpt.args.get("model") not in MAR_MODELS and "encoder_num_heads" not in ckpt.args:
        log(f"WARNING: args.model={ckpt.args.get('model')!r} is none of {sorted(MAR_MODELS)}: "
            "attention head counts stay the config's (the weights do not show them)")
    else:
      config = config.copy_and_resolve_references()  # the caller's config is not modified
      log(f"{ckpt.path} carries no args: the config's sizes are checked against the weights; "
          "attention head counts are taken on trust")
    if _get(config, "tokenizer.name") == "kl_vae":
      path = config.tokenizer.checkpoint
      if path is None:
        # The config written beside the weights must be complete, or `sample` fails later.
        raise ConfigError(
            "config.tokenizer.checkpoint is None: convert kl16.ckpt first (python -m arjax "
            "convert --source=kl16.ckpt --out=weights/kl16) and pass "
            "--config.tokenizer.checkpoint=weights/kl16; it is recorded in the output's "
            "config.json")
      if os.path.exists(path):
        # Recorded absolute, so that `sample` on the output works from any directory.
        config.tokenizer.checkpoint = os.path.abspath(path)
    return config, derived

  def check(self, state_dict, config, tokenizer):
    check_fits_config(state_dict, config, tokenizer)

  def params(self, state_dict, model):
    return mar_params(state_dict, model)
