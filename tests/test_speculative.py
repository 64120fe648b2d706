"""CSpD's acceptance rule keeps the target's distribution (arjax/sampling/speculative.py).

Tokens in 2-D, target and draft heads with analytically different velocity fields (exact
flows of two different Gaussians): speculative tokens must be distributed as tokens of the
target's own chain (moments, and a two-sample Kolmogorov-Smirnov test per dimension at
significance 0.01), while a deliberately wrong rule (rejected rows re-drawn from the target
instead of the residual) fails the same test. With draft = target every draft is accepted
and the tokens are the plain chain's.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from arjax.sampling import speculative

STEPS, SCALE, N = 12, 1.0, 20000


def gaussian_velocity(mean, std):
  """The exact flow velocity E[noise - x | x_t] of x ~ N(mean, std^2) per dimension."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

  def v(x_t, t):
    var = (1.0 - t) ** 2 * std ** 2 + t ** 2
    return -mean + (t - (1.0 - t) * std ** 2) / var * (x_t - (1.0 - t) * mean)
  return v


TARGET = gaussian_velocity([1.0, -0.5], [0.5, 0.8])
DRAFT = gaussian_velocity([0.6, 0.0], [0.8, 0.6])


def _target_chain(key):
  start, eps = speculative._draw(key, N, 2, STEPS, 1.0)
  return speculative.trajectory(TARGET, start, eps, diffusion_scale=SCALE, temperature=1.0)[-1]


@functools.partial(jax.jit, static_argnames="wrong")
def _speculative(key, wrong=False):
  if not wrong:
    return speculative.speculative_token(TARGET, DRAFT, key, N, 2, steps=STEPS,
                                         diffusion_scale=SCALE)
  # The classic mistake: on rejection, draw from the target itself, not from max(0, p - q).
  tokens, accepted, _ = speculative.speculative_token(TARGET, DRAFT, key, N, 2, steps=STEPS,
                                                      diffusion_scale=SCALE, max_tries=1)
  fresh = _target_chain(jax.random.fold_in(key, 99))
  return jnp.where(accepted[:, None], tokens, fresh), accepted, jnp.zeros_like(accepted)


def _same_distribution(a, b, alpha=0.01):
  # Bonferroni over the two dimensions.
  return all(stats.ks_2samp(a[:, j], b[:, j]).pvalue > alpha / 2 for j in range(2))


@pytest.fixture(scope="module")
def reference():
  return np.asarray(jax.jit(_target_chain)(jax.random.PRNGKey(0)))


def test_speculative_tokens_are_distributed_as_the_target_chain(reference):
  tokens, accepted, exhausted = map(np.asarray, _speculative(jax.random.PRNGKey(1)))
  rate = accepted.mean()
  assert 0.1 < rate < 0.95, rate  # draft and target differ: some rejections, some acceptances
  assert exhausted.mean() < 1e-3
  np.testing.assert_allclose(tokens.mean(0), reference.mean(0), atol=0.03)
  np.testing.assert_allclose(tokens.std(0), reference.std(0), atol=0.03)
  assert _same_distribution(tokens, reference)
  # ... and the draft's own tokens are not: the test can tell the two heads apart.
  start, eps = speculative._draw(jax.random.PRNGKey(2), N, 2, STEPS, 1.0)
  drafted = np.asarray(speculative.trajectory(DRAFT, start, eps, diffusion_scale=SCALE,
                                              temperature=1.0)[-1])
  assert not _same_distribution(drafted, reference)


def test_a_wrong_rejection_rule_fails_the_same_test(reference):
  tokens, _, _ = map(np.asarray, _speculative(jax.random.PRNGKey(1), wrong=True))
  assert not _same_distribution(tokens, reference)


def test_with_draft_equal_to_target_every_draft_is_accepted_as_plain_sampling():
  key = jax.random.PRNGKey(3)
  tokens, accepted, _ = jax.jit(functools.partial(
      speculative.speculative_token, TARGET, TARGET, num_rows=256, dim=2, steps=STEPS,
      diffusion_scale=SCALE))(key)
  assert bool(np.all(np.asarray(accepted)))
  draft_key = jax.random.split(key, 3)[0]  # the draft's draws, as speculative_token makes them
  start, eps = speculative._draw(draft_key, 256, 2, STEPS, 1.0)
  plain = jax.jit(functools.partial(speculative.trajectory, TARGET, diffusion_scale=SCALE,
                                    temperature=1.0))(start, eps)[-1]
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(plain))
