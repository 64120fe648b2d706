"""MAR's DDPM head (MarMLPAdaLN + MarDiffusion) learns a conditional 2-D Gaussian mixture.

Each one-hot z selects one component; after a short training run through the head's `loss`,
`sample` with z = e_k must land on component k's mean. The data live at unit scale (the
scale DDPM's schedule and discretized decoder assume). Tolerances 0.1 on means
that are >= 1 apart and 0.05 on the stds (0.15): loose, because the net trains for
seconds on CPU; a head that ignores z, feeds the net the wrong timesteps or gets the eps
sign / posterior / variance wrong misses by far more. Also: guidance at scale 1 is
conditional sampling, and supplied noise in MAR's recorded [cond; null] layout drives it.
"""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
import pytest

from arjax.heads.diffusion import MarDiffusion
from arjax.heads.mar_mlp import MarMLPAdaLN

MEANS = np.array([[-1.0, 0.0], [1.0, 0.3], [0.0, -1.0]], np.float32)
STD = 0.15


def _train(rounds: int = 4, lr: float = 3e-3):
  """`rounds` x 500 Adam steps on the mixture; returns (head, net_fn, losses of the last round)."""
  net = MarMLPAdaLN(in_channels=2, model_channels=64, z_channels=3, num_res_blocks=2)
  head = MarDiffusion(token_dim=2, batch_mul=2, num_sampling_steps="50")
  params = nn.meta.unbox(net.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.zeros((1,)),
                                  jnp.zeros((1, 3)))["params"])
  tx = optax.adam(optax.cosine_decay_schedule(lr, 500 * rounds))
  opt_state = tx.init(params)

  def net_fn(p):
    return lambda x_t, t, z: net.apply({"params": p}, x_t, t, z)

  @jax.jit
  def steps(params, opt_state, rng):
    def one(carry, rng):
      params, opt_state = carry
      k_rng, x_rng, l_rng = jax.random.split(rng, 3)
      k = jax.random.randint(k_rng, (256,), 0, 3)
      x = jnp.asarray(MEANS)[k] + STD * jax.random.normal(x_rng, (256, 2))
      z = jax.nn.one_hot(k, 3)
      loss, grads = jax.value_and_grad(lambda p: head.loss(net_fn(p), x, z, l_rng).mean())(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, opt_state), losses = jax.lax.scan(one, (params, opt_state), jax.random.split(rng, 500))
    return params, opt_state, losses

  for i in range(rounds):
    params, opt_state, losses = steps(params, opt_state, jax.random.fold_in(jax.random.PRNGKey(1), i))
  return head, net_fn(params), losses


@pytest.fixture(scope="module")
def trained():
  return _train()


def test_loss_is_per_token_and_finite(trained):
  head, net_fn, losses = trained
  assert np.all(np.isfinite(np.asarray(losses)))
  z = jax.nn.one_hot(jnp.arange(5) % 3, 3)
  per_token = head.loss(net_fn, jnp.asarray(MEANS)[jnp.arange(5) % 3], z, jax.random.PRNGKey(2))
  assert per_token.shape == (5,)


def test_samples_match_each_component(trained):
  head, net_fn, _ = trained
  n = 1000
  # The full 1000-step chain: at the first (t = 999) step the posterior mean multiplies the
  # eps error by sqrt(ac_prev / ac_999), ~31 here but ~1700 with 50 respaced steps, and the
  # seconds-trained net's eps error at t = 999 (~1e-2) would then swamp the sample. MAR's
  # long-trained heads drive that error down; the algorithm (checked against the golden
  # replays in tests/golden_mar_head.py) is the same for every respacing.
  sample = jax.jit(lambda z, rng: head.sample(net_fn, z, rng, steps="1000"))
  for k in range(3):
    z = jax.nn.one_hot(jnp.full((n,), k), 3)
    x = np.asarray(sample(z, jax.random.PRNGKey(10 + k)))
    np.testing.assert_allclose(x.mean(0), MEANS[k], atol=0.1, err_msg=f"component {k} mean")
    np.testing.assert_allclose(x.std(0), [STD, STD], atol=0.05, err_msg=f"component {k} std")


def test_guidance_scale_one_and_supplied_noise(trained):
  head, net_fn, _ = trained
  n, steps = 64, "1000"
  z_cond = jax.nn.one_hot(jnp.full((n,), 1), 3)
  z = jnp.concatenate([z_cond, jnp.zeros((n, 3))])
  rng = np.random.default_rng(0)
  init = rng.standard_normal((n, 2)).astype(np.float32)
  step_noise = rng.standard_normal((1000, 2 * n, 2)).astype(np.float32)
  sample = jax.jit(lambda z, init, step_noise, cfg_scale: head.sample(
      net_fn, z, None, cfg_scale=cfg_scale, steps=steps, noise=(init, step_noise)))
  plain = jax.jit(lambda z, init, step_noise: head.sample(
      net_fn, z, None, steps=steps, noise=(init, step_noise)))
  guided = np.asarray(sample(z, init, step_noise, 1.0))
  assert guided.shape == (n, 2)
  # Scale 1: eps_u + 1 * (eps_c - eps_u) = eps_c up to rounding -> conditional sampling.
  np.testing.assert_allclose(guided, np.asarray(plain(z_cond, init, step_noise[:, :n])), atol=1e-3)
  # MAR's recorded layout ([cond; null] step rows) and the cond rows alone give the same draws.
  np.testing.assert_array_equal(guided, np.asarray(sample(z, init, step_noise[:, :n], 1.0)))


def test_the_causal_model_samples_with_the_ddpm_head():
  """Head choice is config for both families: the causal sampler takes the DDPM head too
  (it has no ODE solver for `sample.solver` to set)."""
  from arjax.config import schema as configs
  from arjax.training.experiment import Experiment
  from conftest import REPO_ROOT
  config = configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))
  with config.unlocked():
    del config.head["t_mean"], config.head["t_std"]
    config.head.name = "mar_diffusion"
    config.head.num_timesteps = 1000
    config.head.noise_schedule = "cosine"
  exp = Experiment(config)
  state, _ = exp.init_state()
  images = exp.sampler()(state.params, np.array([0, 1]), jax.random.PRNGKey(0), cfg_scale=2.0)
  assert images.shape == (2, 8, 8, 1) and np.isfinite(np.asarray(images)).all()


def test_integer_timesteps_embed_through_a_table_with_the_same_numbers():
  """With num_timesteps set and more rows than timesteps, the time MLP runs on the T steps
  once and rows gather their embedding: outputs and gradients equal the per-row net's."""
  per_row = MarMLPAdaLN(in_channels=2, model_channels=32, z_channels=3, num_res_blocks=2)
  table = MarMLPAdaLN(in_channels=2, model_channels=32, z_channels=3, num_res_blocks=2,
                      num_timesteps=10)
  rng = jax.random.PRNGKey(0)
  x, z = jax.random.normal(rng, (40, 2)), jax.random.normal(jax.random.PRNGKey(1), (40, 3))
  t = jax.random.randint(jax.random.PRNGKey(2), (40,), 0, 10)
  params = per_row.init(rng, x, t, z)
  # Non-zero modulation and output weights, so the time embedding reaches the output.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(rng, p.shape), params)
  loss = lambda net: (lambda p: jnp.sum(net.apply(p, x, t, z) ** 2))
  np.testing.assert_allclose(table.apply(params, x, t, z), per_row.apply(params, x, t, z),
                             rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               jax.grad(loss(table))(params), jax.grad(loss(per_row))(params))


@pytest.mark.parametrize("net_name", ["mar", "flow"])
def test_a_condition_shared_by_k_rows_is_the_repeated_condition(net_name):
  """z with one row per k consecutive rows of x_t (a token's batch_mul draws) gives the net
  of the repeated z; a row count that is no divisor is an error saying what was expected."""
  from arjax.heads import FlowHeadNet
  net = (MarMLPAdaLN(in_channels=2, model_channels=32, z_channels=3, num_res_blocks=1)
         if net_name == "mar" else FlowHeadNet(token_dim=2, width=32, depth=1))
  rng = jax.random.PRNGKey(0)
  x, z = jax.random.normal(rng, (12, 2)), jax.random.normal(jax.random.PRNGKey(1), (3, 3))
  t = jnp.arange(12) % 5 if net_name == "mar" else jnp.linspace(0, 1, 12)
  params = net.init(rng, x, t, jnp.repeat(z, 4, axis=0))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(rng, p.shape), params)
  np.testing.assert_allclose(net.apply(params, x, t, z),
                             net.apply(params, x, t, jnp.repeat(z, 4, axis=0)), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="condition has 5 rows for 12 rows of x_t"):
    net.apply(params, x, t, jnp.zeros((5, 3)))


def test_fused_modulations_are_each_blocks_own_dense():
  """One matmul over the side-by-side kernels gives, column for column, each Dense's output."""
  from arjax.heads import condition
  rng = jax.random.split(jax.random.PRNGKey(0), 5)
  params = {"block_0": {"mod": {"kernel": jax.random.normal(rng[0], (8, 24)),
                                "bias": jax.random.normal(rng[1], (24,))}},
            "final": {"kernel": jax.random.normal(rng[2], (8, 16)),
                      "bias": jax.random.normal(rng[3], (16,))}}
  y = jax.random.normal(rng[4], (5, 8))
  block, final = condition.fused_modulations(params, [("block_0", "mod"), ("final",)], y,
                                             jnp.float32)
  np.testing.assert_allclose(block, y @ params["block_0"]["mod"]["kernel"]
                             + params["block_0"]["mod"]["bias"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(final, y @ params["final"]["kernel"] + params["final"]["bias"],
                             rtol=1e-5, atol=1e-5)
