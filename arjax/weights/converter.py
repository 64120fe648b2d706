"""The converter hook: how a family or tokenizer reads one kind of official PyTorch checkpoint.

`python -m arjax convert` (arjax/convert/official.py) names no model: it asks
`arjax.registry.converters()`, which collects the converters every registered family
(`Family.converters()`) and tokenizer kind (`TokenizerKind.converters()`) supplies, picks the
one `--kind` names or the one whose `detect` recognises the file, and writes what it returns.
The interface lives here, below the families and tokenizers that implement it, because imports
only go down (tests/test_layering.py): arjax/convert uses it from above.

A converter is one of three kinds, by what the file becomes:

  FamilyConverter     a model's weights (and their EMA) -> a workdir: a TrainState checkpoint
                      plus the config they were checked against, which `sample` reads
                      (MAR's checkpoint-last.pth: arjax/families/masked/convert.py)
  TokenizerConverter  a tokenizer's weights -> an Orbax params tree that the tokenizer's
                      `config.tokenizer.checkpoint` names (MAR's kl16.ckpt:
                      arjax/tokenizers/kl_vae_convert.py)
  NetworkConverter    a fixed evaluation network's weights -> one params file that `eval`
                      reads (the FID Inception's pt_inception-2015-12-05-*.pth:
                      arjax/evaluation/inception_convert.py); built into `convert`, since
                      no family or tokenizer owns it

Each states its `name` (the `--kind` value), `what` (the file's kind in messages), the
state-dict `groups` of the file it reads, and `detect(ckpt)`; the rest is the mapping from the
file's state dict to arjax parameters and the config it implies. Files come read by
`arjax.weights.state_dict.load_checkpoint`; every failure a user can fix is a ValueError
(CheckpointError for the file's layout) whose message names the key or config field.
"""
import abc
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

if TYPE_CHECKING:  # the family and tokenizer interfaces import this module: it stays jax-free
  from arjax.weights.state_dict import Checkpoint

StateDict = Mapping[str, np.ndarray]
Log = Callable[[str], None]


def parameter_names(ckpt: "Checkpoint") -> Set[str]:
  """Every parameter name of the file, whatever its group: what `detect` looks at."""
  return {name for sd in ckpt.state_dicts.values() for name in sd}


class Converter(abc.ABC):
  """One kind of official checkpoint (see the module docstring)."""

  #: The `--kind` value, unique among the registered converters ('mar', 'vae').
  name: str = ""
  #: What such a file is called in messages ('MAR', 'KL VAE').
  what: str = ""
  #: The file's state-dict groups to read (`load_checkpoint(groups=)`); a FamilyConverter lists
  #: the trained weights' group first and their EMA's second, and messages name them so.
  groups: Sequence[str] = ()
  #: The parameter name `detect` looks for, named when no converter recognises a file.
  evidence: str = ""

  @abc.abstractmethod
  def detect(self, ckpt: "Checkpoint") -> bool:
    """Whether `ckpt` is this kind of file, judged from its parameter names only."""


class FamilyConverter(Converter):
  """A family's training checkpoint -> an arjax workdir.

  arjax/convert/official.py calls, in order: `state_dicts`, `configure`, the registry's
  validation of the config, `check` against the built tokenizer, then `params` once per state
  dict; it checks the returned tree against the model's own (every leaf set, every shape) and
  writes it with a fresh optimizer state.
  """

  #: The config to check against when the user gives none (a path for `configs.load`);
  #: None: `--config` is required.
  default_config: Optional[str] = None

  #: What `state_dicts` logs for a file of one bare state dict (no 'model'/'model_ema').
  bare_state_dict_note: str = "WARNING: {path} holds one bare state dict, not 'model'/'model_ema': it becomes both params and ema_params"

  def state_dicts(self, ckpt: "Checkpoint", log: Log) -> Tuple[StateDict, StateDict]:
    """(the trained weights, their EMA); the same object for both when the file has one only,
    which `log` says. By default the official training scripts' layout: 'model' and
    'model_ema' groups (MAR, xAR), or one bare state dict (released inference files)."""
    # Imported here: this module stays jax-free (the family and tokenizer interfaces import it).
    from arjax.weights.state_dict import CheckpointError  # pylint: disable=import-outside-toplevel
    groups = {g: sd for g, sd in ckpt.state_dicts.items() if g}
    bare = ckpt.state_dicts.get("", {})
    model, ema = groups.get("model"), groups.get("model_ema")
    if bare and (model is not None or ema is not None):
      raise CheckpointError(f"{ckpt.path}: top-level arrays beside 'model'/'model_ema' "
                            f"(e.g. {sorted(bare)[:3]}); a flat file keeps each state dict under "
                            "'<group>/<name>' keys")
    if model is None and ema is None:
      if not bare:
        raise CheckpointError(f"{ckpt.path}: no 'model' or 'model_ema' state dict (groups "
                              f"found: {sorted(groups) or 'none'})")
      log(self.bare_state_dict_note.format(path=ckpt.path))
      return bare, bare
    if model is None:
      log(f"WARNING: {ckpt.path} has no 'model' state dict: params are a copy of 'model_ema'")
      return ema, ema
    if ema is None:
      log(f"WARNING: {ckpt.path} has no 'model_ema' state dict: ema_params are a copy of "
          "'model' (sampling with config.sample.use_ema=True uses the raw weights)")
      return model, model
    return model, ema

  def configure(self, config, ckpt: "Checkpoint", log: Log) -> Tuple[Any, List[str]]:
    """(a copy of `config` with the fields the file implies, e.g. from its saved training
    arguments; one 'config.field=value (source)' line per field changed). Raise ConfigError
    for a config the written workdir could not sample with. By default: unchanged."""
    return config, []

  def check(self, state_dict: StateDict, config, tokenizer) -> None:
    """Raise ValueError naming each config field whose value the weights contradict (before
    the key-by-key match of `params`, whose messages name keys, not fields)."""

  @abc.abstractmethod
  def params(self, state_dict: StateDict, model) -> Mapping[str, Any]:
    """The params tree ({'backbone', 'head'}) of `model`, the family's flax module as built
    for the config, from one state dict. Raise ValueError naming every missing, unexpected
    and mis-shaped key."""


class TokenizerConverter(Converter):
  """A tokenizer's checkpoint -> an Orbax params tree in the output directory.

  arjax/convert/official.py calls `state_dict`, `architecture` and `params`, saves the tree
  with Orbax and records the architecture (a dataclass) in DIR/arjax_<name>.json.
  """

  @abc.abstractmethod
  def state_dict(self, ckpt: "Checkpoint", log: Log) -> StateDict:
    """The tokenizer's one state dict in the file; CheckpointError if there is none, or
    several it cannot tell apart."""

  @abc.abstractmethod
  def architecture(self, state_dict: StateDict, config=None):
    """The architecture (a dataclass) to check the weights against: the one `config` (an
    arjax config, or None) selects when it uses this tokenizer, else the one the weights
    show."""

  @abc.abstractmethod
  def params(self, state_dict: StateDict, architecture) -> Mapping[str, Any]:
    """The params tree for `architecture`; ValueError naming every mismatched key."""


class NetworkConverter(Converter):
  """An evaluation network's weights -> a params file in the output directory.

  arjax/convert/official.py calls `state_dict`, then `write(state_dict, out)`, which checks
  every key (ValueError naming each missing, unexpected and mis-shaped one) and returns the
  path it wrote.
  """

  @abc.abstractmethod
  def state_dict(self, ckpt: "Checkpoint", log: Log) -> StateDict:
    """The network's one state dict in the file; CheckpointError if there is none."""

  @abc.abstractmethod
  def write(self, state_dict: StateDict, out: str, source: str) -> str:
    """Converts and writes the params into directory `out`; returns the file written."""
