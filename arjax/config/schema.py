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

# Predicates the schemas of arjax and its plug-ins share.
positive = _pos = lambda v: v > 0
nonnegative = _nonneg = lambda v: v >= 0
probability = _prob = lambda v: 0.0 <= v < 1.0

# (types, predicate or None, what it demands: a string, or a function giving one)
Schema = Dict[str, Tuple[tuple, Callable[[Any], bool], Any]]



class Plugin:
  """What every plug-in (a family, a head, a tokenizer kind) tells the config machinery: the
  name its selector field takes, its own fields, and its cross-field rules."""

  #: The value of its selector (`model.family`, `head.name`, `tokenizer.name`).
  name: str = ""
  #: Its own fields, dotted (`model.*`, `head.*`, `tokenizer.*`), as in SCHEMA below.
  schema: Schema = {}

  def check(self, config) -> None:
    """Cross-field rules beyond the schema; raise ConfigError naming the field."""

# Fields shared by every family, head and tokenizer; always required. The plug-ins' own fields
# (`model.*` of a family, `head.*` of a head, `tokenizer.*` of a tokenizer) and the selectors
# `model.family`, `head.name`, `tokenizer.name` are added by `arjax.registry.schema_for`.
# dotted key -> (types, predicate or None, what the predicate demands).
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
    # Random translation of every training image by up to this many pixels per axis; 0 = off.
    "data.random_translate": ((int,), _nonneg, ">= 0"),
    "data.worker_count": ((int,), _nonneg, ">= 0"),
    # Consecutive training images drawn from one class, a group per training sequence (ARFlow's
    # same-class image sequences; arjax/data/pipeline.py); 1 = independent images.
    "data.group_size": ((int,), _pos, "> 0"),
    # A latent cache written by `python -m arjax cache_latents`; None: encode images on the fly.
    "data.latents": ((str, type(None)), None, ""),
    "model.label_drop": ((float, int), _prob, "in [0, 1)"),
    "model.dtype": ((str,), lambda v: v in ("float32", "bfloat16"), "'float32' or 'bfloat16'"),
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
    # FD and memorisation of a few samples every this many steps (the QualityProbe hook).
    "train.eval_every": ((int,), _nonneg, ">= 0 (0 = never)"),
    "train.eval_num_samples": ((int,), lambda v: v >= 10, ">= 10"),
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
    "sample.solver": ((str,), lambda v: v in ("euler", "heun", "euler_maruyama"),
                      "'euler', 'heun' or 'euler_maruyama'"),
    # The flow head's SDE ('euler_maruyama'): c in the diffusion coefficient g(t)^2 = 2 c t
    # (arjax/heads/flow.py); 0 = the Euler ODE, 1 = xAR's official SDE.
    "sample.diffusion_scale": ((float, int), _nonneg, ">= 0"),
    # DiSA head-step annealing along the generation order (arjax/sampling/step_schedule.py):
    # 'constant', 'linear', 'cosine' (sample.num_steps -> sample.head_steps_end), or explicit
    # comma-separated step counts, one per position / iteration / entity ('16,12,8,4').
    "sample.head_step_schedule": (
        (str,),
        lambda v: v in ("constant", "linear", "cosine") or all(
            n.strip().isdigit() and int(n) > 0 for n in v.split(",")),
        "'constant', 'linear', 'cosine' or comma-separated integers > 0"),
    "sample.head_steps_end": ((int,), _pos, "> 0"),
    "sample.seed": ((int,), None, ""),
    "sample.batch_size": ((int,), _pos, "> 0"),
    "sample.use_ema": ((bool,), None, ""),
    # What `eval` measures: 'classifier' (a small CNN fitted to the dataset, against held-out
    # images and per-class baselines: the digits path) or 'inception' (the papers' FID / IS /
    # precision / recall on the FID Inception-v3 against eval.reference, streamed).
    "eval.metrics": ((str,), lambda v: v in ("classifier", "inception"),
                     "'classifier' or 'inception'"),
    # The FID Inception weights: the directory `convert --kind=inception` wrote.
    "eval.inception": ((str, type(None)), None, ""),
    # Reference statistics (.npz): ADM's VIRTUAL_*.npz, a mu/sigma file, or `fid_stats` output;
    # None: the `fid_stats` default file of data.train_split.
    "eval.reference": ((str, type(None)), None, ""),
    # Images per Inception call (a multiple of the process's devices).
    "eval.batch_size": ((int,), _pos, "> 0"),
    # The published results printed beside the numbers (arjax.evaluation.paper_metrics); '' none.
    "eval.paper_row": ((str,), None, ""),
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


def check_fields(config, schema: Schema) -> None:
  """Raises ConfigError naming the first field of `config` that `schema` does not know, the
  first field it requires that is missing, or the first of the wrong type or range."""
  flat = dict(_flatten(config))
  for name in flat:
    if name not in schema:
      raise ConfigError(f"config.{name}: unknown key" + _did_you_mean(name, schema))
  for name, rule in schema.items():
    if name not in flat:
      raise ConfigError(f"config.{name}: missing")
    _check(name, flat[name], rule)


def check_selector(config, name: str, known) -> str:
  """The value of a selector field (`model.family`, ...), checked to be one of `known`."""
  flat = dict(_flatten(config))
  if name not in flat:
    raise ConfigError(f"config.{name}: missing")
  _check(name, flat[name], ((str,), lambda v: v in known, f"one of {sorted(known)}"))
  return flat[name]


def check_divisible(config, width: str, num_heads: str) -> None:
  """`config.model.<width>` must split into `config.model.<num_heads>` attention heads."""
  m = config.model
  if m[width] % m[num_heads]:
    raise ConfigError(f"config.model.{width}={m[width]} must be divisible by "
                      f"config.model.{num_heads}={m[num_heads]}")


def check_shared(config) -> None:
  """The cross-field rules of the shared fields (run after `check_fields`)."""
  if config.data.random_translate and config.data.latents:
    raise ConfigError(f"config.data.random_translate={config.data.random_translate} cannot "
                      f"apply to a latent cache (config.data.latents={config.data.latents!r}): "
                      "its records hold each image and its flip only; set it to 0")
  if config.data.random_translate >= config.data.image_size:
    raise ConfigError(f"config.data.random_translate={config.data.random_translate} must be "
                      f"below config.data.image_size={config.data.image_size}")
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
