"""arjax.layers: the one attention (mask kinds, padding, KV cache, RoPE), patchify, AdaLN."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from arjax.layers import adaln, attention, patches, rope

B, N, D, H = 2, 7, 32, 4


def _attention(mask, x, **kwargs):
  module = attention.Attention(H, mask=mask, rope=kwargs.pop("rope", None))
  params = module.init(jax.random.PRNGKey(0), x, **kwargs)
  return lambda y, **kw: module.apply(params, y, **kw)[0], params, module


def _x(seed=1, n=N):
  return jax.random.normal(jax.random.PRNGKey(seed), (B, n, D))


def _changed_at(x, positions, seed=9):
  noise = jax.random.normal(jax.random.PRNGKey(seed), x.shape)
  where = jnp.zeros((x.shape[1],), bool).at[jnp.asarray(positions)].set(True)
  return jnp.where(where[None, :, None], x + noise, x)


def test_causal_attention_sees_no_later_token():
  x = _x()
  run, _, _ = _attention("causal", x)
  out, later = run(x), run(_changed_at(x, [4, 5, 6]))
  np.testing.assert_allclose(out[:, :4], later[:, :4], atol=1e-6)
  assert not np.allclose(out[:, 4:], later[:, 4:], atol=1e-3)


def test_bidirectional_attention_sees_every_token():
  x = _x()
  run, _, _ = _attention("bidirectional", x)
  assert not np.allclose(run(x)[:, 0], run(_changed_at(x, [6]))[:, 0], atol=1e-3)


def test_block_causal_sees_its_own_block_and_earlier_ones_only():
  kind = attention.BlockCausal((1, 2, 4))  # positions 0 | 1 2 | 3 4 5 6
  x = _x()
  run, _, _ = _attention(kind, x)
  out = run(x)
  later = run(_changed_at(x, [3]))  # first position of the last block
  np.testing.assert_allclose(out[:, :3], later[:, :3], atol=1e-6)
  # Position 3 is in the last block: every row of that block sees it, also the earlier ones.
  assert not np.allclose(out[:, 3:], later[:, 3:], atol=1e-3)
  same_block = run(_changed_at(x, [2]))
  assert not np.allclose(out[:, 1], same_block[:, 1], atol=1e-3)  # row 1 sees row 2
  np.testing.assert_allclose(out[:, 0], same_block[:, 0], atol=1e-6)


def test_block_sizes_must_cover_the_sequence():
  with pytest.raises(ValueError, match="cover 4 positions; the keys have 7"):
    _attention(attention.BlockCausal((2, 2)), _x())
  with pytest.raises(ValueError, match="positive size"):
    attention.BlockCausal((2, 0))


def test_padded_keys_change_nothing():
  x = _x()
  key_mask = jnp.arange(N)[None, :].repeat(B, 0) < jnp.array([[5], [3]])
  run, _, _ = _attention("bidirectional", x, key_mask=key_mask)
  out = run(x, key_mask=key_mask)
  other = run(_changed_at(x, [5, 6]), key_mask=key_mask)
  np.testing.assert_allclose(out[0, :5], other[0, :5], atol=1e-6)
  np.testing.assert_allclose(out[1, :3], other[1, :3], atol=1e-6)


def test_query_rows_give_the_full_outputs_at_those_rows():
  x = _x()
  run, _, _ = _attention("bidirectional", x)
  rows = jnp.array([[0, 5], [6, 2]])
  queries = jnp.take_along_axis(x, rows[:, :, None], axis=1)
  np.testing.assert_allclose(run(x, queries=queries),
                             jnp.take_along_axis(run(x), rows[:, :, None], axis=1), atol=1e-5)


@pytest.mark.parametrize("mask, chunks", [("causal", (1,) * N), (attention.BlockCausal((1, 2, 4)), (1, 2, 4))])
def test_kv_cached_calls_equal_one_full_call(mask, chunks):
  """Feeding the sequence chunk by chunk (a token, or a block) through the cache gives the
  outputs of one call over all of it: what KV-cached decoding relies on."""
  x = _x()
  run, params, module = _attention(mask, x)
  full = run(x)
  head_dim = D // H
  cache = {"k": jnp.zeros((B, N, H, head_dim)), "v": jnp.zeros((B, N, H, head_dim))}
  outs, start = [], 0
  for size in chunks:
    out, cache = module.apply(params, x[:, start:start + size], cache=cache, index=start)
    outs.append(out)
    start += size
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_rope_logits_depend_on_the_position_offset_alone():
  q = jax.random.normal(jax.random.PRNGKey(2), (1, N, 1, 16))
  k = jax.random.normal(jax.random.PRNGKey(3), (1, N, 1, 16))
  logits = lambda pos: jnp.einsum("bqhd,bkhd->qk", rope.rotate(q, pos), rope.rotate(k, pos))
  pos = jnp.arange(N)
  np.testing.assert_allclose(logits(pos), logits(pos + 11), rtol=1e-4, atol=1e-4)
  assert not np.allclose(logits(pos), logits(pos * 2), atol=1e-2)
  np.testing.assert_allclose(jnp.linalg.norm(rope.rotate(q, pos), axis=-1),
                             jnp.linalg.norm(q, axis=-1), rtol=1e-5)


def test_2d_rope_sees_row_and_column_offsets():
  two_d = rope.Rope(axes=2)
  q = jax.random.normal(jax.random.PRNGKey(2), (1, 6, 1, 16))
  k = jax.random.normal(jax.random.PRNGKey(3), (1, 6, 1, 16))
  grid = rope.grid_positions(jnp.arange(6), 3)  # a 2 x 3 grid
  np.testing.assert_array_equal(grid, [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
  logits = lambda pos: jnp.einsum("bqhd,bkhd->qk", two_d.apply(q, pos), two_d.apply(k, pos))
  np.testing.assert_allclose(logits(grid), logits(grid + jnp.array([5, 2])), rtol=1e-4, atol=1e-4)
  # Swapping rows and columns is a different geometry: the logits change.
  assert not np.allclose(logits(grid), logits(grid[:, ::-1]), atol=1e-2)


def test_attention_with_rope_is_shift_invariant():
  x = _x()
  run, _, _ = _attention("causal", x, rope=rope.Rope())
  np.testing.assert_allclose(run(x), run(x, positions=jnp.arange(N) + 3), atol=1e-5)


@pytest.mark.parametrize("order", patches.ORDERS)
def test_unpatchify_inverts_patchify(order):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 12, 3))
  tokens = patches.patchify(x, 4, order)
  assert tokens.shape == (2, 6, 48)
  np.testing.assert_array_equal(patches.unpatchify(tokens, 4, 2, 3, 3, order), x)
  # Token 1 is the patch at row 0, columns 4..7.
  first = x[:, 0:4, 4:8, :]
  want = first.reshape(2, -1) if order == "hwc" else first.transpose(0, 3, 1, 2).reshape(2, -1)
  np.testing.assert_array_equal(tokens[:, 1], want)


def test_an_untrained_adaln_block_is_the_identity():
  block = adaln.AdaLNResBlock()
  x, c = _x()[0], jax.random.normal(jax.random.PRNGKey(5), (N, D))
  params = block.init(jax.random.PRNGKey(0), x, c)
  np.testing.assert_array_equal(block.apply(params, x, c), x)
  # Trained (non-zero modulation), it is not.
  params = jax.tree.map(lambda p: p + 0.1, nn.meta.unbox(params))
  assert not np.allclose(block.apply(params, x, c), x)


def test_timestep_embedding_scales_time_and_pads_odd_widths():
  t = jnp.array([0.25, 0.5])
  np.testing.assert_allclose(adaln.timestep_embedding(t, 8, time_scale=1000.0),
                             adaln.timestep_embedding(1000.0 * t, 8), rtol=1e-6)
  odd = adaln.timestep_embedding(t, 7)
  assert odd.shape == (2, 7) and np.all(odd[:, -1] == 0)
