"""Mesh construction, the logical-axis rules, and host <-> global array helpers.

Every parameter and activation dimension carries a logical name (see
`arjax.layers.dense`); `config.sharding.rules` maps names to mesh axes. The
mesh always has the three axes below, so a rule table written for a TPU pod
runs unchanged on one CPU (with sizes 1).

The one table governs both. Parameters: `logical_shardings` turns their boxed axis names into
the shardings jit places them with. Activations: the layers mark them with
`nn.with_logical_constraint` (`arjax.layers.dense.constrain`), which only acts while
`activation_rules` is active: the train step, the state's init and every sampler trace their
programs inside it (`shard_activations`). Rules are tried in order and a mesh axis serves one
dimension of an array only, so with 'batch' listed first an activation
('batch', 'length', 'embed') is split over data x fsdp on its batch and whole on its features,
while the weights' 'embed' dimension goes to fsdp.

    data    pure data parallelism: batch split, parameters replicated
    fsdp    batch split *and* parameters/optimizer state split (ZeRO-3 style)
    tensor  attention heads and MLP hidden split (Megatron style)
"""
import contextlib
import functools
import math
from typing import Optional, Sequence

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from arjax.config.schema import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple:
  """Resolves one -1 entry to the devices left over; checks the product."""
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ConfigError(f"config.mesh.shape={tuple(shape)} must give {len(MESH_AXES)} sizes "
                     f"for the axes {MESH_AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f"config.mesh.shape={tuple(shape)}: sizes must be positive, at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ConfigError(f"config.mesh.shape={tuple(shape)} cannot be filled with {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ConfigError(f"config.mesh.shape={tuple(shape)} needs {math.prod(shape)} devices, "
                     f"{num_devices} are present: give one axis -1 to take the devices there "
                     f"are, e.g. --config.mesh.shape='(-1,1,1)' (all data parallel)")
  return tuple(shape)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg.shape, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules_from_config(sharding_cfg) -> tuple:
  """((logical_name, mesh_axes_or_None), ...) with every mesh axis checked."""
  rules = []
  for name, axes in sharding_cfg.rules:
    for axis in (axes,) if isinstance(axes, str) else (axes or ()):
      if axis not in MESH_AXES:
        raise ConfigError(f"config.sharding.rules: {name!r} maps to unknown mesh axis {axis!r}; "
                         f"mesh axes are {MESH_AXES}")
    rules.append((name, tuple(axes) if isinstance(axes, list) else axes))
  return tuple(rules)


def axes_size(mesh_axes, sizes) -> int:
  """Devices one dimension is split over: the product of the sizes (a mapping axis -> size,
  e.g. `mesh.shape`) of a rule's mesh axes, which may be None, one name, or several."""
  if mesh_axes is None:
    return 1
  return math.prod(sizes[a] for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes))


class ShardingError(ConfigError):
  """The mesh and the rules table cannot shard the model as asked (a config mistake)."""


def check_rules(boxed_tree, mesh: Mesh, rules) -> None:
  """Fails, naming the array, axis and sizes, where the rules cannot shard `boxed_tree`.

  Two mistakes are caught here, at start-up, rather than as an XLA error (or worse, silently
  replicated weights): a logical axis name the rules table does not list (a typo, or a model
  feature whose axis was never given a rule), and a dimension that its mesh axes do not
  divide (e.g. 6 heads on a tensor axis of 4).
  """
  table = dict(rules)
  is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)
  for path, leaf in jax.tree_util.tree_leaves_with_path(boxed_tree, is_leaf=is_boxed):
    if not is_boxed(leaf):
      continue
    where = jax.tree_util.keystr(path)
    for dim, name in zip(leaf.value.shape, leaf.names):
      if name is None:
        continue
      if name not in table:
        raise ShardingError(
            f"{where} has logical axis {name!r}, which config.sharding.rules does not list; "
            f"add e.g. ({name!r}, None) to replicate it (listed: {sorted(table)})")
      axes = table[name]
      size = axes_size(axes, mesh.shape)
      if dim % size:
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        raise ShardingError(
            f"{where}: its {name!r} dimension is {dim}, which the mesh axes {axes} "
            f"(config.sharding.rules) of total size {size} (config.mesh.shape="
            f"{tuple(mesh.shape[a] for a in MESH_AXES)} over {MESH_AXES}) do not divide; change "
            f"the mesh, the rule for {name!r}, or the model size")


def logical_shardings(boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a pytree of `nn.LogicallyPartitioned` (abstract) values, checked first."""
  check_rules(boxed_tree, mesh, rules)
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules, batch_size: Optional[int] = None):
  """Within: activations are constrained to the shardings `rules` give their logical axes.

  batch_size: the program's batch, when it may not split over the batch's mesh axes (a
  sampling request of 3 images on 8 devices): the batch dimension is then left whole and
  the other rules still apply. The rules must be active while a program is *traced*: wrap the
  function before `jax.jit` (`shard_activations`).
  """
  rules = tuple(rules)
  if batch_size is not None and batch_size % axes_size(dict(rules).get("batch"), mesh.shape):
    rules = tuple((name, None if name == "batch" else axes) for name, axes in rules)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


def shard_activations(fn, mesh: Mesh, rules, batch_size=None):
  """`fn` traced inside `activation_rules(mesh, rules, ...)`. `batch_size` is an int, or a
  function of fn's arguments giving it at trace time (a sampler's per-call batch)."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    size = batch_size(*args, **kwargs) if callable(batch_size) else batch_size
    with activation_rules(mesh, rules, size):
      return fn(*args, **kwargs)
  return traced


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_batch_block(mesh: Mesh, global_batch_size: int) -> tuple:
  """(block, blocks): this process's devices hold rows [block * L, (block + 1) * L) of every
  global batch, L = global_batch_size // blocks. The data pipeline reads exactly that block.

  On one process, and wherever the batch axes do not cross processes, that is (0, 1).
  """
  indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  rows = set()
  for index in indices.values():
    rows.update(range(*index[0].indices(global_batch_size)))
  start, stop = min(rows), max(rows) + 1
  size = stop - start
  if len(rows) != size or global_batch_size % size or start % size:
    raise ValueError(
        f"process {jax.process_index()}'s devices hold rows {sorted(rows)[:8]}... of the global "
        f"batch of {global_batch_size}: not one aligned contiguous block; order the mesh's "
        "devices so that each process's devices are adjacent along the batch axes")
  return start // size, global_batch_size // size


def to_host(x) -> np.ndarray:
  """A (possibly multi-process) global array as one numpy array on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def global_batch(local_batch, mesh: Mesh):
  """Assembles each process's numpy batch into one global array sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
