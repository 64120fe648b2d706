"""The flow head's SDE sampler (`sample.solver='euler_maruyama'`, arjax/heads/flow.py).

On data whose velocity field is known in closed form (a Gaussian per dimension), the reverse
SDE with any diffusion scale must give the data's distribution, as the ODE does; with zero
diffusion it is the Euler ODE itself. (The learned 2-D mixture: tests/test_flow_head.py runs
every solver, this one included.)
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.heads import FlowMatching
from arjax.heads.accounting import ode_evaluations

MEAN = np.array([1.5, -0.5], np.float32)
STD = np.array([0.3, 1.2], np.float32)


def exact_velocity(x_t, t, z):
  """E[noise - x | x_t] for x ~ N(MEAN, STD^2) per dimension, x_t = (1 - t) x + t noise."""
  del z
  var = (1.0 - t) ** 2 * STD ** 2 + t ** 2
  cov = t - (1.0 - t) * STD ** 2      # Cov(noise - x, x_t)
  return -MEAN + cov / var * (x_t - (1.0 - t) * MEAN)


def _sample(solver, n=20000, steps=64, **head):
  flow = FlowMatching(token_dim=2, solver=solver, **head)
  run = jax.jit(functools.partial(flow.sample, exact_velocity, steps=steps))
  return np.asarray(run(jnp.zeros((n, 1)), jax.random.PRNGKey(3)))


def test_zero_diffusion_is_the_euler_ode():
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(64))  # per-row keys, as the samplers pass
  sample = lambda solver, scale: FlowMatching(token_dim=2, solver=solver,
                                              diffusion_scale=scale).sample(
      exact_velocity, jnp.zeros((64, 1)), keys, steps=8, temperature=1.3)
  np.testing.assert_array_equal(np.asarray(sample("euler_maruyama", 0.0)),
                                np.asarray(sample("euler", 1.0)))
  # With diffusion the paths are noisy: the same keys give other samples.
  assert np.abs(np.asarray(sample("euler_maruyama", 1.0)) - np.asarray(sample("euler", 1.0))
                ).mean() > 0.05


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_the_sde_samples_the_data_distribution(scale):
  # 20000 draws: the standard error of a mean is <= 0.01, of a std <= 0.006; 64 steps of
  # Euler-Maruyama add a discretisation bias of a few hundredths at most.
  x = _sample("euler_maruyama", diffusion_scale=scale)
  np.testing.assert_allclose(x.mean(0), MEAN, atol=0.05)
  np.testing.assert_allclose(x.std(0), STD, atol=0.05)


def test_the_ode_on_the_same_field_agrees():
  x = _sample("heun", steps=32)
  np.testing.assert_allclose(x.mean(0), MEAN, atol=0.03)
  np.testing.assert_allclose(x.std(0), STD, atol=0.03)


def test_noise_without_its_score_correction_is_caught():
  """The distribution test is sharp enough to see the usual bug: the SDE's noise added to the
  ODE's drift v, without the score term that compensates it. A net giving
  (v - x) / (2 - t) makes the c = 1 drift v + (x + (1 - t) v') exactly v."""
  ode_drift = lambda x_t, t, z: (exact_velocity(x_t, t, z) - x_t) / (2.0 - t)
  flow = FlowMatching(token_dim=2, solver="euler_maruyama", diffusion_scale=1.0)
  x = np.asarray(jax.jit(functools.partial(flow.sample, ode_drift, steps=64))(
      jnp.zeros((20000, 1)), jax.random.PRNGKey(3)))
  assert np.abs(x.std(0) - STD).max() > 0.2


def test_one_evaluation_per_step():
  assert ode_evaluations(16, "euler_maruyama") == 16
