"""Host memory on the CPU backend: keep freed blocks in the process, do not hand them back.

Why. XLA:CPU gives each execution its temporaries through malloc, mostly as one large block
(about 1.5 GB for the MAR CPU preset's train step). glibc serves every block above 32 MiB
with a fresh mmap and unmaps it on free, so each step faults its whole working set in again,
page by page, and the kernel zeroes every page first. Measured on the preset's train step
(2-core Zen 4, BENCHMARKS.md): 377k minor faults and 1.6 s of kernel time per 2.2 s step;
with freed memory kept, 0 faults, 16 ms of kernel time and a 1.1 s step. (PyTorch's CPU
allocator and the TPU/GPU runtimes keep their own pools for the same reason.)

How. Three glibc `mallopt` settings, made before JAX starts its thread pool: one arena for
every thread (a thread's own arena cannot grow past 64 MiB without mmap), no mmap for large
blocks (they come from the heap and go back to it), and no trimming of the heap's top below
2 GiB free. The process's resident memory then stays at its high-water mark, as a training
process's does anyway.

When. Only where the backend will be the CPU (no accelerator plugin installed, or
JAX_PLATFORMS=cpu), only with glibc, and never when ARJAX_HOST_MALLOC=system. The CLI
applies it before it imports JAX; tests/conftest.py does too; a notebook may call
`keep_freed_memory()` first thing.
"""
import ctypes
import importlib.util
import os
import sys

# mallopt parameter numbers (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

ENV = "ARJAX_HOST_MALLOC"
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu", "jax_plugins.xla_cuda12")

_applied = False


def cpu_backend_expected() -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS says so, or no accelerator plugin exists."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  for name in _ACCELERATOR_PLUGINS:
    try:
      if importlib.util.find_spec(name) is not None:
        return False
    except (ImportError, ValueError):
      continue
  return True


def keep_freed_memory() -> bool:
  """Sets glibc malloc to keep freed memory (see the module docstring); True if it did.

  Does nothing (False) off Linux/glibc, with ARJAX_HOST_MALLOC=system, or when an
  accelerator backend is expected (unless ARJAX_HOST_MALLOC=keep). Call it before JAX runs
  anything: the arena setting only reaches threads that have not allocated yet.
  """
  global _applied
  if _applied:
    return True
  setting = os.environ.get(ENV, "").strip().lower()
  if setting == "system":
    return False
  if setting not in ("", "keep"):
    raise ValueError(f"{ENV}={setting!r}: use 'keep' (the default on CPU) or 'system'")
  if not sys.platform.startswith("linux") or not (setting == "keep" or cpu_backend_expected()):
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # musl and others have no mallopt with these numbers
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  ok = (mallopt(_M_ARENA_MAX, 1) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
        and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1)
  _applied = ok
  return ok
