"""The tokenizer plug-in: images <-> continuous tokens, chosen by `config.tokenizer.name`.

`TokenizerKind.make` returns the tokenizer object, which keeps the contract of
`arjax/tokenizers/__init__.py` (encode, decode, num_tokens, token_dim, value_range).

Token layout. A tokenizer's tokens are a flat `[B, T, D]` sequence in raster order unless it
says otherwise through `tokenizer.layout` (default 'flat'). A family that needs structure on
top of the flat sequence (a pyramid of scales, a sequence of k x k cells) derives it from the
tokenizer's `grid` (the token map's side) and declares the layout it needs; the tokenizer
never has to know the family.

A kind may also read official checkpoints of its weights (`converters()`, for `python -m arjax
convert`; the interface: `arjax.weights.converter.TokenizerConverter`).
"""
import abc
from typing import Sequence

from arjax.config.schema import Plugin
from arjax.weights.converter import TokenizerConverter


class TokenizerKind(Plugin, abc.ABC):
  """A kind of tokenizer (`name` is `config.tokenizer.name`, `schema` its `config.tokenizer.*`
  fields, `check` e.g. the image size against the stride) and how to build one."""

  #: Whether it can train from a latent cache (`config.data.latents`, `cache_latents`).
  caches_latents: bool = False

  @abc.abstractmethod
  def make(self, tok_cfg, data_cfg, *, abstract: bool = False):
    """The tokenizer. `abstract`: weights as shapes only (no file read), enough for token
    shapes, FLOPs and `jax.eval_shape` model building."""

  def converters(self) -> Sequence[TokenizerConverter]:
    """The kinds of official checkpoint `python -m arjax convert` turns into its weights."""
    return ()
