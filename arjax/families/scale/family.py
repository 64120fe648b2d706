"""The next-scale family (FlowAR; M-VAR's linear inter-scale mixing as an option) as a plug-in.

`model.family='scale'`. FlowAR ("Scale-wise Autoregressive Image Generation Meets Flow
Matching", Ren et al. 2024) generates a token map coarse to fine: the scales are the map
area-averaged to doubling sides (`pyramid.py`), a Transformer with block-causal attention over
the concatenated scales reads the class and the up-sampled previous scale and gives a z per
token of the next one (`backbone.py`), and a flow-matching head draws that scale's tokens given
their z (`model.py`, the registry's per-token head: `head.name='flow'`). Sampling is one jitted
program of K cached backbone calls (`sampler.py`). M-VAR ("M-VAR: Decoupled Scale-wise
Autoregressive Modeling", Ren et al. 2024) keeps attention bidirectional inside a scale and
mixes across scales with a linear-cost recurrent layer: `model.mixer='hybrid'`
(`arjax.layers.linear_attention`).

The tokenizer's map must be square; the last of `model.scales` is its side (the pyramid's
finest scale is the map itself). `model.scales=()` means FlowAR's doubling 1, 2, 4, ..., side.
"""
import functools
import math

from arjax.config.schema import positive
from arjax.errors import ConfigError
from arjax.families import base
from arjax.families.scale.backbone import MIXERS, ScaleBackbone
from arjax.families.scale.flow_net import ScaleFlowNet
from arjax.families.scale.model import ScaleModel, scale_flow_loss, scale_loss
from arjax.families.scale.pyramid import UPSAMPLINGS, ScalePyramid, doubling_sides
from arjax.families.scale.sampler import ScaleSampler, sample_scales

FLOW_NETS = ("token", "scale")


def _increasing_sides(v) -> bool:
  return (all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v)
          and all(a < b for a, b in zip(v, v[1:])))


def pyramid_from_config(config, tokenizer) -> ScalePyramid:
  """The pyramid of `config.model.scales` on the tokenizer's square map; ConfigError naming the
  field when they do not fit."""
  side = math.isqrt(tokenizer.num_tokens)
  if side * side != tokenizer.num_tokens:
    raise ConfigError(f"the scale family needs a square token map; the tokenizer gives "
                      f"{tokenizer.num_tokens} tokens")
  sides = tuple(config.model.scales) or doubling_sides(side)
  if sides[-1] != side:
    raise ConfigError(f"config.model.scales={tuple(config.model.scales)}: the last scale must be "
                      f"the token map's side, {side} (the tokenizer gives {side} x {side})")
  return ScalePyramid(sides, upsample=config.model.upsample)


class ScaleFamily(base.Family):
  """`model.family='scale'`."""
  name = "scale"
  cond_width_field = "width"
  head_splits = (("width", "num_heads"),)
  schema = {
      **base.TRANSFORMER_SCHEMA,
      # Sides of the scales, coarse to fine, the last the token map's side; () = doubling.
      "model.scales": ((tuple, list), _increasing_sides,
                       "positive integers, strictly increasing (() = doubling 1, 2, 4, ...)"),
      # How scale k-1 becomes scale k's AR input (arjax/families/scale/pyramid.py).
      "model.upsample": ((str,), lambda v: v in UPSAMPLINGS, f"one of {UPSAMPLINGS}"),
      # 'attention': block-causal attention (FlowAR); 'hybrid': intra-scale attention and a
      # gated linear attention across scales (M-VAR).
      "model.mixer": ((str,), lambda v: v in MIXERS, f"one of {MIXERS}"),
      # Chunk length of the linear attention's chunk-parallel form (hybrid only).
      "model.chunk_size": ((int,), positive, "> 0"),
      # 'token': the registry head draws each token on its own given its z; 'scale': FlowAR's
      # flow Transformer over each whole scale (spatially adaptive AdaLN; flow_net.py), with
      # config.head's width, depth, dropout and the flow head's algorithm.
      "model.flow_net": ((str,), lambda v: v in FLOW_NETS, f"one of {FLOW_NETS}"),
      # Attention heads of the 'scale' flow net (config.head.width splits into them).
      "model.flow_heads": ((int,), positive, "> 0"),
      **base.BLOCK_STACK_SCHEMA,
  }

  def check(self, config) -> None:
    super().check(config)
    if config.head.name == "none":
      raise ConfigError("config.head.name='none': the scale family draws each scale's tokens "
                        "with a per-token head; use 'flow' (or 'mar_diffusion')")
    if config.model.flow_net == "scale":
      if config.head.name != "flow":
        raise ConfigError(f"config.head.name={config.head.name!r}: config.model.flow_net='scale' "
                          "runs the flow head's algorithm; use 'flow'")
      if config.head.width % config.model.flow_heads:
        raise ConfigError(f"config.head.width={config.head.width} does not split into "
                          f"config.model.flow_heads={config.model.flow_heads} heads")

  def build(self, config, tokenizer, head_net, head):
    m = config.model
    backbone = ScaleBackbone(
        pyramid=pyramid_from_config(config, tokenizer), token_dim=tokenizer.token_dim,
        width=m.width, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
        num_classes=config.data.num_classes, mixer=m.mixer, chunk_size=m.chunk_size,
        dtype=base.compute_dtype(config), scan_layers=m.scan_layers, remat=m.remat,
        attention_dropout=m.attention_dropout, dropout=m.dropout)
    if m.flow_net == "scale":  # FlowAR's flow Transformer in place of the registry's net
      h = config.head
      head_net = ScaleFlowNet(token_dim=tokenizer.token_dim, width=h.width, depth=h.depth,
                              num_heads=m.flow_heads, dtype=base.compute_dtype(config),
                              dropout=h.dropout)
    model = ScaleModel(backbone=backbone, head=head_net, flow_net=m.flow_net)
    objective = scale_flow_loss if m.flow_net == "scale" else scale_loss
    loss = functools.partial(objective, model=model, head=head, label_drop=m.label_drop,
                             num_classes=config.data.num_classes)
    return model, loss

  def sampler(self, model, head, tokenizer, config):
    s = config.sample
    return ScaleSampler(model, head, tokenizer, num_steps=s.num_steps, solver=s.solver,
                        cfg_interval=tuple(s.cfg_interval))

  def flops(self, config, tokenizer, head_kind, mode, batch_size):
    """Counted from the programs' jaxprs (`Family.flops`); a sampler call is counted on the
    tokens it draws, `sample_scales`, without the tokenizer's decoder (not model FLOPs, and a
    VAE tokenizer built abstract has no weights to trace it with)."""
    if mode != "sample":
      return super().flops(config, tokenizer, head_kind, mode, batch_size)
    # pylint: disable=import-outside-toplevel
    import jax
    import flax.linen as nn
    import numpy as np
    from arjax.sampling.base import head_with_solver
    from arjax.util import jaxpr_flops

    net, algorithm = head_kind.build(config, token_dim=tokenizer.token_dim,
                                     cond_width=self.cond_width(config),
                                     dtype=base.compute_dtype(config))
    model, _ = self.build(config, tokenizer, net, algorithm)
    params = jax.eval_shape(lambda: nn.meta.unbox(
        model.init(jax.random.PRNGKey(0), *self.example_inputs(tokenizer))["params"]))
    s = config.sample
    guided = s.cfg_scale != 1.0
    sampler = self.sampler(model, algorithm, tokenizer, config)
    scales = sampler.guidance_scales(s.cfg_scale, s.cfg_schedule)
    labels = np.arange(batch_size) % config.data.num_classes
    counted = jaxpr_flops.count(
        lambda p: sample_scales(p, labels, jax.random.PRNGKey(0), scales, s.temperature,
                                model=model, head=head_with_solver(algorithm, s.solver),
                                guided=guided, num_steps=s.num_steps,
                                cfg_interval=tuple(s.cfg_interval)), params, modules=("head",))
    head_flops = counted.by_module["head"]
    return {"backbone": int(counted.flops - head_flops), "head": int(head_flops),
            "total": int(counted.flops)}

  def stack_depths(self, config):
    return (("model", "depth"), ("head", "depth"))

  def describe_line(self, config):
    m = config.model
    scales = tuple(m.scales) or "doubling"
    return (f"scale: scales {scales}, {m.mixer} mixer, {m.width} x {m.depth} "
            f"({m.num_heads} heads), flow net per {m.flow_net}")

  def report_fields(self, config):
    return {"scales": list(config.model.scales), "mixer": config.model.mixer,
            "solver": config.sample.solver}
