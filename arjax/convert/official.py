"""Official MAR release files -> arjax checkpoints: what `python -m arjax convert` runs.

    python -m arjax convert --source=checkpoint-last.pth --out=DIR [--config=configs/X.py]
    python -m arjax convert --source=kl16.ckpt --out=DIR        (--kind=mar|vae: else detected)

A MAR checkpoint (main_mar.py's `checkpoint-last.pth`: {'model', 'model_ema', 'optimizer',
'epoch', 'scaler', 'args'}) becomes a complete arjax workdir:

    DIR/checkpoints/<step>/state   the TrainState as `arjax.training.checkpoint.Checkpointer` writes it:
                                   params <- 'model', ema_params <- 'model_ema', a fresh
                                   optimizer state, step = the checkpoint's 'epoch' (else 0)
    DIR/config.json                the config the weights were checked against
    DIR/config.py                  loads config.json, so that
                                   `python -m arjax sample --config=DIR/config.py --workdir=DIR`
                                   samples from the imported weights unchanged

The config is `--config` (default configs/imagenet256_mar_base.py) with the fields the
checkpoint's own `args` determine (model size, buffer, DiffLoss size, classes, ...; see
`config_from_mar_args`) taken from them; every dimension the weights show is then checked
against it, and a mismatch names the config field and the key that disagree. Attention head
counts are invisible in the weights: they come from args.model (mar_base/large/huge) or the
config.

A VAE checkpoint (`kl16.ckpt`: {'model': AutoencoderKL state_dict}) becomes an Orbax checkpoint
of the Flax params tree in DIR (`ocp.StandardCheckpointer().save(DIR, params)`), which
`config.tokenizer.checkpoint=DIR` loads; DIR/arjax_vae.json records the architecture.

Files are read by `arjax.weights.state_dict.load_checkpoint` (.npz, .safetensors, or .pth/.ckpt
through arjax's restricted unpickler, torch not needed; its docstring gives the flat-file key
convention).
Nothing is skipped silently: unread entries (the optimizer state) and substitutions (one state
dict used for both params and ema_params) are reported.
"""
import dataclasses
import json
import math
import os
import pathlib
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from arjax import registry
from arjax.weights import state_dict as state_dict_lib
from arjax.weights.state_dict import CheckpointError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = str(REPO_ROOT / "configs" / "imagenet256_mar_base.py")

MAR_GROUPS = ("model", "model_ema")
# MAR's kl16.ckpt holds {'model': ...}; LDM-trained autoencoders {'state_dict': ...}.
VAE_GROUPS = ("model", "state_dict")
# LDM checkpoints carry their training loss (discriminator, LPIPS) beside the autoencoder.
VAE_IGNORED_PREFIXES = ("loss.",)

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

Log = Callable[[str], None]


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# What a file holds.


def detect_kind(ckpt: state_dict_lib.Checkpoint) -> str:
  """'mar' or 'vae', from the parameter names the file holds."""
  names = {name for sd in ckpt.state_dicts.values() for name in sd}
  if "z_proj.weight" in names or any(n.startswith("diffloss.") for n in names):
    return "mar"
  if {"encoder.conv_in.weight", "decoder.conv_out.weight"} & names:
    return "vae"
  found = ", ".join(repr(g) for g in sorted(ckpt.state_dicts)) or "none"
  raise CheckpointError(
      f"{ckpt.path}: neither a MAR (no z_proj.weight) nor a KL VAE (no encoder.conv_in.weight) "
      f"state dict; state-dict groups found: {found}. Pass --kind=mar|vae to force one")


def mar_state_dicts(ckpt: state_dict_lib.Checkpoint, log: Log = _stderr):
  """(params state dict, EMA state dict) of a MAR checkpoint; one used for both, loudly."""
  groups = {g: sd for g, sd in ckpt.state_dicts.items() if g}
  bare = ckpt.state_dicts.get("", {})
  model, ema = groups.get("model"), groups.get("model_ema")
  if bare and (model is not None or ema is not None):
    raise CheckpointError(f"{ckpt.path}: top-level arrays beside 'model'/'model_ema' "
                          f"(e.g. {sorted(bare)[:3]}); a flat file keeps each state dict under "
                          "'<group>/<name>' keys")
  if model is None and ema is None:
    if not bare:
      raise CheckpointError(f"{ckpt.path}: no 'model' or 'model_ema' state dict (groups found: "
                            f"{sorted(groups) or 'none'})")
    log(f"WARNING: {ckpt.path} holds one bare state dict, not 'model'/'model_ema': it becomes "
        "both params and ema_params")
    return bare, bare
  if model is None:
    log(f"WARNING: {ckpt.path} has no 'model' state dict: params are a copy of 'model_ema'")
    return ema, ema
  if ema is None:
    log(f"WARNING: {ckpt.path} has no 'model_ema' state dict: ema_params are a copy of 'model' "
        "(sampling with config.sample.use_ema=True uses the raw weights)")
    return model, model
  return model, ema


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


def _indices(state_dict, prefix: str) -> Optional[int]:
  """1 + the largest <i> of keys '<prefix><i>.', or None if there are none."""
  found = {int(k[len(prefix):].split(".", 1)[0]) for k in state_dict
           if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
  return max(found) + 1 if found else None


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
             _indices(state_dict, f"{part}_blocks."), f"{part}_blocks.<i>.* keys")
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
    expect("head.depth", h.depth, _indices(state_dict, net + "res_blocks."),
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


def _flat(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flat(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def mar_params(state_dict: Mapping[str, np.ndarray], exp, *, what: str = "state dict"):
  """{'backbone', 'head'} numpy params of `exp.model` from a MAR state dict, every key checked.

  Raises ValueError naming every missing, unexpected and mis-shaped key (backbone and head
  together), and every parameter of the model the weights leave unset.
  """
  from arjax.families.masked.weights import backbone_params_from_state_dict
  from arjax.heads.mar_mlp_weights import diffloss_params_from_state_dict
  from arjax.layers import transformer as layers

  errors = []
  # Each converter judges only its own keys; a 'diffloss.' key outside the net is neither's.
  strays = sorted(k for k in state_dict if k.startswith("diffloss.")
                  and not k.startswith("diffloss.net."))
  if strays:
    errors.append("MAR state dict:\n" + "\n".join(f"  unexpected: {k}" for k in strays))
  params = {}
  try:
    backbone = exp.model.backbone
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
    raise ValueError(f"{what}: keys do not match the config's model\n" + "\n".join(errors))

  abstract, _ = exp.abstract_state()
  want = {path: leaf for path, leaf in _flat(abstract.params)}
  got = {path: leaf for path, leaf in _flat(params)}
  problems = [f"  not set by the checkpoint: {'/'.join(p)}" for p in sorted(set(want) - set(got))]
  problems += [f"  not in the model: {'/'.join(p)}" for p in sorted(set(got) - set(want))]
  problems += [f"  shape: {'/'.join(p)}: weights {tuple(got[p].shape)}, model "
               f"{tuple(want[p].shape)}" for p in sorted(set(got) & set(want))
               if tuple(got[p].shape) != tuple(want[p].shape)]
  if problems:
    raise ValueError(f"{what}: converted parameters do not fit the config's model:\n"
                     + "\n".join(problems))
  out: Dict[str, Any] = {}
  for path, leaf in got.items():
    node = out
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.asarray(leaf, dtype=want[path].dtype)
  return out


def train_state(exp, params, ema_params, step: int):
  """A TrainState on `exp`'s mesh: the given weights, a fresh optimizer state, `step`."""
  import jax
  import jax.numpy as jnp
  from arjax.training.state import TrainState

  _, shardings = exp.abstract_state()
  params = jax.device_put(params, shardings.params)
  ema_params = jax.device_put(ema_params, shardings.ema_params)
  opt_state = jax.jit(exp.optimizer.init, out_shardings=shardings.opt_state)(params)
  _, state_rng = jax.random.split(jax.random.PRNGKey(exp.config.seed))  # as train_state.create
  return TrainState(step=jax.device_put(jnp.asarray(step, jnp.int32), shardings.step),
                    nonfinite_streak=jax.device_put(jnp.zeros((), jnp.int32),
                                                    shardings.nonfinite_streak),
                    params=params, ema_params=ema_params, opt_state=opt_state,
                    rng=jax.device_put(state_rng, shardings.rng))


# -----------------------------------------------------------------------------
# Writing.

_CONFIG_PY = '''"""The config `python -m arjax convert` checked the imported weights against.

    python -m arjax sample --config={dir}/config.py --workdir={dir}

Loads config.json beside this file (edit that, or override fields on the command line).
"""
import os

from arjax.config import schema as configs


def get_config():
  return configs.load_json(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.json"))
'''


def write_config(config, out: str) -> str:
  """DIR/config.json (the config) and DIR/config.py (loads it for --config=); returns the .py."""
  with open(os.path.join(out, "config.json"), "w") as f:
    f.write(config.to_json(indent=2) + "\n")
  path = os.path.join(out, "config.py")
  with open(path, "w") as f:
    f.write(_CONFIG_PY.format(dir=out))
  return path


def _check_out(out: str) -> None:
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"--out={out} exists and is not an empty directory; pick a new one")


# -----------------------------------------------------------------------------
# The two conversions.


def _loaded(source, groups) -> state_dict_lib.Checkpoint:
  """`source` read (a path), or as given (an already loaded Checkpoint)."""
  if isinstance(source, state_dict_lib.Checkpoint):
    return source
  return state_dict_lib.load_checkpoint(source, groups=groups)


def convert_mar(source, out: str, config, *, log: Log = _stderr) -> dict:
  """MAR checkpoint (path or loaded Checkpoint) -> arjax workdir `out`; returns a summary.

  Raises CheckpointError / FileNotFoundError for an unreadable file, ValueError naming config
  fields or keys when the weights do not fit `config`, FileExistsError for a non-empty `out`.
  """
  import orbax.checkpoint as ocp

  from arjax.training import checkpoint
  from arjax.config import schema as configs
  from arjax.training.experiment import Experiment

  out = os.path.abspath(out)
  _check_out(out)
  ckpt = _loaded(source, MAR_GROUPS)
  source = ckpt.path
  if detect_kind(ckpt) != "mar":
    raise CheckpointError(f"{source}: a KL VAE checkpoint, not MAR (use --kind=vae)")
  params_sd, ema_sd = mar_state_dicts(ckpt, log)
  if ckpt.ignored:
    log(f"not imported from {source}: {', '.join(ckpt.ignored)} (the optimizer state starts "
        "afresh)")
  derived = []
  if ckpt.args:
    config, derived = config_from_mar_args(config, ckpt.args)
    for line in derived:
      log(f"from the checkpoint's args: {line}")
    if ckpt.args.get("model") not in MAR_MODELS and "encoder_num_heads" not in ckpt.args:
      log(f"WARNING: args.model={ckpt.args.get('model')!r} is none of {sorted(MAR_MODELS)}: "
          "attention head counts stay the config's (the weights do not show them)")
  else:
    log(f"{source} carries no args: the config's sizes are checked against the weights; "
        "attention head counts are taken on trust")
  registry.validate(config)
  if config.tokenizer.name == "kl_vae" and config.tokenizer.checkpoint is None:
    # The config written beside the weights must be complete, or `sample` fails later.
    raise configs.ConfigError(
        "config.tokenizer.checkpoint is None: convert kl16.ckpt first (python -m arjax convert "
        "--source=kl16.ckpt --out=weights/kl16) and pass --config.tokenizer.checkpoint="
        "weights/kl16; it is recorded in the output's config.json")
  if config.tokenizer.name == "kl_vae" and os.path.exists(config.tokenizer.checkpoint):
    # Recorded absolute, so that `sample` on the output works from any directory.
    config.tokenizer.checkpoint = os.path.abspath(config.tokenizer.checkpoint)
  exp = Experiment(config)
  check_fits_config(params_sd, config, exp.tokenizer)
  params = mar_params(params_sd, exp, what="'model'" if params_sd is not ema_sd else "weights")
  ema = params if ema_sd is params_sd else mar_params(ema_sd, exp, what="'model_ema'")
  step = int(ckpt.epoch) if ckpt.epoch is not None else 0
  state = train_state(exp, params, ema, step)

  os.makedirs(out, exist_ok=True)
  ckpt_writer = checkpoint.Checkpointer(out, keep=1, save_every=1, async_save=False)
  # State only: an import has no data-iterator position (`train` on DIR would need one).
  ckpt_writer.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                           force=True)
  ckpt_writer.wait()
  ckpt_writer.close()
  config_py = write_config(config, out)
  return {"kind": "mar", "out": out, "step": step, "config": config_py, "derived": derived,
          "config_object": config}


def vae_config_from_state_dict(state_dict: Mapping[str, np.ndarray]):
  """The `KLVAEConfig` whose parameter shapes an `AutoencoderKL.state_dict()` shows.

  Attention sits at levels, which KLVAEConfig names by resolution: they are expressed for
  resolution 256 (MAR's), which builds the same network whatever the training resolution.
  """
  from arjax.tokenizers import kl_vae

  def shape(key):
    if key not in state_dict:
      raise ValueError(f"cannot infer the VAE's architecture: missing {key}")
    return tuple(np.shape(state_dict[key]))

  ch, in_channels = shape("encoder.conv_in.weight")[:2]
  levels = _indices(state_dict, "encoder.down.")
  if levels is None:
    raise ValueError("cannot infer the VAE's architecture: no encoder.down.<i>.* keys")
  ch_mult = tuple(shape(f"encoder.down.{i}.block.0.conv2.weight")[0] // ch
                  for i in range(levels))
  num_res_blocks = _indices(state_dict, "encoder.down.0.block.")
  z_channels = shape("decoder.conv_in.weight")[1]
  embed_dim = shape("post_quant_conv.weight")[1]
  resolution = 256
  attn = lambda part, i: any(k.startswith(f"{part}.{i}.attn.") for k in state_dict)
  return kl_vae.KLVAEConfig(
      ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
      encoder_attn_resolutions=tuple(resolution >> i for i in range(levels)
                                     if attn("encoder.down", i)),
      decoder_attn_resolutions=tuple(resolution >> i for i in range(levels)
                                     if attn("decoder.up", i)),
      resolution=resolution, in_channels=in_channels,
      out_ch=shape("decoder.conv_out.weight")[0], z_channels=z_channels, embed_dim=embed_dim,
      double_z=shape("encoder.conv_out.weight")[0] == 2 * z_channels,
      use_variational=shape("quant_conv.weight")[0] == 2 * embed_dim,
      use_conv_shortcut=any(".conv_shortcut." in k for k in state_dict))


def vae_state_dict(ckpt: state_dict_lib.Checkpoint, log: Log = _stderr):
  """The autoencoder's state dict: group 'model' (kl16.ckpt), else 'state_dict', else bare."""
  for group in VAE_GROUPS + ("",):
    if ckpt.state_dicts.get(group):
      others = sorted(g for g in ckpt.state_dicts if g != group)
      if others:
        raise CheckpointError(f"{ckpt.path}: state dicts {[group] + others}: which one is the "
                              "VAE is ambiguous")
      sd = ckpt.state_dicts[group]
      dropped = sorted(k for k in sd if k.startswith(VAE_IGNORED_PREFIXES))
      if dropped:
        log(f"not imported from {ckpt.path}: {len(dropped)} keys under "
            f"{', '.join(map(repr, VAE_IGNORED_PREFIXES))} (LDM's training loss, not the "
            "autoencoder)")
      return sd
  raise CheckpointError(f"{ckpt.path}: no VAE state dict (looked for groups "
                        f"{list(VAE_GROUPS)} and top-level names)")


def convert_vae(source, out: str, vae_config=None, *, log: Log = _stderr) -> dict:
  """VAE checkpoint (path or loaded Checkpoint) -> Orbax params in `out`; returns a summary.

  `vae_config` (a `KLVAEConfig`): the architecture to check the weights against; None infers
  it from the weights (`vae_config_from_state_dict`). Every key is matched either way.
  """
  import orbax.checkpoint as ocp

  from arjax.tokenizers import kl_vae_weights as convert_vae_lib

  out = os.path.abspath(out)
  _check_out(out)
  ckpt = _loaded(source, VAE_GROUPS)
  source = ckpt.path
  if detect_kind(ckpt) != "vae":
    raise CheckpointError(f"{source}: a MAR checkpoint, not a KL VAE (use --kind=mar)")
  if ckpt.ignored:
    log(f"not imported from {source}: {', '.join(ckpt.ignored)}")
  sd = vae_state_dict(ckpt, log)
  if vae_config is None:
    vae_config = vae_config_from_state_dict(sd)
  params = convert_vae_lib.vae_params_from_state_dict(
      sd, vae_config, ignore_prefixes=VAE_IGNORED_PREFIXES)
  if os.path.isdir(out):
    os.rmdir(out)  # empty (checked); Orbax creates the directory itself
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with ocp.StandardCheckpointer() as writer:
    writer.save(out, params)
    writer.wait_until_finished()
  with open(os.path.join(out, "arjax_vae.json"), "w") as f:
    json.dump({"source": str(source), "architecture": dataclasses.asdict(vae_config)}, f,
              indent=2)
  return {"kind": "vae", "out": out, "vae_config": vae_config}


def convert(source, out: str, *, config=None, kind: Optional[str] = None,
            log: Log = _stderr) -> dict:
  """Either conversion; `kind` None: detected from the file's parameter names.

  `config`: for MAR, the config to check against (None: DEFAULT_CONFIG); for a VAE, optional:
  a kl_vae config's `tokenizer.architecture` is the architecture to check against.
  """
  if kind not in (None, "mar", "vae"):
    raise ValueError(f"--kind={kind!r}: expected 'mar' or 'vae'")
  ckpt = state_dict_lib.load_checkpoint(source, groups=MAR_GROUPS + VAE_GROUPS)
  kind = kind or detect_kind(ckpt)
  if kind == "mar":
    from arjax.config import schema as configs
    return convert_mar(ckpt, out, configs.load(DEFAULT_CONFIG) if config is None else config,
                       log=log)
  vae_config = None
  if config is not None and _get(config, "tokenizer.name") == "kl_vae":
    from arjax.tokenizers import kl_vae
    vae_config = kl_vae.ARCHITECTURES[config.tokenizer.architecture]
  return convert_vae(ckpt, out, vae_config, log=log)


def summary(result: Mapping[str, Any]) -> str:
  """What the CLI prints on success: where things are and the next command."""
  if result["kind"] == "mar":
    return (f"MAR weights (step {result['step']}) in {result['out']}/checkpoints; config "
            f"{result['config']}\nsample: python -m arjax sample --config={result['config']} "
            f"--workdir={result['out']}")
  return (f"VAE params (Orbax) in {result['out']}, architecture {result['vae_config']}\n"
          f"use: --config.tokenizer.checkpoint={result['out']}")


def run_cli(source: Optional[str], out: Optional[str], config=None,
            kind: Optional[str] = None) -> None:
  """`python -m arjax convert`: the conversion, one clear line per error a user can fix."""
  from arjax.config import schema as configs

  if not source or not out:
    sys.exit("error: convert needs --source=CHECKPOINT and --out=DIR")
  try:
    result = convert(source, out, config=config, kind=kind)
  except (CheckpointError, configs.ConfigError, FileNotFoundError, FileExistsError,
          ValueError) as e:
    sys.exit(f"error: {e}")
  print(summary(result))
