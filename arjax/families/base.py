"""The family plug-in: everything about a model family that the shared machinery asks for.

A family is one order of generation over continuous tokens: causal raster AR with a KV cache,
MAR's masked random order, and those to come (next-X entities, next-scale, recurrent). The
training loop, checkpoints, sampling command, evaluation, `bench`, `describe` and the CLI
never name a family: they ask the `Family` object that `config.model.family` selects in
`arjax.registry`. Adding a family is a new folder under `arjax/families/` plus one entry in
`arjax/registry.py` (or `registry.register_family` from a user's own module; see
docs/adding_a_family.md).

What a family supplies:

  schema, sample_schema   its `config.model.*` and extra `config.sample.*` fields
  check(config)           cross-field rules; ConfigError naming the field (by default each
                          `head_splits` width must split into its attention heads)
  cond_width(config)      the width of the z its backbone hands the head (by default
                          `config.model[cond_width_field]`)
  build(...)              (model, loss): one flax module whose params are {'backbone', 'head'},
                          and loss(params, tokens, labels, rng) -> scalar
  sampler(...)            images = sampler(params, labels, rng, cfg_scale=, cfg_schedule_name=,
                          temperature=, first_index=); one compiled program per batch size and
                          guidance setting, per-image seeds (arjax.sampling.base)
  flops(...)              model FLOPs of a train step / a sampler call / a decode step
  example_rows(config)    batch rows of one training example (1; a same-class sequence)
  stack_depths(config)    the (section, field) of each stack of identical layers (`describe`
                          extrapolates activation memory over depth from two shallow traces)
  loss_branches(loss)     the losses whose backward passes are separate programs (MAR's
                          bucket branches); `describe` counts the largest one's activations
  decode_step(...)        optional: one generation step alone, for `bench --mode=decode`
  slot_decoder(...)       optional: decoding in a fixed number of batch slots, one compiled
                          step advancing every slot by one unit of the generation order, for
                          the server's continuous batching (`arjax.sampling.slots`); without
                          it `serve` batches per request, saying so
  describe_line(config)   the one-line summary of the backbone that `describe` prints
  report_fields(config)   sampler settings worth recording in a bench report
  converters()            optional: readers of official checkpoints of this family
                          (`arjax.weights.converter.FamilyConverter`), for `python -m arjax
                          convert`
"""
import abc
from typing import Any, Dict, Sequence, Tuple

from arjax.config.schema import Plugin, Schema, check_divisible, positive
from arjax.errors import ConfigError
from arjax.weights.converter import FamilyConverter

# The size of a Transformer backbone of `depth` blocks of `width` split into `num_heads` heads,
# MLP hidden = mlp_ratio x width: the fields of the causal, recurrent, scale and ARFlow families.
TRANSFORMER_SCHEMA: Schema = {
    "model.width": ((int,), positive, "> 0"),
    "model.depth": ((int,), positive, "> 0"),
    "model.num_heads": ((int,), positive, "> 0"),
    "model.mlp_ratio": ((float, int), positive, "> 0"),
}

# Blocks as one nn.scan (params with a leading 'layers' axis) and their remat policy
# (arjax/layers/transformer.py block_stack): fields of every family built from block stacks.
BLOCK_STACK_SCHEMA: Schema = {
    "model.scan_layers": ((bool,), None, ""),
    "model.remat": ((str,), lambda v: v in ("none", "full", "dots", "dots_no_batch"),
                    "one of 'none', 'full', 'dots', 'dots_no_batch'"),
    # Dropout of the attention probabilities and of each block's residual branches, in
    # training only (MAR's attn_dropout / proj_dropout); 0 = none.
    "model.attention_dropout": ((float, int), lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "model.dropout": ((float, int), lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
}


def compute_dtype(config):
  """The jnp dtype `config.model.dtype` names ('float32' or 'bfloat16')."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.model.dtype]


class Family(Plugin, abc.ABC):
  """A model family (see the module docstring for what each method is for). `name` is its
  `config.model.family`, `schema` its `config.model.*` fields (model.family, label_drop, dtype
  are shared)."""

  #: Sampler fields only this family has (`config.sample.*`).
  sample_schema: Schema = {}
  #: The `config.model` field holding the width of the z the backbone gives the head.
  cond_width_field: str = "width"
  #: (width field, heads field) pairs of `config.model`: each width splits into its heads.
  head_splits: Sequence[Tuple[str, str]] = ()

  def check(self, config) -> None:
    for width, num_heads in self.head_splits:
      check_divisible(config, width, num_heads)

  def cond_width(self, config) -> int:
    """Width of the condition z the backbone gives the head."""
    return config.model[self.cond_width_field]

  @abc.abstractmethod
  def build(self, config, tokenizer, head_net, head) -> Tuple[Any, Any]:
    """(model, loss). `head_net` is the head's flax module (the model holds it as 'head');
    `head` its algorithm. loss(params, tokens [B, T, D], labels [B], rng) -> scalar."""

  @abc.abstractmethod
  def sampler(self, model, head, tokenizer, config):
    """The family's sampler for `config.sample` (see the module docstring)."""

  def flops(self, config, tokenizer, head_kind, mode: str, batch_size: int) -> Dict[str, int]:
    """{'backbone', 'head', 'total'}: model FLOPs of one train step ('train'), sampler call
    ('sample') or decode step ('decode') on `batch_size` images. Matmuls only.

    By default counted from the program itself (`arjax.util.jaxpr_flops`): the jaxpr of the
    loss's gradient (forward + backward) or of one sampler call, traced on shapes only; the
    head's share is the matmuls inside the model's 'head' submodule. Everything the program
    runs counts, padding and the tokenizer's decoder included; a family that wants such
    waste left out writes its own accounting, as the causal and masked families do.
    """
    # pylint: disable=import-outside-toplevel
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    import numpy as np
    from arjax.util import jaxpr_flops

    if mode not in ("train", "sample"):
      raise ValueError(f"mode={mode!r}: family {self.name!r} counts 'train' and 'sample'")
    width = self.cond_width(config)
    net, algorithm = head_kind.build(config, token_dim=tokenizer.token_dim, cond_width=width,
                                     dtype=compute_dtype(config))
    model, loss = self.build(config, tokenizer, net, algorithm)
    params = jax.eval_shape(lambda: nn.meta.unbox(
        model.init(jax.random.PRNGKey(0), *self.example_inputs(tokenizer))["params"]))
    t, d = tokenizer.num_tokens, tokenizer.token_dim
    if mode == "train":
      tokens = jax.ShapeDtypeStruct((batch_size, t, d), jnp.float32)
      labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
      counted = jaxpr_flops.count(jax.grad(loss), params, tokens, labels,
                                  jax.random.PRNGKey(0), modules=("head",))
    else:
      s = config.sample
      sampler = self.sampler(model, algorithm, tokenizer, config)
      labels = np.arange(batch_size) % config.data.num_classes
      counted = jaxpr_flops.count(
          lambda p: sampler(p, labels, jax.random.PRNGKey(0), cfg_scale=s.cfg_scale,
                            cfg_schedule_name=s.cfg_schedule, temperature=s.temperature), params,
          modules=("head",))
    head_flops = counted.by_module["head"]
    return {"backbone": int(counted.flops - head_flops), "head": int(head_flops),
            "total": int(counted.flops)}

  def head_units(self, config, tokenizer) -> Tuple[int, ...]:
    """Tokens sampled by each unit of the generation order, in order: what one head call
    samples per image, and what a DiSA schedule (`config.sample.head_step_schedule`) gives its
    own step count. One token per position by default (the causal family)."""
    return (1,) * tokenizer.num_tokens

  def head_steps(self, config, tokenizer):
    """[(tokens, steps)] of every unit (`head_units`) under `config.sample`'s schedule."""
    from arjax.sampling import step_schedule  # pylint: disable=import-outside-toplevel
    s = config.sample
    units = self.head_units(config, tokenizer)
    steps = step_schedule.head_steps(s.head_step_schedule, s.num_steps, s.head_steps_end,
                                     len(units))
    return list(zip(units, steps))

  def head_evaluations(self, config, tokenizer, head_kind) -> float:
    """Head-net evaluations per sampled token, averaged over the generation order (the
    head's `evaluations_per_token` when the schedule is constant)."""
    units = self.head_steps(config, tokenizer)
    total = sum(tokens * head_kind.evaluations_per_token(config, steps) for tokens, steps in units)
    count = sum(tokens for tokens, _ in units)
    return total // count if total % count == 0 else round(total / count, 3)

  def example_inputs(self, tokenizer) -> tuple:
    """(tokens, labels) of batch 1 that `model.init` is called with."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    return (jnp.zeros((1, tokenizer.num_tokens, tokenizer.token_dim)),
            jnp.zeros((1,), jnp.int32))

  def example_rows(self, config) -> int:
    """Batch rows that make one training example, which the loss never splits: 1 image, or
    ARFlow's sequence of `config.data.group_size` images. `describe` traces whole examples."""
    return 1

  def stack_depths(self, config) -> Sequence[Tuple[str, str]]:
    """(section, field) of each stack of identical layers, the head's included."""
    return (("head", "depth"),)

  def loss_branches(self, loss) -> Sequence[Any]:
    """The loss as the separate programs its backward pass runs (one, by default)."""
    return (loss,)

  def decode_step(self, exp, batch_size: int):
    """(start(), step(state, position) -> state, positions) for `bench --mode=decode`."""
    raise ConfigError(
        f"--mode=decode times one KV-cached generation step; config.model.family="
        f"{self.name!r} has none to time alone: time it with --mode=sample")

  def slot_decoder(self, sampler, num_slots: int):
    """A `SlotDecoder` (arjax/sampling/slots.py) of `num_slots` slots drawing the images
    `sampler` draws, for `python -m arjax serve`'s continuous batching; raises
    `SlotsUnsupported` saying why where this family (or the sampler's settings) has none."""
    from arjax.sampling.slots import SlotsUnsupported  # pylint: disable=import-outside-toplevel
    raise SlotsUnsupported(f"config.model.family={self.name!r} has no slot decoder "
                           "(Family.slot_decoder)")

  def describe_line(self, config) -> str:
    return f"{self.name}"

  def report_fields(self, config) -> Dict[str, Any]:
    return {}

  def converters(self) -> Sequence[FamilyConverter]:
    """The kinds of official checkpoint `python -m arjax convert` imports into this family."""
    return ()
