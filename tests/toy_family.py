"""A toy family registered from outside arjax: the proof that a family is a plug-in.

"bag": every token is drawn independently given its class and position. The backbone maps
(class, position) to z by a two-layer MLP; the head (any registered head) models each token
given its z. Training is one forward pass over all tokens, sampling one head call for all
tokens at once. Nothing in arjax names it: tests/test_plugin_family.py runs train, sample,
eval, bench and describe on it through the CLI, with ARJAX_PLUGINS=toy_family, and
tests/test_convert_hooks.py imports a file of its "official" weights with `convert` (its
`BagConverter`).

docs/adding_a_family.md walks through this file.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arjax import registry
from arjax.config.schema import positive
from arjax.families import base
from arjax.heads import noise as noise_draws
from arjax.sampling.base import ImageSampler, cfg_schedule, image_keys
from arjax.weights import converter
from arjax.weights.state_dict import CheckpointError


class BagBackbone(nn.Module):
  """(class, position) -> z [B, T, W]."""
  num_tokens: int
  width: int
  num_classes: int   # the table has one more row: the null class of CFG

  @nn.compact
  def __call__(self, labels):
    classes = nn.Embed(self.num_classes + 1, self.width, name="class_embed")(labels)
    positions = self.param("positions", nn.initializers.normal(0.02),
                           (self.num_tokens, self.width))
    h = classes[:, None, :] + positions[None]
    return nn.Dense(self.width, name="out")(nn.gelu(nn.Dense(self.width, name="hidden")(h)))


class BagModel(nn.Module):
  backbone: nn.Module
  head: nn.Module

  def __call__(self, tokens, labels):
    """Touches every parameter (used by init)."""
    z = self.backbone(labels)
    b, t, d = tokens.shape
    return self.head(tokens.reshape(b * t, d), jnp.zeros((b * t,)), z.reshape(b * t, -1))

  def condition(self, labels):
    return self.backbone(labels)

  def head_net(self, x_t, t, z):
    return self.head(x_t, t, z)


def bag_loss(params, tokens, labels, rng, *, model, head, label_drop, num_classes):
  """Mean head loss over every token; a `label_drop` share of labels become the null class."""
  drop_rng, head_rng = jax.random.split(rng)
  labels = jnp.where(jax.random.uniform(drop_rng, labels.shape) < label_drop, num_classes, labels)
  apply = functools.partial(model.apply, {"params": params})
  z = apply(labels, method=BagModel.condition)
  b, t, d = tokens.shape
  net_fn = lambda x_t, tt, zz: apply(x_t, tt, zz, method=BagModel.head_net)
  return head.loss(net_fn, tokens.reshape(b * t, d), z.reshape(b * t, -1), head_rng).mean()


@dataclasses.dataclass
class BagSampler(ImageSampler):
  """All tokens of a batch in one head call. The fields (model, head, tokenizer, num_steps,
  solver, ...), the call, request checks, compiled-program cache and per-image seeds are
  ImageSampler's."""

  def guidance_scales(self, cfg_scale, cfg_schedule_name):
    return cfg_schedule(cfg_scale, cfg_schedule_name, self.tokenizer.num_tokens)

  def sample_images(self, params, labels, rng, scales, temperature, image_ids, *, guided):
    apply = functools.partial(self.model.apply, {"params": params})
    b, t, d = labels.shape[0], self.tokenizer.num_tokens, self.tokenizer.token_dim
    rows = jnp.concatenate([labels, jnp.full_like(labels, self.model.backbone.num_classes)]) \
        if guided else labels
    z = apply(rows, method=BagModel.condition).reshape(-1, self.model.backbone.width)
    # Token i of image b draws from fold_in(image key b, i): independent of the batch split.
    keys = jax.vmap(lambda k: noise_draws.fold_in_each(k, jnp.arange(t)))(
        image_keys(rng, image_ids))
    net_fn = lambda x_t, tt, zz: apply(x_t, tt, zz, method=BagModel.head_net)
    scale = jnp.tile(scales, b)[:, None] if guided else None
    tokens = self.head_for_sampling.sample(net_fn, z, keys.reshape(b * t, *keys.shape[2:]), cfg_scale=scale,
                               temperature=temperature, steps=self.num_steps,
                               cfg_interval=self.cfg_interval)
    tokens = jnp.clip(tokens, *self.value_range) if self.value_range else tokens
    return self.tokenizer.decode(tokens.reshape(b, t, d))


class BagConverter(converter.FamilyConverter):
  """`--kind=toy_bag`: a file {'bag': {'<flax path, dotted>': array}}, as a PyTorch port of the
  bag might save it; one state dict, so params and ema_params alike."""
  name = "toy_bag"
  what = "toy bag"
  groups = ("bag",)
  evidence = "backbone.positions"

  def detect(self, ckpt):
    return self.evidence in converter.parameter_names(ckpt)

  def state_dicts(self, ckpt, log):
    if "bag" not in ckpt.state_dicts:
      raise CheckpointError(f"{ckpt.path}: no 'bag' state dict")
    log(f"{ckpt.path} has no EMA: ema_params are a copy of params")
    return ckpt.state_dicts["bag"], ckpt.state_dicts["bag"]

  def params(self, state_dict, model):
    tree = {}
    for name, value in state_dict.items():
      *path, leaf = name.split(".")
      node = tree
      for part in path:
        node = node.setdefault(part, {})
      node[leaf] = value
    return tree


class BagFamily(base.Family):
  """`model.family='toy_bag'`: no `flops` of its own, so the jaxpr of its real step counts."""
  name = "toy_bag"
  schema = {"model.width": ((int,), positive, "> 0")}

  def build(self, config, tokenizer, head_net, head):
    backbone = BagBackbone(num_tokens=tokenizer.num_tokens, width=config.model.width,
                           num_classes=config.data.num_classes)
    model = BagModel(backbone=backbone, head=head_net)
    loss = functools.partial(bag_loss, model=model, head=head, label_drop=config.model.label_drop,
                             num_classes=config.data.num_classes)
    return model, loss

  def sampler(self, model, head, tokenizer, config):
    s = config.sample
    return BagSampler(model, head, tokenizer, num_steps=s.num_steps, solver=s.solver,
                      cfg_interval=tuple(s.cfg_interval))

  def describe_line(self, config):
    return f"toy_bag: MLP {config.model.width} over (class, position)"

  def converters(self):
    return (BagConverter(),)


registry.register_family(BagFamily())
