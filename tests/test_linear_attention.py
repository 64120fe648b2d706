"""The gated linear attention layer: its recurrent and chunk-parallel forms are one function."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.layers import linear_attention as la


def random_inputs(seed, batch=2, length=13, heads=3, dk=4, dv=5):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q, k = (jax.random.normal(key, (batch, length, heads, dk)) for key in ks[:2])
  v = jax.random.normal(ks[2], (batch, length, heads, dv))
  log_g = jax.nn.log_sigmoid(2.0 * jax.random.normal(ks[3], (batch, length, heads)))
  state = jax.random.normal(ks[4], (batch, heads, dk, dv))
  return q, k, v, log_g, state


@pytest.mark.parametrize("chunk", [1, 4, 13, 64])
def test_chunk_parallel_form_equals_the_recurrence_token_by_token(chunk):
  """Any chunk length (dividing the sequence or not), from a non-zero initial state."""
  q, k, v, log_g, state = random_inputs(0)
  o_rec, s_rec = la.recurrent(q, k, v, log_g, state)
  o_chunk, s_chunk = la.chunk_parallel(q, k, v, log_g, state, chunk)
  np.testing.assert_allclose(o_chunk, o_rec, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(s_chunk, s_rec, atol=1e-5, rtol=1e-5)


def test_the_recurrence_is_its_definition():
  """S_t = g_t S_{t-1} + k_t^T v_t, o_t = q_t S_t, written out for one head in numpy."""
  q, k, v, log_g, state = (np.asarray(a, np.float64) for a in random_inputs(1, 1, 5, 1, 2, 3))
  s = state[0, 0]
  o_rec, _ = la.recurrent(*(jnp.asarray(a, jnp.float32) for a in (q, k, v, log_g, state)))
  for t in range(5):
    s = np.exp(log_g[0, t, 0]) * s + np.outer(k[0, t, 0], v[0, t, 0])
    np.testing.assert_allclose(o_rec[0, t, 0], q[0, t, 0] @ s, atol=1e-5, rtol=1e-5)


def test_the_module_fed_in_pieces_from_its_state_equals_one_call_in_both_forms():
  layer = la.GatedLinearAttention(num_heads=2, chunk_size=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, 16))
  params = layer.init(jax.random.PRNGKey(1), x)
  whole, state = layer.apply(params, x)
  recurrent, state_rec = layer.apply(params, x, form="recurrent")
  np.testing.assert_allclose(recurrent, whole, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(state_rec, state, atol=1e-5, rtol=1e-5)
  first, mid = layer.apply(params, x[:, :5])
  second, end = layer.apply(params, x[:, 5:], mid, form="recurrent")
  np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(end, state, atol=1e-5, rtol=1e-5)
  assert state.shape == (2, 2, 8, 8)  # [B, H, Dk, Dv]: constant in the sequence length


def test_a_token_sees_nothing_after_it():
  layer = la.GatedLinearAttention(num_heads=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 8))
  params = layer.init(jax.random.PRNGKey(1), x)
  base, _ = layer.apply(params, x)
  moved, _ = layer.apply(params, x.at[:, 6].add(1.0))
  np.testing.assert_array_equal(moved[:, :6], base[:, :6])
  assert not np.allclose(moved[:, 6], base[:, 6])
