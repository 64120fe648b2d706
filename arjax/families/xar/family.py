"""The xAR family (next-X prediction with Noisy Context Learning) as a plug-in.

xAR ("Beyond Next-Token: Next-X Prediction for Autoregressive Visual Generation", Ren et al.
2025) generates the latent grid entity by entity (a cell of k x k tokens, a token, a subsample
or the whole image: `arjax/families/xar/entities.py`); its Transformer is itself the flow model
(`backbone.py`), trained on every entity noised at its own time (`model.py`) and sampled entity
by entity with a KV cache of the finished ones (`sampler.py`). There is no per-token head:
configs select `head.name='none'` (`arjax/heads/none.py`). Official checkpoints (xAR-B/L/H.pth)
import through `python -m arjax convert --kind=xar` (`convert.py`).
"""
import functools
import math

from arjax.config.schema import positive
from arjax.errors import ConfigError
from arjax.families import base
from arjax.families.xar import model as xar_model
from arjax.families.xar.backbone import XarBackbone, mlp_hidden
from arjax.families.xar.convert import XarConverter
from arjax.families.xar.entities import KINDS, EntityLayout
from arjax.families.xar.model import XarModel
from arjax.families.xar.sampler import SOLVERS, XarSampler
from arjax.sampling.base import sampler_settings
from arjax.util.flops import matmul


def square_grid(tokenizer) -> int:
  """The side of the tokenizer's square token grid."""
  side = math.isqrt(tokenizer.num_tokens)
  if side * side != tokenizer.num_tokens:
    raise ConfigError(f"xAR needs a square token grid; the tokenizer gives "
                      f"{tokenizer.num_tokens} tokens")
  return side


def layout_from_config(config, tokenizer) -> EntityLayout:
  side = square_grid(tokenizer)
  m = config.model
  try:
    return EntityLayout(m.entity, side, side, m.entity_k)
  except ValueError as e:
    raise ConfigError(f"config.model.entity={m.entity!r}, config.model.entity_k={m.entity_k} "
                      f"on the {side} x {side} token grid: {e}") from None


def _blocks(rows: int, keys: int, width: int, hidden: int, depth: int) -> int:
  """`depth` xAR blocks on `rows` token rows seeing `keys` keys each (ada_lin not included):
  q, k, v, proj; scores and probs.v; GEGLU's three matrices."""
  return depth * (4 * matmul(rows, width, width) + 2 * matmul(rows, width, keys)
                  + 3 * matmul(rows, width, hidden))


def forward_flops(config, token_dim: int, rows: int, tokens: int, keys: int, entities: int) -> int:
  """One backbone call on `rows` images of `tokens` tokens (`entities` of them) with `keys`
  visible keys per query (the block-causal mask's share is not skipped: XLA computes it)."""
  m = config.model
  w, hidden = m.width, mlp_hidden(m.width, m.mlp_ratio)
  depth = m.encoder_depth + m.decoder_depth
  n = rows * tokens
  condition = (matmul(rows * entities, 256, w) + matmul(rows * entities, w, w)
               + depth * matmul(rows * entities, w, 6 * w))
  return (matmul(n, token_dim, w) + matmul(n, w, w) + matmul(n, w, token_dim) + condition
          + _blocks(n, keys, w, hidden, depth))


class XarFamily(base.Family):
  """`model.family='xar'`."""
  name = "xar"
  cond_width_field = "width"
  head_splits = (("width", "encoder_heads"), ("width", "decoder_heads"))
  schema = {
      "model.width": ((int,), positive, "> 0"),
      "model.encoder_depth": ((int,), positive, "> 0"),
      "model.encoder_heads": ((int,), positive, "> 0"),
      "model.decoder_depth": ((int,), positive, "> 0"),
      "model.decoder_heads": ((int,), positive, "> 0"),
      "model.mlp_ratio": ((float, int), positive, "> 0"),
      # The prediction unit (arjax/families/xar/entities.py) and its k (cell side, stride).
      "model.entity": ((str,), lambda v: v in KINDS, f"one of {KINDS}"),
      "model.entity_k": ((int,), positive, "> 0"),
      # Logit-normal training times, one per (image, entity).
      "model.t_mean": ((float, int), None, ""),
      "model.t_std": ((float, int), positive, "> 0"),
      **base.BLOCK_STACK_SCHEMA,
  }
  # The official SDE sampler besides the ODE solvers.
  sample_schema = {
      "sample.solver": ((str,), lambda v: v in SOLVERS, f"one of {SOLVERS}"),
  }

  def check(self, config) -> None:
    super().check(config)
    m = config.model
    for heads in ("encoder_heads", "decoder_heads"):
      if (m.width // m[heads]) % 4:
        raise ConfigError(f"config.model.width={m.width} / config.model.{heads}={m[heads]} = "
                          f"{m.width // m[heads]}: xAR's 2-D RoPE needs a head dim divisible "
                          "by 4")
    if config.head.name != "none":
      raise ConfigError(f"config.head.name={config.head.name!r}: xAR's backbone is the whole "
                        "flow model and has no per-token head; use 'none'")

  def build(self, config, tokenizer, head_net, head):
    if head_net is not None:
      raise ConfigError("xAR has no per-token head: config.head.name must be 'none'")
    m = config.model
    backbone = XarBackbone(
        layout=layout_from_config(config, tokenizer), token_dim=tokenizer.token_dim,
        width=m.width, encoder_depth=m.encoder_depth, encoder_heads=m.encoder_heads,
        decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads, mlp_ratio=m.mlp_ratio,
        num_classes=config.data.num_classes, dtype=base.compute_dtype(config),
        scan_layers=m.scan_layers, remat=m.remat, attention_dropout=m.attention_dropout,
        dropout=m.dropout)
    model = XarModel(backbone)
    loss = functools.partial(xar_model.noisy_context_loss, model=model, label_drop=m.label_drop,
                             t_mean=float(m.t_mean), t_std=float(m.t_std))
    return model, loss

  def sampler(self, model, head, tokenizer, config):
    s = config.sample
    return XarSampler(model, head, tokenizer, **sampler_settings(s))

  def flops(self, config, tokenizer, head_kind, mode, batch_size):
    """train: one block-causal forward over all L tokens (every query against all L keys, as
      computed), backward 2x (z_proj's input is data: 1x).
    sample: per entity, num_steps calls (Heun 2x) of `size` tokens against the full-length
      cache, and one commit call; rows doubled under CFG.
    decode: one entity of that."""
    if mode not in ("train", "sample", "decode"):
      raise ValueError(f"mode={mode!r}: the xar family counts 'train', 'sample' and 'decode'")
    layout = layout_from_config(config, tokenizer)
    d, length = tokenizer.token_dim, tokenizer.num_tokens
    if mode == "train":
      forward = forward_flops(config, d, batch_size, length, length, layout.num_entities)
      z_proj = matmul(batch_size * length, d, config.model.width)
      backbone = 3 * forward - z_proj
    else:
      s = config.sample
      rows = batch_size * (2 if s.cfg_scale != 1.0 else 1)
      per_call = forward_flops(config, d, rows, layout.size, length, 1)
      calls = lambda steps: steps * (2 if s.solver == "heun" else 1) + 1  # + the commit
      if mode == "decode":
        backbone = calls(s.num_steps) * per_call
      else:  # each entity its own step count under a DiSA schedule
        backbone = sum(calls(steps) for _, steps in self.head_steps(config, tokenizer)) * per_call
    return {"backbone": int(backbone), "head": 0, "total": int(backbone)}

  def head_units(self, config, tokenizer):
    """One unit per entity (the network samples an entity's tokens together)."""
    layout = layout_from_config(config, tokenizer)
    return (layout.size,) * layout.num_entities

  def decode_step(self, exp, batch_size):
    """One entity of the sampler (its num_steps network calls against the KV cache of the
    entities before it, then its commit): `entity_step`, the body of the sampler's scan. The
    entity index is an argument, so one compilation serves every entity; the cache has its
    full static length for each (masked attention over all of it)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from arjax.sampling.base import image_keys  # pylint: disable=import-outside-toplevel
    from arjax.families.xar.sampler import entity_draws, entity_scales, entity_step  # pylint: disable=import-outside-toplevel
    config, model = exp.config, exp.model
    s = config.sample
    layout = model.backbone.layout
    guided = s.cfg_scale != 1.0
    labels = jnp.arange(batch_size, dtype=jnp.int32) % config.data.num_classes
    draw = entity_draws(image_keys(jax.random.PRNGKey(s.seed), jnp.arange(batch_size)),
                        layout.size, model.backbone.token_dim)
    scales = jnp.asarray(entity_scales(s.cfg_scale, s.cfg_schedule, layout.num_entities))
    rows = batch_size * (2 if guided else 1)

    def one_entity(params, cache, s_index):
      _, step = entity_step(params, labels, draw, scales, s.temperature, model=model,
                            solver=s.solver, num_steps=s.num_steps, guided=guided,
                            cfg_interval=tuple(s.cfg_interval),
                            value_range=exp.tokenizer.value_range)
      return step(cache, s_index)[0]

    e = layout.num_entities
    return (lambda params: model.backbone.init_cache(rows)), one_entity, (0, e // 2, e - 1)

  def stack_depths(self, config):
    return (("model", "encoder_depth"), ("model", "decoder_depth"))

  def describe_line(self, config):
    m = config.model
    return (f"xar: {m.entity} entities (k={m.entity_k}), width {m.width}, encoder "
            f"{m.encoder_depth} ({m.encoder_heads} heads), decoder {m.decoder_depth} "
            f"({m.decoder_heads} heads)")

  def report_fields(self, config):
    return {"entity": config.model.entity, "entity_k": config.model.entity_k,
            "solver": config.sample.solver}

  def converters(self):
    return (XarConverter(),)
