"""Config schema and validation: every config is checked at start, before anything is written.

The schema lists each field with its type; a key the schema does not know (a
typo such as `model.dept`) or a value of the wrong type or range fails with the
field's dotted name. Config *files* live in `configs/`; this module only judges them.
"""
import difflib
import importlib.util
import json
import os
from typing import Any, Callable, Dict, Tuple

import ml_collections

from arjax.errors import ConfigError  # noqa: F401  (configs.ConfigError)

_pos = lambda v: v > 0
_nonneg = lambda v: v >= 0
_prob = lambda v: 0.0 <= v < 1.0

# (types, predicate or None, what it demands: a string, or a function giving one)
Schema = Dict[str, Tuple[tuple, Callable[[Any], bool], Any]]


def _vae_architectures():
  # Imported on use: the presets live with the VAE, which pulls in Flax.
  from arjax.tokenizers import kl_vae
  return kl_vae.ARCHITECTURES

# The fields that depend on a choice: the chosen variant's fields are required, the
# others' unknown (a causal config carrying `model.buffer_size` is a mistake).
TOKENIZER_SCHEMAS: Dict[str, Schema] = {
    "patchify": {
        "tokenizer.patch_size": ((int,), _pos, "> 0"),
        "tokenizer.scale": ((float, int), _pos, "> 0"),
    },
    # MAR's KL VAE, frozen (arjax/tokenizers/kl_vae.py): tokens are its scaled latents.
    "kl_vae": {
        # .pth/.ckpt, .npz or .safetensors state dict, or an Orbax params directory; needed.
        "tokenizer.checkpoint": ((str, type(None)), None, ""),
        "tokenizer.architecture": ((str,), lambda v: v in _vae_architectures(),
                                   lambda: f"one of {sorted(_vae_architectures())}"),
        "tokenizer.patch_size": ((int,), _pos, "> 0"),
        "tokenizer.latent_scale": ((float, int), _pos, "> 0"),
        "tokenizer.sample_posterior": ((bool,), None, ""),
    },
}

# Both families: blocks as one nn.scan (params with a leading 'layers' axis), and their remat
# policy (arjax/layers/transformer.py block_stack).
_BLOCK_STACK_SCHEMA: Schema = {
    "model.scan_layers": ((bool,), None, ""),
    "model.remat": ((str,), lambda v: v in ("none", "full", "dots", "dots_no_batch"),
                    "one of 'none', 'full', 'dots', 'dots_no_batch'"),
}

MODEL_SCHEMAS: Dict[str, Schema] = {
    # Raster-order decoder with a KV cache (arjax/families/causal/backbone.py).
    "causal": {
        "model.width": ((int,), _pos, "> 0"),
        "model.depth": ((int,), _pos, "> 0"),
        "model.num_heads": ((int,), _pos, "> 0"),
        "model.mlp_ratio": ((float, int), _pos, "> 0"),
        "model.num_class_tokens": ((int,), _pos, "> 0"),
        **_BLOCK_STACK_SCHEMA,
    },
    # MAR's masked encoder-decoder in random order (arjax/families/masked/backbone.py).
    "mar": {
        "model.encoder_width": ((int,), _pos, "> 0"),
        "model.encoder_depth": ((int,), _pos, "> 0"),
        "model.encoder_heads": ((int,), _pos, "> 0"),
        "model.decoder_width": ((int,), _pos, "> 0"),
        "model.decoder_depth": ((int,), _pos, "> 0"),
        "model.decoder_heads": ((int,), _pos, "> 0"),
        "model.mlp_ratio": ((float, int), _pos, "> 0"),
        "model.buffer_size": ((int,), _pos, "> 0"),
        "model.norm_eps": ((float,), _pos, "> 0"),
        "model.mask_ratio_min": ((float, int), lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
        "model.mask_ratio_std": ((float, int), _pos, "> 0"),
        "model.mask_buckets": ((int,), _pos, "> 0"),
        **_BLOCK_STACK_SCHEMA,
    },
}

HEAD_SCHEMAS: Dict[str, Schema] = {
    # Flow matching on the linear path (arjax/heads/flow.py).
    "flow": {
        "head.t_mean": ((float, int), None, ""),
        "head.t_std": ((float, int), _pos, "> 0"),
    },
    # MAR's DiffLoss: DDPM, cosine schedule, eps + learned-range variance.
    "mar_diffusion": {
        "head.num_timesteps": ((int,), _pos, "> 0"),
        "head.noise_schedule": ((str,), lambda v: v in ("cosine", "linear"), "'cosine' or 'linear'"),
    },
}

# Sampler fields only the masked (MAR) family has.
MASKED_SAMPLE_SCHEMA: Schema = {
    "sample.num_iter": ((int,), _pos, "> 0"),
    "sample.kept_buckets": ((int,), _pos, "> 0"),
}

# dotted key -> (types, predicate or None, what the predicate demands); always required.
SCHEMA: Schema = {
    "seed": ((int,), None, ""),
    "data.name": ((str,), None, ""),
    "data.data_dir": ((str, type(None)), None, ""),
    "data.train_split": ((str,), None, ""),
    "data.eval_split": ((str,), None, ""),
    "data.image_size": ((int,), _pos, "> 0"),
    "data.channels": ((int,), lambda v: v in (1, 3), "1 or 3"),
    "data.num_classes": ((int,), _pos, "> 0"),
    "data.shuffle_seed": ((int,), None, ""),
    "data.random_flip": ((bool,), None, ""),
    "data.worker_count": ((int,), _nonneg, ">= 0"),
    # A latent cache written by `python -m arjax cache_latents`; None: encode images on the fly.
    "data.latents": ((str, type(None)), None, ""),
    "tokenizer.name": ((str,), lambda v: v in TOKENIZER_SCHEMAS, f"one of {sorted(TOKENIZER_SCHEMAS)}"),
    "model.family": ((str,), lambda v: v in MODEL_SCHEMAS, f"one of {sorted(MODEL_SCHEMAS)}"),
    "model.label_drop": ((float, int), _prob, "in [0, 1)"),
    "model.dtype": ((str,), lambda v: v in ("float32", "bfloat16"), "'float32' or 'bfloat16'"),
    "head.name": ((str,), lambda v: v in HEAD_SCHEMAS, f"one of {sorted(HEAD_SCHEMAS)}"),
    "head.width": ((int,), _pos, "> 0"),
    "head.depth": ((int,), _pos, "> 0"),
    "head.batch_mul": ((int,), _pos, "> 0"),
    "train.global_batch_size": ((int,), _pos, "> 0"),
    "train.num_steps": ((int,), _pos, "> 0"),
    "train.learning_rate": ((float, int), _pos, "> 0"),
    "train.schedule": ((str,), lambda v: v in ("cosine", "constant"), "'cosine' or 'constant'"),
    "train.warmup_steps": ((int,), _nonneg, ">= 0"),
    "train.weight_decay": ((float, int), _nonneg, ">= 0"),
    "train.adam_b1": ((float,), _prob, "in [0, 1)"),
    "train.adam_b2": ((float,), _prob, "in [0, 1)"),
    "train.grad_clip_norm": ((float, int), _pos, "> 0"),
    "train.ema_decay": ((float,), _prob, "in [0, 1)"),
    "train.log_every": ((int,), _pos, "> 0"),
    "train.sample_every": ((int,), _nonneg, ">= 0 (0 = never)"),
    "train.checkpoint_every": ((int,), _pos, "> 0"),
    "train.keep_checkpoints": ((int,), _pos, "> 0"),
    "train.max_nonfinite_steps": ((int,), _pos, "> 0"),
    "mesh.shape": ((tuple, list), lambda v: len(v) == 3, "3 sizes (data, fsdp, tensor)"),
    "sharding.rules": ((tuple, list), None, ""),
    "sample.num_images": ((int,), _pos, "> 0"),
    "sample.labels": ((str,), None, ""),
    "sample.cfg_scale": ((float, int), _nonneg, ">= 0"),
    "sample.cfg_schedule": ((str,), lambda v: v in ("constant", "linear"), "'constant' or 'linear'"),
    "sample.cfg_interval": ((tuple, list), lambda v: len(v) == 2 and 0.0 <= v[0] <= v[1] <= 1.0,
                            "(lo, hi) with 0 <= lo <= hi <= 1"),
    "sample.temperature": ((float, int), _pos, "> 0"),
    "sample.num_steps": ((int,), _pos, "> 0"),
    "sample.solver": ((str,), lambda v: v in ("euler", "heun"), "'euler' or 'heun'"),
    "sample.seed": ((int,), None, ""),
    "sample.batch_size": ((int,), _pos, "> 0"),
    "sample.use_ema": ((bool,), None, ""),
}




def _flatten(config, prefix=""):
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from _flatten(value, name + ".")
    else:
      yield name, value


def _check(name: str, value, rule) -> None:
  types, check, demand = rule
  if isinstance(value, bool) and bool not in types:
    raise ConfigError(f"config.{name}={value!r}: expected {'/'.join(t.__name__ for t in types)}")
  if not isinstance(value, types):
    raise ConfigError(f"config.{name}={value!r}: expected {'/'.join(t.__name__ for t in types)}, "
                      f"got {type(value).__name__}")
  if check is not None and not check(value):
    raise ConfigError(f"config.{name}={value!r}: must be {demand() if callable(demand) else demand}")


def schema_for(config) -> Schema:
  """The always-required fields plus those of the chosen tokenizer, model family and head."""
  flat = dict(_flatten(config))
  for selector in ("tokenizer.name", "model.family", "head.name"):
    if selector not in flat:
      raise ConfigError(f"config.{selector}: missing")
    _check(selector, flat[selector], SCHEMA[selector])
  schema = dict(SCHEMA)
  schema.update(TOKENIZER_SCHEMAS[flat["tokenizer.name"]])
  schema.update(MODEL_SCHEMAS[flat["model.family"]])
  schema.update(HEAD_SCHEMAS[flat["head.name"]])
  if flat["model.family"] == "mar":
    schema.update(MASKED_SAMPLE_SCHEMA)
  return schema


def validate(config) -> None:
  """Raises ConfigError naming the first bad field (unknown keys included)."""
  schema = schema_for(config)
  flat = dict(_flatten(config))
  for name in flat:
    if name not in schema:
      raise ConfigError(f"config.{name}: unknown key" + _did_you_mean(name, schema))
  for name, rule in schema.items():
    if name not in flat:
      raise ConfigError(f"config.{name}: missing")
    _check(name, flat[name], rule)
  m = config.model
  heads = ((("width", "num_heads"),) if m.family == "causal" else
           (("encoder_width", "encoder_heads"), ("decoder_width", "decoder_heads")))
  for width, num_heads in heads:
    if m[width] % m[num_heads]:
      raise ConfigError(f"config.model.{width}={m[width]} must be divisible by "
                        f"config.model.{num_heads}={m[num_heads]}")
  if config.tokenizer.name == "patchify" and config.data.image_size % config.tokenizer.patch_size:
    raise ConfigError(f"config.tokenizer.patch_size={config.tokenizer.patch_size} must divide "
                      f"config.data.image_size={config.data.image_size}")
  _validate_vae(config)
  if config.train.warmup_steps > config.train.num_steps:
    raise ConfigError(f"config.train.warmup_steps={config.train.warmup_steps} exceeds "
                      f"config.train.num_steps={config.train.num_steps}")
  for i, rule in enumerate(config.sharding.rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError(f"config.sharding.rules[{i}]={rule!r}: expected (logical_name, mesh_axes)")


def _did_you_mean(name: str, known) -> str:
  """' (did you mean config.X?); known keys of that section: [...]' for a dotted `name`."""
  section = name.rsplit(".", 1)[0] if "." in name else ""
  siblings = sorted(k for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == section)
  close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
  hint = f" (did you mean config.{close[0]}?)" if close else ""
  return f"{hint}; known keys of that section: {siblings}"


def unknown_override(config, path: str) -> str:
  """Why `--config.<path>=...` names no field of `config`, with the nearest field; '' if it does."""
  node, walked = config, []
  for part in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      fields = ([f"{'.'.join(walked + [k])}" for k in node]
                if isinstance(node, (ml_collections.ConfigDict, dict)) else [])
      where = "config." + ".".join(walked) if walked else "config"
      if not fields:
        return f"--config.{path}: {where} is a value, not a section"
      close = difflib.get_close_matches(".".join(walked + [part]), fields, n=1, cutoff=0.6)
      hint = f"; did you mean --config.{close[0]}?" if close else ""
      return (f"--config.{path}: {where} has no field {part!r}{hint} (its fields: "
              f"{', '.join(sorted(str(k) for k in node))})")
    node = node[part]
    walked.append(part)
  return ""


def _validate_vae(config) -> None:
  if config.tokenizer.name != "kl_vae":
    if config.data.latents is not None:
      raise ConfigError(f"config.data.latents={config.data.latents!r}: cached latents need a VAE "
                        f"tokenizer (config.tokenizer.name='kl_vae'), not "
                        f"{config.tokenizer.name!r}")
    return
  t, d = config.tokenizer, config.data
  vae = _vae_architectures()[t.architecture]
  stride = vae.downsample_factor * t.patch_size
  if d.image_size % stride:
    raise ConfigError(
        f"config.data.image_size={d.image_size} must be a multiple of {stride}: the VAE stride "
        f"{vae.downsample_factor} (config.tokenizer.architecture={t.architecture!r}) times "
        f"config.tokenizer.patch_size={t.patch_size}")
  if d.channels != vae.in_channels:
    raise ConfigError(f"config.data.channels={d.channels}: the VAE "
                      f"config.tokenizer.architecture={t.architecture!r} reads "
                      f"{vae.in_channels}-channel images")


def load(path: str) -> ml_collections.ConfigDict:
  """Loads `configs/X.py[:variant]` the way `--config=` does (for library and test use)."""
  path, _, variant = path.partition(":")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def load_json(path: str) -> ml_collections.ConfigDict:
  """A config written as JSON (a workdir's config.json, by `train` and `convert`), restored so
  it validates as it did: JSON has no tuples and no typed None, so every sequence becomes a
  tuple and every None field an optional string (a path), kept overridable as a placeholder."""
  def restore(value, field=True):
    if isinstance(value, dict):
      return {k: restore(v) for k, v in value.items()}
    if isinstance(value, list):
      return tuple(restore(v, field=False) for v in value)
    if value is None and field:
      return ml_collections.config_dict.placeholder(str)
    return value

  with open(path) as f:
    return ml_collections.ConfigDict(restore(json.load(f)))
