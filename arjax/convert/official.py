"""Official PyTorch checkpoints -> arjax checkpoints: what `python -m arjax convert` runs.

    python -m arjax convert --source=checkpoint-last.pth --out=DIR [--config=configs/X.py]
    python -m arjax convert --source=kl16.ckpt --out=DIR        (--kind=mar|xar|vae: else detected)
    python -m arjax convert --source=pt_inception-2015-12-05-6726825d.pth --out=DIR
                                                                (--kind=inception: FID network)

This module names no model. The kinds of file it reads are the converters the registered
families and tokenizer kinds supply (`arjax.registry.converters()`; the interface:
`arjax.weights.converter`): MAR's checkpoint-last.pth (arjax/families/masked/convert.py) and
kl16.ckpt (arjax/tokenizers/kl_vae_convert.py), and any plug-in's (loaded from
$ARJAX_PLUGINS), plus the built-in FID Inception-v3's (arjax/evaluation/inception_convert.py).
`--kind` names one; without it, the one whose `detect` recognises the
file's parameter names is used. What the file becomes depends on the converter's kind:

  a family's checkpoint     a complete arjax workdir:
    DIR/checkpoints/<step>/state   the TrainState as `arjax.training.checkpoint.Checkpointer`
                                   writes it: params and ema_params from the file's two state
                                   dicts, a fresh optimizer state, step = the file's 'epoch'
                                   (else 0)
    DIR/config.json                the config the weights were checked against: `--config`
                                   (default: the converter's) with the fields the file implies
    DIR/config.py                  loads config.json, so that
                                   `python -m arjax sample --config=DIR/config.py --workdir=DIR`
                                   samples from the imported weights unchanged
  a tokenizer's checkpoint  an Orbax checkpoint of its Flax params tree in DIR
                            (`ocp.StandardCheckpointer().save(DIR, params)`), which
                            `config.tokenizer.checkpoint=DIR` loads; DIR/arjax_<kind>.json
                            (arjax_vae.json) records the architecture

Files are read by `arjax.weights.state_dict.load_checkpoint` (.npz, .safetensors, or .pth/.ckpt
through arjax's restricted unpickler, torch not needed; its docstring gives the flat-file key
convention).
Nothing is skipped silently: unread entries (the optimizer state) and substitutions (one state
dict used for both params and ema_params) are reported.
"""
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np

from arjax import registry
from arjax.weights import converter as converter_lib
from arjax.weights import state_dict as state_dict_lib
from arjax.weights.state_dict import CheckpointError

Log = Callable[[str], None]


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Which converter.


def built_in_converters() -> Dict[str, converter_lib.Converter]:
  """Converters no family or tokenizer owns: the evaluation networks' (FID Inception-v3)."""
  from arjax.evaluation import inception_convert

  return {c.name: c for c in (inception_convert.InceptionConverter(),)}


def _known(kind: Optional[str]) -> Dict[str, converter_lib.Converter]:
  """The registered converters and the built-in ones; ValueError if `kind` is none of them."""
  known = {**registry.converters(), **built_in_converters()}
  if kind is not None and kind not in known:
    raise ValueError(f"--kind={kind!r}: expected one of {sorted(known)} (the converters of the "
                     "registered families and tokenizers, and the built-in ones)")
  return known


def converter_for(ckpt: state_dict_lib.Checkpoint, known: Mapping[str, converter_lib.Converter],
                  kind: Optional[str] = None) -> converter_lib.Converter:
  """The converter for `ckpt`: `kind`'s, unless another one claims the file; else the one
  converter whose `detect` recognises it."""
  claimed = [c for c in known.values() if c.detect(ckpt)]
  if kind is not None:
    chosen = known[kind]
    if claimed and chosen not in claimed:
      other = claimed[0]
      raise CheckpointError(f"{ckpt.path}: a {other.what} checkpoint, not {chosen.what} "
                            f"(use --kind={other.name})")
    return chosen
  if len(claimed) == 1:
    return claimed[0]
  kinds = "|".join(sorted(known))
  if claimed:
    raise CheckpointError(f"{ckpt.path}: recognised as {' and as '.join(c.what for c in claimed)}"
                          f"; pass --kind={kinds} to pick one")
  found = ", ".join(repr(g) for g in sorted(ckpt.state_dicts)) or "none"
  signs = ", ".join(f"{c.what} (no {c.evidence})" for c in known.values())
  raise CheckpointError(f"{ckpt.path}: none of the known kinds of checkpoint: {signs}; "
                        f"state-dict groups found: {found}. Pass --kind={kinds} to force one")


# -----------------------------------------------------------------------------
# A family's checkpoint -> a workdir.


def _flat(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flat(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def fitted_params(converter: converter_lib.FamilyConverter, state_dict, exp, *,
                  what: str = "state dict"):
  """`converter.params` of `exp.model`, checked against the model's own tree: numpy arrays of
  its dtypes. ValueError (prefixed by `what`) naming every mismatched key, every parameter the
  weights leave unset or the model lacks, and every shape that differs."""
  try:
    got = dict(_flat(converter.params(state_dict, exp.model)))
  except ValueError as e:
    raise ValueError(f"{what}: {e}") from None
  abstract, _ = exp.abstract_state()
  want = dict(_flat(abstract.params))
  problems = [f"  not set by the checkpoint: {'/'.join(p)}" for p in sorted(set(want) - set(got))]
  problems += [f"  not in the model: {'/'.join(p)}" for p in sorted(set(got) - set(want))]
  problems += [f"  shape: {'/'.join(p)}: weights {tuple(np.shape(got[p]))}, model "
               f"{tuple(want[p].shape)}" for p in sorted(set(got) & set(want))
               if tuple(np.shape(got[p])) != tuple(want[p].shape)]
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


def convert_family(converter: converter_lib.FamilyConverter, ckpt, out: str, config, *,
                   log: Log = _stderr) -> dict:
  """A family's checkpoint -> arjax workdir `out` (absolute, empty); returns a summary.

  `config`: the config to check against (None: the converter's default). Raises
  CheckpointError for the file's layout, ConfigError / ValueError naming config fields or keys
  when the weights do not fit the config.
  """
  import orbax.checkpoint as ocp

  from arjax.config import schema as configs
  from arjax.training import checkpoint
  from arjax.training.experiment import Experiment

  if config is None:
    if converter.default_config is None:
      raise configs.ConfigError(f"--kind={converter.name} needs --config=configs/X.py: the "
                                "config to check the weights against")
    config = configs.load(converter.default_config)
  params_sd, ema_sd = converter.state_dicts(ckpt, log)
  if ckpt.ignored:
    log(f"not imported from {ckpt.path}: {', '.join(ckpt.ignored)} (the optimizer state starts "
        "afresh)")
  config, derived = converter.configure(config, ckpt, log)
  for line in derived:
    log(f"from the checkpoint: {line}")
  registry.validate(config)
  exp = Experiment(config)
  converter.check(params_sd, config, exp.tokenizer)
  # Messages name the file's groups: the trained weights' first, their EMA's second.
  one = params_sd is ema_sd
  params = fitted_params(converter, params_sd, exp,
                         what="weights" if one else repr(converter.groups[0]))
  ema = params if one else fitted_params(converter, ema_sd, exp, what=repr(converter.groups[1]))
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
  return {"kind": converter.name, "what": converter.what, "wrote": "workdir", "out": out,
          "step": step, "config": config_py, "derived": derived, "config_object": config}


# -----------------------------------------------------------------------------
# A tokenizer's checkpoint -> its params.


def convert_tokenizer(converter: converter_lib.TokenizerConverter, ckpt, out: str, config=None,
                      *, log: Log = _stderr) -> dict:
  """A tokenizer's checkpoint -> Orbax params in `out` (absolute, empty); returns a summary.

  `config`: optional; one that uses this tokenizer gives the architecture to check against,
  else it is inferred from the weights. Every key is matched either way.
  """
  import orbax.checkpoint as ocp

  if ckpt.ignored:
    log(f"not imported from {ckpt.path}: {', '.join(ckpt.ignored)}")
  sd = converter.state_dict(ckpt, log)
  architecture = converter.architecture(sd, config)
  params = converter.params(sd, architecture)
  if os.path.isdir(out):
    os.rmdir(out)  # empty (checked); Orbax creates the directory itself
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with ocp.StandardCheckpointer() as writer:
    writer.save(out, params)
    writer.wait_until_finished()
  with open(os.path.join(out, f"arjax_{converter.name}.json"), "w") as f:
    json.dump({"source": str(ckpt.path), "architecture": dataclasses.asdict(architecture)}, f,
              indent=2)
  return {"kind": converter.name, "what": converter.what, "wrote": "params", "out": out,
          "architecture": architecture}


# -----------------------------------------------------------------------------
# An evaluation network's checkpoint -> its params file.


def convert_network(converter: converter_lib.NetworkConverter, ckpt, out: str, *,
                    log: Log = _stderr) -> dict:
  """An evaluation network's checkpoint -> its params file in `out`; returns a summary."""
  if ckpt.ignored:
    log(f"not imported from {ckpt.path}: {', '.join(ckpt.ignored)}")
  path = converter.write(converter.state_dict(ckpt, log), out, str(ckpt.path))
  return {"kind": converter.name, "what": converter.what, "wrote": "network", "out": out,
          "params": path}


# -----------------------------------------------------------------------------
# The command.


def _check_out(out: str) -> None:
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"--out={out} exists and is not an empty directory; pick a new one")


def convert(source, out: str, *, config=None, kind: Optional[str] = None,
            log: Log = _stderr) -> dict:
  """`source` (a path) converted into `out` by the converter `kind` names, or (None) the one
  that recognises the file; returns a summary (`summary` prints it).

  Raises CheckpointError / FileNotFoundError for an unreadable or unrecognised file, ValueError
  naming config fields or keys when the weights do not fit, FileExistsError for a non-empty
  `out`.
  """
  known = _known(kind)
  out = os.path.abspath(out)
  _check_out(out)
  # Every converter's groups: detection sees all the names any of them would read.
  groups = tuple(dict.fromkeys(g for c in known.values() for g in c.groups))
  ckpt = state_dict_lib.load_checkpoint(source, groups=groups)
  converter = converter_for(ckpt, known, kind)
  if isinstance(converter, converter_lib.FamilyConverter):
    return convert_family(converter, ckpt, out, config, log=log)
  if isinstance(converter, converter_lib.NetworkConverter):
    return convert_network(converter, ckpt, out, log=log)
  return convert_tokenizer(converter, ckpt, out, config, log=log)


def summary(result: Mapping[str, Any]) -> str:
  """What the CLI prints on success: where things are and the next command."""
  if result["wrote"] == "workdir":
    return (f"{result['what']} weights (step {result['step']}) in {result['out']}/checkpoints; "
            f"config {result['config']}\nsample: python -m arjax sample "
            f"--config={result['config']} --workdir={result['out']}")
  if result["wrote"] == "network":
    return f"{result['what']} params in {result['params']}"
  return (f"{result['what']} params (Orbax) in {result['out']}, architecture "
          f"{result['architecture']}\nuse: --config.tokenizer.checkpoint={result['out']}")


def run_cli(source: Optional[str], out: Optional[str], config=None,
            kind: Optional[str] = None) -> None:
  """`python -m arjax convert`: the conversion, one clear line per error a user can fix."""
  from arjax.config import schema as configs

  if not source or not out:
    sys.exit("error: convert needs --source=CHECKPOINT and --out=DIR")
  try:
    registry.load_plugins()  # $ARJAX_PLUGINS: users' families and tokenizers bring converters
    result = convert(source, out, config=config, kind=kind)
  except (CheckpointError, configs.ConfigError, FileNotFoundError, FileExistsError,
          ValueError) as e:
    sys.exit(f"error: {e}")
  print(summary(result))
