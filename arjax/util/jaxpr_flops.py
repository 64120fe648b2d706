"""Model FLOPs read off the program itself: the matmuls of a function's jaxpr.

`count(fn, *args)` traces `fn` (nothing runs; arguments may be ShapeDtypeStructs) and adds
2 x multiply-adds of every `dot_general` and convolution, at any depth: the bodies of
`jit`, `remat`, custom-derivative calls and the like once each, a `scan` body `length`
times, a `cond`/`switch` as its most expensive branch, a `while` body once (its trip count
is not in the program; the count says so through `CountedFlops.while_loops`). Elementwise
work is left out, by the convention of model FLOPs (and of the families' own accounting).

A family that writes no accounting of its own gets this count of its real train step and
sampler (`arjax.families.base.Family.flops`), so its FLOPs are by construction what it runs.
"""
import dataclasses
import math
import re

import jax
from jax.extend import core as jex_core


@dataclasses.dataclass
class CountedFlops:
  flops: int = 0
  while_loops: int = 0   # while loops whose body was counted once
  # FLOPs of the matmuls inside a flax module of each name in `count(..., modules=)`: flax
  # puts a module's path into the jaxpr's name stack, so the matmuls of a model's 'head'
  # submodule (backward pass included) can be told from the rest.
  by_module: dict = dataclasses.field(default_factory=dict)


def _dot_general(eqn) -> int:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
  rhs_free = [d for i, d in enumerate(rhs.shape) if i not in rhs_contract and i not in rhs_batch]
  return 2 * math.prod(lhs.shape) * math.prod(rhs_free)


def _conv(eqn) -> int:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  out = eqn.outvars[0].aval
  dn = eqn.params["dimension_numbers"]
  kernel_spatial = math.prod(rhs.shape[i] for i in dn.rhs_spec[2:])
  in_features = rhs.shape[dn.rhs_spec[1]]
  del lhs
  return 2 * math.prod(out.shape) * kernel_spatial * in_features


def _sub_jaxprs(value):
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _count_jaxpr(jaxpr, counted: CountedFlops, modules, scope: str, times: int) -> int:
  """FLOPs of one run of `jaxpr`; `times` runs of it are credited to `counted.by_module`."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    path = f"{scope}/{eqn.source_info.name_stack}"
    if name in ("dot_general", "conv_general_dilated"):
      flops = _dot_general(eqn) if name == "dot_general" else _conv(eqn)
      total += flops
      words = set(re.split(r"\W+", path))
      for module in modules:
        if module in words:
          counted.by_module[module] = counted.by_module.get(module, 0) + times * flops
    elif name == "cond":
      # The most expensive branch; only its FLOPs are credited to modules.
      costs = [_count_jaxpr(b.jaxpr, CountedFlops(), (), path, 0) for b in eqn.params["branches"]]
      chosen = eqn.params["branches"][costs.index(max(costs))]
      total += _count_jaxpr(chosen.jaxpr, counted, modules, path, times)
    elif name == "scan":
      length = eqn.params["length"]
      total += length * _count_jaxpr(eqn.params["jaxpr"].jaxpr, counted, modules, path,
                                     times * length)
    else:
      if name == "while":
        counted.while_loops += 1
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          total += _count_jaxpr(sub, counted, modules, path, times)
  return total


def count(fn, *args, modules=(), **kwargs) -> CountedFlops:
  """The matmul FLOPs of one call of `fn(*args, **kwargs)` (see the module docstring);
  `modules`: names of flax submodules whose share to report in `by_module`."""
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  counted = CountedFlops(by_module={m: 0 for m in modules})
  counted.flops = _count_jaxpr(closed.jaxpr, counted, tuple(modules), "", 1)
  return counted
