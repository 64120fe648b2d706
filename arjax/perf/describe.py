"""`describe`: a config's parameters, FLOPs and memory per device on its mesh, without running it.

    python -m arjax describe --config=configs/X.py[:variant] [--num_devices=N]

Nothing is compiled or allocated, and the mesh need not exist on this machine:
the parameters, EMA and optimizer state are traced with `jax.eval_shape` (the
KL VAE tokenizer as shapes only, so its weights are not needed), each leaf
keeps its logical axis names, `config.sharding.rules` turns them into mesh
axes, and a leaf's per-device shard is its shape with every sharded dimension
divided (rounded up) by the product of its mesh axes' sizes. The mesh sizes come
from config.mesh.shape; a -1 entry takes `num_devices` (default:
jax.device_count()).

What is printed (`describe` returns it as a dict, `format_table` prints it):
  parameters     total and per top-level module (backbone, head); the tokenizer's
                 frozen weights apart (they are not trained)
  FLOPs          `bench.analytic_flops`: one train step on config.train.global_batch_size
                 (forward + backward, backbone + head), and one sampled image with the
                 config's sampler settings (CFG doubles the rows)
  memory/device  params, EMA, gradients (sharded like the params) and the optimizer's
                 state: exact per-device shard sizes of the float32 trees. Activations:
                 an ESTIMATE of what the train step saves for its backward pass, from the
                 residuals of the traced loss (see `activation_bytes`). The tokenizer's
                 weights: replicated, they are a constant of the jitted step when it encodes
                 images (none with config.data.latents). Not counted: XLA's temporaries
                 (the VAE encoder's feature maps, the gradient of the layer being
                 back-propagated, ...) and the input batch.
  warnings       a parameter dimension not divisible by its mesh axes (JAX then pads the
                 shards unevenly, or refuses the sharding), and a global batch not
                 divisible by the batch axes.
"""
import collections
import copy
import math
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.extend import core as jax_core

from arjax.perf import bench
from arjax.config import schema as configs
from arjax.parallel import sharding
from arjax import registry
from arjax.training import state as train_state
from arjax.util.numbers import binary as _binary, count as _count, flops as _flops


def mesh_sizes(config, num_devices: Optional[int] = None) -> dict:
  """{axis: size} of config.mesh.shape; a -1 takes num_devices (default jax.device_count())."""
  if num_devices is not None and num_devices <= 0:
    raise configs.ConfigError(f"--num_devices={num_devices} must be > 0")
  shape = tuple(config.mesh.shape)
  if -1 in shape:
    num_devices = num_devices or jax.device_count()
  elif num_devices is None:
    num_devices = math.prod(shape)  # a fixed mesh describes itself: its devices need not exist
  try:
    return dict(zip(sharding.MESH_AXES, sharding.mesh_shape(shape, num_devices)))
  except ValueError as e:
    raise configs.ConfigError(f"{e} (--num_devices={num_devices})") from e


def shard_shape(shape, mesh_spec, sizes: dict) -> tuple:
  """One device's shard of an array of `shape` laid out as `mesh_spec` (a PartitionSpec)."""
  spec = tuple(mesh_spec) + (None,) * (len(shape) - len(mesh_spec))
  return tuple(-(-dim // sharding.axes_size(axes, sizes)) for dim, axes in zip(shape, spec))


def abstract_tokenizer(config):
  """The config's tokenizer with a VAE's weights as shapes only: no checkpoint is read."""
  return registry.make_tokenizer(config.tokenizer, config.data, abstract=True)


def abstract_trees(config, tokenizer):
  """(model params, optimizer state) as boxed ShapeDtypeStructs (logical names kept): what
  the TrainState holds, traced without computing anything."""
  model, _, _ = registry.build_model(config, tokenizer)
  optimizer = train_state.make_optimizer(config.train)
  tokens = jnp.zeros((1, tokenizer.num_tokens, tokenizer.token_dim))
  labels = jnp.zeros((1,), jnp.int32)

  def init(rng):
    params = model.init(rng, tokens, labels)["params"]
    return params, optimizer.init(params)

  return jax.eval_shape(init, jax.random.PRNGKey(0))


def leaf_shards(boxed_tree, rules, sizes: dict):
  """[(path, shape, itemsize, logical names, mesh spec, shard shape)] for every leaf."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(boxed_tree, is_leaf=is_box)[0]:
    names = tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else ()
    value = leaf.unbox() if is_box(leaf) else leaf
    spec = nn.logical_to_mesh_axes(names, rules) if names else jax.sharding.PartitionSpec()
    rows.append((jax.tree_util.keystr(path), tuple(value.shape), value.dtype.itemsize, names,
                 spec, shard_shape(value.shape, spec, sizes)))
  return rows


def _bytes(rows, shard: bool = True) -> int:
  return sum(math.prod(r[5] if shard else r[1]) * r[2] for r in rows)


def divisibility_warnings(param_rows, sizes: dict) -> list:
  """One line per (logical axis, size, mesh axes) a parameter dimension does not divide."""
  uneven = collections.defaultdict(list)
  for path, shape, _, names, spec, _ in param_rows:
    for dim, name, axes in zip(shape, names, tuple(spec) + (None,) * len(shape)):
      if dim % sharding.axes_size(axes, sizes):
        uneven[(name, dim, axes)].append(path)
  lines = []
  for (name, dim, axes), paths in uneven.items():
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    split = " x ".join(f"{a}={sizes[a]}" for a in axes)
    lines.append(f"{len(paths)} parameter(s) have dimension {name!r} of size {dim}, not divisible "
                 f"by its mesh axes {split} (e.g. params{paths[0]})")
  return lines


def _residual_bytes(config, tokenizer, rows: int) -> int:
  """Bytes of the residuals `jax.vjp` of the config's loss keeps for the backward pass on a
  batch of `rows` images: the jaxpr of the forward pass is traced (nothing runs) and every
  residual that is not an input (parameters pass through as they are) is counted once."""
  model, _, loss_fn = registry.build_model(config, tokenizer)
  tokens = jax.ShapeDtypeStruct((rows, tokenizer.num_tokens, tokenizer.token_dim), jnp.float32)
  labels = jax.ShapeDtypeStruct((rows,), jnp.int32)
  params = jax.eval_shape(
      lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, *tokens.shape[1:])),
                                       jnp.zeros((1,), jnp.int32))["params"]))
  leaves, treedef = jax.tree.flatten(params)

  def residual_bytes(loss_fn):
    def forward(*args):
      *param_leaves, x, y = args
      loss = lambda p: loss_fn(p, x, y, jax.random.PRNGKey(0))
      return jax.vjp(loss, jax.tree.unflatten(treedef, param_leaves))

    closed, (_, pullback) = jax.make_jaxpr(forward, return_shape=True)(*leaves, tokens, labels)
    jaxpr = closed.jaxpr
    residuals = jaxpr.outvars[len(jaxpr.outvars) - len(jax.tree.leaves(pullback)):]
    inputs = {id(v) for v in (*jaxpr.invars, *jaxpr.constvars)}
    unique = {id(v): v for v in residuals
              if not isinstance(v, jax_core.Literal) and id(v) not in inputs}
    return sum(v.aval.size * v.aval.dtype.itemsize for v in unique.values())

  # A family whose step runs one of several branches, each with its own backward pass
  # (MAR's buckets), keeps the largest branch's activations, not all branches' at once.
  return max(residual_bytes(branch) for branch in registry.family(config).loss_branches(loss_fn))


def activation_bytes(config, tokenizer, rules, sizes: dict) -> dict:
  """ESTIMATE of the activations one device's train step saves for its backward pass.

  Measured on the model as implemented, not from a formula: the residuals JAX keeps for
  the backward pass of the loss (`_residual_bytes`), traced at one device's share of the
  global batch (global batch / the devices of the `batch` rule's mesh axes, rounded up).
  Tracing every layer of MAR-H takes most of a minute, so the model is traced with every
  stack (MAR encoder, decoder; causal blocks; head blocks) at depth 1, and once more with
  each stack at depth 2 (stacks of equal depth together): a stack's layers save the same
  shapes, so the total is linear in each depth and is extrapolated exactly.

  This counts what the layers really save (for MAR, the largest of its buckets' branches,
  each of which runs its own backward pass; LayerNorm statistics in float32, attention probabilities,
  bf16 copies of the weights), but not XLA's temporaries nor how XLA fuses or reuses
  buffers, and residuals are not divided over the `tensor` axis (an upper bound when it
  is > 1): the peak memory of a compiled step can differ either way.

  Returns {'<section>.<field>[ + ...]': bytes of those stacks at their depth, ...,
  'rest': the layers outside the stacks and the loss, 'total'}.
  """
  batch_split = sharding.axes_size(nn.logical_to_mesh_axes(("batch",), rules)[0], sizes)
  rows = -(-config.train.global_batch_size // batch_split)
  unit = registry.family(config).example_rows(config)  # whole training examples only
  rows = -(-rows // unit) * unit
  # Stacks of equal depth (MAR's encoder and decoder) vary together: one trace fewer.
  groups = collections.defaultdict(list)
  for section, field in registry.family(config).stack_depths(config):
    groups[config[section][field]].append((section, field))

  def at_depth_2(varied):
    shallow = copy.deepcopy(config)
    for group in groups.values():
      for section, field in group:
        shallow[section][field] = 2 if group is varied else 1
    return _residual_bytes(shallow, tokenizer, rows)

  base = at_depth_2(None)
  result, rest = {}, base
  for depth, group in groups.items():
    per_layer = at_depth_2(group) - base
    result[" + ".join(f"{section}.{field}" for section, field in group)] = per_layer * depth
    rest -= per_layer
  result["rest"] = rest
  result["total"] = sum(result.values())
  return result


def state_figures(config, tokenizer, sizes: dict) -> dict:
  """Parameter counts and the per-device bytes of params, EMA, gradients and optimizer state
  on a mesh of `sizes`, with a warning per dimension its mesh axes do not divide."""
  rules = sharding.rules_from_config(config.sharding)
  params, opt_state = abstract_trees(config, tokenizer)
  param_rows = leaf_shards(params, rules, sizes)
  opt_rows = leaf_shards(opt_state, rules, sizes)
  by_module = collections.Counter()
  for path, shape, *_ in param_rows:
    by_module[path.split("'")[1]] += math.prod(shape)
  tokenizer_leaves = jax.tree.leaves(getattr(tokenizer, "params", None))
  params_bytes = _bytes(param_rows)
  return {
      "num_tokens": tokenizer.num_tokens,
      "token_dim": tokenizer.token_dim,
      "parameters": sum(by_module.values()),
      "parameters_by_module": dict(by_module),
      "tokenizer_parameters": sum(math.prod(x.shape) for x in tokenizer_leaves),
      "tokenizer_bytes": sum(math.prod(x.shape) * x.dtype.itemsize for x in tokenizer_leaves),
      "params_bytes": params_bytes,
      "ema_bytes": params_bytes,          # ema_params: the params' tree, dtype and shardings
      "gradients_bytes": params_bytes,    # assumed: XLA gives the gradients the params' shardings
      "optimizer_bytes": _bytes(opt_rows),
      "params_bytes_unsharded": _bytes(param_rows, shard=False),
      "optimizer_bytes_unsharded": _bytes(opt_rows, shard=False),
      "warnings": divisibility_warnings(param_rows, sizes),
  }


def flop_figures(config) -> dict:
  """`bench.analytic_flops` of one train step on the global batch and of one sampled image."""
  s = config.sample
  return {
      "flops_train_step": bench.analytic_flops(config, "train", config.train.global_batch_size),
      # Per image at the config's sampling batch: linear in the batch but for the head's time
      # MLP, which runs once per net call for the whole batch (a shared t).
      "flops_per_sampled_image": {
          k: v // s.batch_size
          for k, v in bench.analytic_flops(config, "sample", s.batch_size).items()},
      "head_evaluations": bench.head_evaluations(config),
      "guided": bench.is_guided(config),
      "num_iter": s.get("num_iter"),
  }


def describe(config, num_devices: Optional[int] = None) -> dict:
  """The figures `format_table` prints (see the module docstring), as a dict."""
  sizes = mesh_sizes(config, num_devices)
  tokenizer = abstract_tokenizer(config)
  d = {"mesh": sizes, "num_devices": math.prod(sizes.values())}
  d.update(state_figures(config, tokenizer, sizes))
  d.update(flop_figures(config))
  batch = config.train.global_batch_size
  batch_devices = sizes["data"] * sizes["fsdp"]
  if batch % batch_devices:
    d["warnings"].append(f"config.train.global_batch_size={batch} is not divisible by the "
                         f"{batch_devices} devices of the batch axes (data x fsdp): train "
                         "refuses it")
  d["activations_by_stack"] = activation_bytes(
      config, tokenizer, sharding.rules_from_config(config.sharding), sizes)
  memory = {
      "params": d["params_bytes"],
      "ema": d["ema_bytes"],
      "gradients": d["gradients_bytes"],
      "optimizer": d["optimizer_bytes"],
      "activations": d["activations_by_stack"]["total"],
      # A constant of the jitted step only when it encodes images itself.
      "tokenizer": d["tokenizer_bytes"] if config.data.latents is None else 0,
  }
  memory["total"] = sum(memory.values())
  d.update(memory_per_device=memory, global_batch_size=batch,
           batch_per_device=batch / batch_devices)
  return d


def _model_line(config) -> str:
  return (f"{registry.family(config).describe_line(config)}; "
          f"{registry.head(config).summary(config)}; compute {config.model.dtype}")


def format_table(config, d: dict, name: Optional[str] = None) -> str:
  """A compact table of `describe(config)`'s figures."""
  mesh = " x ".join(f"{axis} {size}" for axis, size in d["mesh"].items())
  modules = ", ".join(f"{k} {_count(v)}" for k, v in d["parameters_by_module"].items())
  tokenizer = (f"; tokenizer {_count(d['tokenizer_parameters'])} (frozen)"
               if d["tokenizer_parameters"] else "")
  train, image = d["flops_train_step"], d["flops_per_sampled_image"]
  sampler = (f"{d['num_iter']} iterations, " if d["num_iter"] else "") + (
      f"{d['head_evaluations']} head evaluations per token"
      + (", CFG doubles the rows" if d["guided"] else ""))
  mem = d["memory_per_device"]
  stacks = ", ".join(f"{stack} {_binary(size)}"
                     for stack, size in d["activations_by_stack"].items() if stack != "total")
  if not d["tokenizer_parameters"]:
    tok_note = f"{config.tokenizer.name}: no weights"
  elif config.data.latents is None:
    tok_note = "frozen weights, replicated: the step encodes images"
  else:
    tok_note = "not in the step: it reads config.data.latents"
  rows = [
      f"describe {name or ''}".rstrip(),
      f"  model        {_model_line(config)}",
      f"  tokens       {d['num_tokens']} of dim {d['token_dim']} ({config.tokenizer.name})",
      f"  mesh         {mesh} = {d['num_devices']} devices; global batch "
      f"{d['global_batch_size']} = {d['batch_per_device']:g} per device",
      f"  parameters   {_count(d['parameters'])}: {modules}{tokenizer}",
      f"  FLOPs        train step {_flops(train['total'])} (backbone {_flops(train['backbone'])}, "
      f"head {_flops(train['head'])}; forward + backward)",
      f"               sampled image {_flops(image['total'])} (backbone "
      f"{_flops(image['backbone'])}, head {_flops(image['head'])}; {sampler})",
      "  memory per device (float32 state sharded by config.sharding.rules; activations estimated)",
      f"    params       {_binary(mem['params'])} (of {_binary(d['params_bytes_unsharded'])})",
      f"    EMA          {_binary(mem['ema'])}",
      f"    gradients    {_binary(mem['gradients'])}",
      f"    optimizer    {_binary(mem['optimizer'])} (of "
      f"{_binary(d['optimizer_bytes_unsharded'])}: Adam mu and nu)",
      f"    activations  {_binary(mem['activations'])} (estimate: saved for backward; {stacks})",
      f"    tokenizer    {_binary(mem['tokenizer'])} ({tok_note})",
      f"    total        {_binary(mem['total'])} (without XLA temporaries)",
  ]
  rows += [f"  warning: {w}" for w in d["warnings"]]
  return "\n".join(rows)
