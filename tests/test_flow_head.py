"""The flow-matching head alone learns a conditional 2-D Gaussian mixture and samples it.

Each one-hot z selects one Gaussian component; after training, samples drawn
with z = e_k must have component k's mean and covariance. Tolerances: the
sampling error of 4000 draws (~0.02 on means) plus what a small net learns in
a few seconds; a head that ignores z, the time convention, or the velocity
sign misses them by far more (means are 3 apart).
"""
import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
import pytest

from arjax.heads import FlowHeadNet, FlowMatching

MEANS = np.array([[-3.0, 0.0], [3.0, 1.0], [0.0, -3.0]], np.float32)
COVS = np.array([[[0.5, 0.3], [0.3, 0.5]], [[0.3, 0.0], [0.0, 0.1]], [[0.2, -0.1], [-0.1, 0.6]]],
                np.float32)
CHOLS = np.linalg.cholesky(COVS)


def _draw(rng, k):
  eps = jax.random.normal(rng, (k.shape[0], 2))
  return jnp.asarray(MEANS)[k] + jnp.einsum("nij,nj->ni", jnp.asarray(CHOLS)[k], eps)


@pytest.fixture(scope="module")
def trained():
  net = FlowHeadNet(token_dim=2, width=64, depth=2)
  head = FlowMatching(token_dim=2, batch_mul=2)
  z0 = jnp.zeros((1, 3))
  params = nn.meta.unbox(net.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.zeros((1,)), z0)["params"])
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, 2000))
  opt_state = tx.init(params)

  def net_fn(p):
    return lambda x_t, t, z: net.apply({"params": p}, x_t, t, z)

  @jax.jit
  def steps(params, opt_state, rng):
    def one(carry, rng):
      params, opt_state = carry
      k_rng, x_rng, l_rng = jax.random.split(rng, 3)
      k = jax.random.randint(k_rng, (256,), 0, 3)
      x, z = _draw(x_rng, k), jax.nn.one_hot(k, 3)
      loss, grads = jax.value_and_grad(lambda p: head.loss(net_fn(p), x, z, l_rng).mean())(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, opt_state), losses = jax.lax.scan(one, (params, opt_state), jax.random.split(rng, 500))
    return params, opt_state, losses

  rng = jax.random.PRNGKey(1)
  for i in range(4):
    params, opt_state, losses = steps(params, opt_state, jax.random.fold_in(rng, i))
  return head, net_fn(params), float(losses[-50:].mean())


@pytest.mark.parametrize("solver", ["euler", "heun", "euler_maruyama"])
def test_samples_match_each_component(trained, solver):
  head, net_fn, _ = trained
  head = FlowMatching(token_dim=2, solver=solver)
  n = 4000
  for k in range(3):
    z = jax.nn.one_hot(jnp.full((n,), k), 3)
    sample = jax.jit(functools.partial(head.sample, net_fn, steps=32))
    x = np.asarray(sample(z, jax.random.PRNGKey(10 + k)))
    np.testing.assert_allclose(x.mean(0), MEANS[k], atol=0.12, err_msg=f"component {k} mean")
    np.testing.assert_allclose(np.cov(x.T), COVS[k], atol=0.12, err_msg=f"component {k} covariance")


def test_guidance_scale_one_is_conditional_sampling(trained):
  head, net_fn, _ = trained
  n = 64
  z_cond = jax.nn.one_hot(jnp.full((n,), 1), 3)
  z_null = jnp.zeros((n, 3))
  rng = jax.random.PRNGKey(3)
  plain = head.sample(net_fn, z_cond, rng, steps=8)
  guided = head.sample(net_fn, jnp.concatenate([z_cond, z_null]), rng, cfg_scale=1.0, steps=8)
  np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), rtol=1e-5, atol=1e-5)


def test_temperature_scales_the_initial_noise(trained):
  head, net_fn, _ = trained
  z = jax.nn.one_hot(jnp.full((2000,), 0), 3)
  cold = np.asarray(head.sample(net_fn, z, jax.random.PRNGKey(4), temperature=0.3, steps=16))
  warm = np.asarray(head.sample(net_fn, z, jax.random.PRNGKey(4), temperature=1.0, steps=16))
  assert np.trace(np.cov(cold.T)) < 0.5 * np.trace(np.cov(warm.T))


def test_guidance_outside_its_interval_is_conditional_sampling(trained):
  head, net_fn, _ = trained
  n = 64
  z_cond = jax.nn.one_hot(jnp.full((n,), 2), 3)
  z_both = jnp.concatenate([z_cond, jnp.zeros((n, 3))])
  rng = jax.random.PRNGKey(5)
  plain = head.sample(net_fn, z_cond, rng, steps=8)
  # The ODE never evaluates a used velocity at t = 0, so an interval [0, 0] switches guidance off...
  off = head.sample(net_fn, z_both, rng, cfg_scale=3.0, steps=8, cfg_interval=(0.0, 0.0))
  np.testing.assert_allclose(np.asarray(off), np.asarray(plain), rtol=1e-5, atol=1e-5)
  # ...while over the whole interval the same scale changes the samples.
  on = head.sample(net_fn, z_both, rng, cfg_scale=3.0, steps=8)
  assert float(np.max(np.abs(np.asarray(on) - np.asarray(plain)))) > 1e-2
