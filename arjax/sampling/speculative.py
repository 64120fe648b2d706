"""Continuous speculative decoding (CSpD, Wang et al. 2024): the acceptance rule for one token.

Speculative decoding lets a cheap draft model q propose a token and the target p verify it;
accepting with probability min(1, p(x) / q(x)) and, on rejection, drawing from the normalised
residual max(0, p - q) leaves the output distributed exactly as p. For continuous tokens drawn
by a flow head, p(x) itself is intractable, but the density of a whole *denoising trajectory*
is a product of Gaussians when the head samples by a Gaussian-step chain, here the
Euler-Maruyama discretisation of the flow's reverse SDE (arjax/heads/flow.py, g(t)^2 = 2 c t):

    x_K ~ N(0, T^2),   x_{i+1} = mu(x_i, t_i) + sigma_i eps_i,
    mu = x + dt (v + c (x + (1 - t) v)),   sigma_i = T sqrt(2 c t_i |dt|)   (all > 0)

The rule then acts on trajectories: the draft's trajectory (its own noise) is scored under
both chains, aligned step for step (the target's transition density of the draft's x_{i+1}
given the draft's x_i: what the target computes in its one verification pass), and

    log r = sum_i log N(x_{i+1}; mu_p(x_i), sigma_i^2) - log N(x_{i+1}; mu_q(x_i), sigma_i^2)

(the shared start N(0, T^2) cancels). Accept with probability min(1, r); else draw target
trajectories and keep the first accepted with probability max(0, 1 - 1/r) (acceptance-
rejection from the residual max(0, p - q) / (1 - alpha)). The token is a trajectory's end, so
it is distributed as the target chain's tokens. Unlike the ODE sampler, every step, the last
included, carries noise (sigma_{K-1} > 0): a deterministic step has no density.

Static shapes: the residual draws run in a `lax.while_loop` of at most `max_tries` rounds over
all rows at once (rows already done are masked); a row still rejected after `max_tries`
keeps its last target draw, a bias of at most the probability of so many rejections in a row
(reported as `exhausted`).

Tractable heads: the flow head through this SDE chain (any c > 0), and a DDPM head's Gaussian
ancestral steps (the same algebra with its posterior mean and variance); not the ODE samplers
(no density per step) nor the shortcut head's deterministic few steps.

What is here is the rule and its chain, tested on tokens with analytically different heads
(tests/test_speculative.py). Drafting k tokens with a smaller causal model and verifying them
in one KV-cached target pass (and rolling back the caches at the first rejection) is the
family-side loop still to be written on top of it.
"""
from typing import Callable

import jax
import jax.numpy as jnp

Velocity = Callable[[jax.Array, jax.Array], jax.Array]   # v(x [N, D], t scalar) -> [N, D]


def time_grid(steps: int):
  """t_0 = 1 > ... > t_K = 0, uniform (the flow head's grid)."""
  return jnp.linspace(1.0, 0.0, steps + 1)


def transition_mean(velocity: Velocity, x, t, dt, diffusion_scale: float):
  """mu(x, t): the Euler-Maruyama mean of the reverse SDE (module docstring)."""
  v = velocity(x, t)
  return x + dt * (v + diffusion_scale * (x + (1.0 - t) * v))


def noise_scales(steps: int, diffusion_scale: float, temperature):
  """sigma_i [K] = T sqrt(2 c t_i |dt|): every step noisy, the last included."""
  ts = time_grid(steps)
  return temperature * jnp.sqrt(2.0 * diffusion_scale * ts[:-1] * (ts[:-1] - ts[1:]))


def trajectory(velocity: Velocity, start, eps, *, diffusion_scale: float, temperature):
  """States [K + 1, N, D] of the chain from `start` (x at t = 1, already scaled by T) with
  standard normal `eps` [K, N, D]."""
  steps = eps.shape[0]
  ts, sigma = time_grid(steps), noise_scales(steps, diffusion_scale, temperature)

  def step(x, i):
    x_next = transition_mean(velocity, x, ts[i], ts[i + 1] - ts[i], diffusion_scale) \
        + sigma[i] * eps[i]
    return x_next, x_next

  _, states = jax.lax.scan(step, start, jnp.arange(steps))
  return jnp.concatenate([start[None], states])


def log_density_ratio(target: Velocity, draft: Velocity, states, *, diffusion_scale: float,
                      temperature):
  """log r [N] = log p(trajectory) - log q(trajectory), the chains' Gaussian transitions on
  the same states (aligned step by step)."""
  steps = states.shape[0] - 1
  ts, sigma = time_grid(steps), noise_scales(steps, diffusion_scale, temperature)

  def step(total, i):
    x, x_next, t, dt = states[i], states[i + 1], ts[i], ts[i + 1] - ts[i]
    err_p = x_next - transition_mean(target, x, t, dt, diffusion_scale)
    err_q = x_next - transition_mean(draft, x, t, dt, diffusion_scale)
    return total + (jnp.sum(err_q ** 2, -1) - jnp.sum(err_p ** 2, -1)) / (2 * sigma[i] ** 2), None

  total, _ = jax.lax.scan(step, jnp.zeros(states.shape[1]), jnp.arange(steps))
  return total


def _draw(key, num_rows: int, dim: int, steps: int, temperature):
  start_key, eps_key = jax.random.split(key)
  return (temperature * jax.random.normal(start_key, (num_rows, dim)),
          jax.random.normal(eps_key, (steps, num_rows, dim)))


def speculative_token(target: Velocity, draft: Velocity, key, num_rows: int, dim: int, *,
                      steps: int, diffusion_scale: float = 1.0, temperature=1.0,
                      max_tries: int = 16):
  """One token per row [N, D] distributed as the target chain's, proposed by the draft.

  Returns (tokens, accepted [N] bool: the draft's token kept, exhausted [N] bool: no residual
  draw accepted in `max_tries`). The draft chain runs once (in the AR loop: the cheap
  model); the target scores its trajectory (the verification pass) and, only for rejected
  rows, samples residual draws.
  """
  kw = dict(diffusion_scale=diffusion_scale, temperature=temperature)
  draft_key, accept_key, residual_key = jax.random.split(key, 3)
  states = trajectory(draft, *_draw(draft_key, num_rows, dim, steps, temperature), **kw)
  log_r = log_density_ratio(target, draft, states, **kw)
  accepted = jnp.log(jax.random.uniform(accept_key, (num_rows,))) < jnp.minimum(log_r, 0.0)

  def residual_round(state):
    i, done, tokens = state
    round_key = jax.random.fold_in(residual_key, i)
    draw_key, u_key = jax.random.split(round_key)
    proposal = trajectory(target, *_draw(draw_key, num_rows, dim, steps, temperature), **kw)
    # Accept a target draw y with probability max(0, 1 - q(y) / p(y)).
    log_r_y = log_density_ratio(target, draft, proposal, **kw)
    keep = jax.random.uniform(u_key, (num_rows,)) < -jnp.expm1(-jnp.maximum(log_r_y, 0.0))
    take = ~done & (keep | (i == max_tries - 1))
    tokens = jnp.where(take[:, None], proposal[-1], tokens)
    return i + 1, done | (~done & keep), tokens

  _, done, residual = jax.lax.while_loop(
      lambda state: (state[0] < max_tries) & ~jnp.all(state[1]), residual_round,
      (jnp.int32(0), accepted, states[-1]))
  tokens = jnp.where(accepted[:, None], states[-1], residual)
  return tokens, accepted, ~done
