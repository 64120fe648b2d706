"""arjax.parallel.host_allocator: on the CPU backend freed memory stays in the process, so a jitted
call's large temporaries are not faulted in afresh on every call."""
import os
import subprocess
import sys
import textwrap

import pytest

from arjax.parallel import host_allocator

# A backward pass over 32 MiB activations (at glibc's mmap limit): the minor page faults of
# each of 16 calls after three warm-up ones.
_PROBE = textwrap.dedent("""
    import resource
    from arjax.parallel import host_allocator
    print("applied", host_allocator.keep_freed_memory())
    import jax, jax.numpy as jnp
    def loss(w, x):
      for _ in range(3):
        x = jnp.tanh(x @ w)
      return jnp.sum(x ** 2)
    grad = jax.jit(jax.grad(loss))
    w, x = jnp.full((256, 256), 0.01), jnp.ones((32768, 256))
    for _ in range(3):
      jax.block_until_ready(grad(w, x))
    faults = []
    for _ in range(16):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      jax.block_until_ready(grad(w, x))
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print("faults", ",".join(map(str, faults)))
""")


def _probe(setting):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env.pop(host_allocator.ENV, None)
  if setting is not None:
    env[host_allocator.ENV] = setting
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       timeout=300, check=True).stdout.split()
  return out[1] == "True", [int(f) for f in out[3].split(",")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_large_temporaries_are_not_faulted_in_again_on_each_call():
  applied, faults = _probe(None)
  assert applied
  system_applied, system_faults = _probe("system")
  assert not system_applied
  # glibc's own policy faults ~40k pages (160 MB) in afresh on every call. With freed memory
  # kept, a call faults nothing once the heap has reached its high-water mark; until then a
  # call whose threads happen to hold more temporaries at once grows it (by ~40k pages, a
  # few times per process, more often on a loaded machine: measured 1-5 in 40 calls idle).
  assert min(system_faults) > 20_000, system_faults
  assert sum(f < 1_000 for f in faults) >= len(faults) // 2, faults


def test_cpu_backend_expected_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert not host_allocator.cpu_backend_expected()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_allocator.cpu_backend_expected()


def test_an_unknown_setting_is_an_error_naming_the_variable(monkeypatch):
  monkeypatch.setattr(host_allocator, "_applied", False)
  monkeypatch.setenv(host_allocator.ENV, "jemalloc")
  with pytest.raises(ValueError, match="ARJAX_HOST_MALLOC='jemalloc'"):
    host_allocator.keep_freed_memory()
