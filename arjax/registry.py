"""The one place that lists arjax's plug-ins: families, heads and tokenizers, by name.

As big_vision picks a model by name, `config.model.family`, `config.head.name` and
`config.tokenizer.name` pick an entry here, and everything above this module (data, training,
evaluation, bench, describe, serving, the CLI) asks the entry instead of naming a family.
Adding a family is its folder under `arjax/families/` plus one line in `FAMILIES` below; a
user's own family, head or tokenizer registers from its own module with `register_family` /
`register_head` / `register_tokenizer` and is loaded by the CLI from the modules listed in the
environment variable ARJAX_PLUGINS (comma-separated), see docs/adding_a_family.md.

Official PyTorch checkpoints are imported the same way: `converters()` lists what every
registered family and tokenizer kind offers (`Family.converters()`,
`TokenizerKind.converters()`), and `python -m arjax convert` picks among them.

The config schema is put together here too: the shared fields (`arjax.config.schema.SCHEMA`)
plus the chosen tokenizer's, family's and head's own, so a field of another plug-in (a causal
config carrying `model.buffer_size`) is an unknown key.
"""
import importlib
import os
from typing import Dict

from arjax.config import schema as config_schema
from arjax.errors import ConfigError
from arjax.families.arflow.family import ArflowFamily
from arjax.families.base import Family, compute_dtype
from arjax.families.causal.family import CausalFamily
from arjax.families.masked.family import MaskedFamily
from arjax.families.recurrent.family import RecurrentFamily
from arjax.families.scale.family import ScaleFamily
from arjax.families.xar.family import XarFamily
from arjax.heads.base import Head
from arjax.heads.diffusion import MarDiffusionHead
from arjax.heads.flow import FlowHead
from arjax.heads.none import NoHead
from arjax.heads.shortcut import ShortcutHead
from arjax.tokenizers.base import TokenizerKind
from arjax.tokenizers.kl_vae import KLVAEKind
from arjax.tokenizers.patchify import PatchifyKind
from arjax.weights.converter import Converter

FAMILIES: Dict[str, Family] = {
    "causal": CausalFamily(),   # raster order, KV cache (arjax/families/causal)
    "mar": MaskedFamily(),      # MAR's masked random order (arjax/families/masked)
    "xar": XarFamily(),         # next-X entities, noisy context, no head (arjax/families/xar)
    "scale": ScaleFamily(),     # next-scale: FlowAR, M-VAR's hybrid mixer (arjax/families/scale)
    "recurrent": RecurrentFamily(),  # raster order, gated linear attention state (arjax/families/recurrent)
    "arflow": ArflowFamily(),   # same-class image sequences, gated retention (arjax/families/arflow)
}

HEADS: Dict[str, Head] = {
    "flow": FlowHead(),                   # flow matching, ODE sampler (arjax/heads/flow.py)
    "mar_diffusion": MarDiffusionHead(),  # MAR's DiffLoss, DDPM (arjax/heads/diffusion.py)
    "none": NoHead(),                     # the backbone is the whole model (arjax/heads/none.py)
    "shortcut": ShortcutHead(),           # FAR's few-step shortcut head (arjax/heads/shortcut.py)
}

TOKENIZERS: Dict[str, TokenizerKind] = {
    "patchify": PatchifyKind(),   # pixel patches (arjax/tokenizers/patchify.py)
    "kl_vae": KLVAEKind(),        # MAR's frozen KL VAE (arjax/tokenizers/kl_vae.py)
}

def _register(table: dict, kind: str, entry) -> None:
  if not entry.name:
    raise ValueError(f"a {kind} needs a name to be registered under: {entry!r}")
  known = table.get(entry.name)
  if known is not None and type(known) is not type(entry):
    raise ValueError(f"{kind} {entry.name!r} is registered already ({type(known).__name__})")
  table[entry.name] = entry


def register_family(family: Family) -> Family:
  """Adds a family under `family.name` (from a user's module; see the module docstring)."""
  _register(FAMILIES, "family", family)
  return family


def register_head(head: Head) -> Head:
  _register(HEADS, "head", head)
  return head


def register_tokenizer(kind: TokenizerKind) -> TokenizerKind:
  _register(TOKENIZERS, "tokenizer", kind)
  return kind


def load_plugins(modules: str = None) -> None:
  """Imports the modules named in `modules` (default: $ARJAX_PLUGINS, comma-separated), which
  register their plug-ins on import."""
  modules = os.environ.get("ARJAX_PLUGINS", "") if modules is None else modules
  for name in filter(None, (m.strip() for m in modules.split(","))):
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ConfigError(f"ARJAX_PLUGINS: cannot import {name!r}: {e}") from e


def family(config) -> Family:
  return FAMILIES[config_schema.check_selector(config, "model.family", FAMILIES)]


def head(config) -> Head:
  return HEADS[config_schema.check_selector(config, "head.name", HEADS)]


def tokenizer_kind(config) -> TokenizerKind:
  return TOKENIZERS[config_schema.check_selector(config, "tokenizer.name", TOKENIZERS)]


def converters() -> Dict[str, Converter]:
  """Every registered family's and tokenizer kind's converters, by name (the `--kind` value)."""
  found: Dict[str, Converter] = {}
  for plugin in (*FAMILIES.values(), *TOKENIZERS.values()):
    for converter in plugin.converters():
      known = found.setdefault(converter.name, converter)
      if type(known) is not type(converter):
        raise ValueError(f"converter {converter.name!r} of {plugin.name!r}: the name is taken "
                         f"({type(known).__name__})")
  return found


def schema_for(config) -> config_schema.Schema:
  """The shared fields plus those of the chosen tokenizer, model family and head."""
  kind, fam, hd = tokenizer_kind(config), family(config), head(config)
  schema = dict(config_schema.SCHEMA)
  schema["tokenizer.name"] = ((str,), lambda v: v in TOKENIZERS, f"one of {sorted(TOKENIZERS)}")
  schema["model.family"] = ((str,), lambda v: v in FAMILIES, f"one of {sorted(FAMILIES)}")
  schema["head.name"] = ((str,), lambda v: v in HEADS, f"one of {sorted(HEADS)}")
  schema.update(kind.schema)
  schema.update(fam.schema)
  schema.update(fam.sample_schema)
  schema.update(hd.schema)
  return schema


def validate(config) -> None:
  """Raises ConfigError naming the first bad field (unknown keys included); nothing is built."""
  config_schema.check_fields(config, schema_for(config))
  family(config).check(config)
  kind = tokenizer_kind(config)
  kind.check(config)
  if config.data.latents is not None and not kind.caches_latents:
    raise ConfigError(f"config.data.latents={config.data.latents!r}: cached latents need a VAE "
                      f"tokenizer (config.tokenizer.name='kl_vae'), not {kind.name!r}")
  head(config).check(config)
  config_schema.check_shared(config)


def make_tokenizer(tok_cfg, data_cfg, *, abstract: bool = False):
  """The tokenizer `config.tokenizer` names. `abstract`: a VAE's parameters as shapes only
  (no weights read), enough for token shapes and `jax.eval_shape` model building."""
  if tok_cfg.name not in TOKENIZERS:
    raise ConfigError(f"config.tokenizer.name={tok_cfg.name!r}: must be one of "
                      f"{sorted(TOKENIZERS)}")
  return TOKENIZERS[tok_cfg.name].make(tok_cfg, data_cfg, abstract=abstract)


def build_model(config, tokenizer):
  """(model, head algorithm, loss) from config.model / config.head and the tokenizer's shapes.

  `loss(params, tokens, labels, rng)` is the family's training objective (a scalar).
  """
  fam, hd = family(config), head(config)
  net, algorithm = hd.build(config, token_dim=tokenizer.token_dim,
                            cond_width=fam.cond_width(config), dtype=compute_dtype(config))
  model, loss = fam.build(config, tokenizer, net, algorithm)
  return model, algorithm, loss


def flops(config, mode: str, batch_size: int) -> Dict[str, int]:
  """Model FLOPs of one train step / sampler call / decode step: {'backbone', 'head', 'total'}
  (the family's and head's own accounting; token shapes from an abstract tokenizer, so no
  weights are read)."""
  tokenizer = make_tokenizer(config.tokenizer, config.data, abstract=True)
  return family(config).flops(config, tokenizer, head(config), mode, batch_size)
