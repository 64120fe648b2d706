"""MAR's encoder/decoder backbone (`arjax.families.masked.backbone.MarBackbone`) and its converter.

Static shapes (one compiled encoder per kept count), the gather that replaces MAR's boolean
indexing, the converter's error report, and the logical axes every parameter carries.
The numbers against the official PyTorch MAR are checked by tests/test_golden_mar.py.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.families.masked.weights import backbone_params_from_state_dict
from arjax.families.masked import backbone as mar
from conftest import REPO_ROOT
from golden_mar import GOLDEN_DIR, GOLDEN_FILES


def _small_backbone():
  return mar.MarBackbone(seq_len=16, token_dim=4, encoder_embed_dim=32, encoder_depth=1,
                         encoder_num_heads=2, decoder_embed_dim=24, decoder_depth=1,
                         decoder_num_heads=2, num_classes=3, buffer_size=2)


def _mask(rng, batch, seq_len, num_masked):
  orders = np.argsort(rng.random((batch, seq_len)), axis=1)
  mask = np.zeros((batch, seq_len), bool)
  np.put_along_axis(mask, orders[:, :num_masked], True, axis=1)
  return mask


def test_encoder_compiles_once_per_kept_count():
  model = _small_backbone()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 16, 4)), jnp.float32)
  labels = jnp.array([0, 2])
  # Jitted init and apply: op-by-op dispatch would dominate this test's time.
  params = jax.jit(model.init, static_argnums=4)(
      jax.random.PRNGKey(0), x, jnp.asarray(_mask(rng, 2, 16, 5)), labels, 11)["params"]
  traces = []

  def encode(params, x, mask, labels, num_kept):
    traces.append(num_kept)
    ce = model.apply({"params": params}, labels, method=model.class_embedding)
    return model.apply({"params": params}, x, mask, ce, num_kept, method=model.encode)
  encode = jax.jit(encode, static_argnums=4)

  outs = [encode(params, x, jnp.asarray(_mask(rng, 2, 16, 5)), labels, 11) for _ in range(3)]
  assert traces == [11] and encode._cache_size() == 1
  assert all(o.shape == (2, 2 + 11, 32) for o in outs)
  assert not np.allclose(outs[0], outs[1])  # different masks really did reach the encoder
  encode(params, x, jnp.asarray(_mask(rng, 2, 16, 9)), labels, 7)
  assert traces == [11, 7] and encode._cache_size() == 2


def test_static_gather_keeps_raster_order_like_boolean_indexing():
  """The take_along_axis gather equals MAR's `x[(1 - mask_with_buffer).nonzero()]`."""
  model = _small_backbone()
  rng = np.random.default_rng(1)
  batch, num_masked = 3, 6
  x = rng.standard_normal((batch, 16, 4)).astype(np.float32)
  mask = _mask(rng, batch, 16, num_masked)
  labels = jnp.array([0, 1, 2])
  num_kept = 16 - num_masked
  variables = jax.jit(model.init, static_argnums=4)(
      jax.random.PRNGKey(1), jnp.asarray(x), jnp.asarray(mask), labels, num_kept)
  apply = jax.jit(lambda v, x, m, y: model.apply(v, x, m, y, num_kept,
                                                 mutable=["intermediates"]))
  _, state = apply(variables, jnp.asarray(x), jnp.asarray(mask), labels)
  full = np.asarray(state["intermediates"]["enc_z_proj_ln"][0])
  keep = np.concatenate([np.ones((batch, 2), bool), ~mask], axis=1)
  expected = full[keep.nonzero()].reshape(batch, -1, full.shape[-1])
  np.testing.assert_array_equal(state["intermediates"]["enc_blocks_in"][0], expected)
  # Decoder: mask_token everywhere except the kept positions, which get decoder_embed(h).
  dec_in = np.asarray(state["intermediates"]["dec_blocks_in"][0])
  dec_embed = np.asarray(state["intermediates"]["dec_embed"][0])
  pos = np.asarray(variables["params"]["decoder_pos_embed_learned"].value)
  token = np.asarray(variables["params"]["mask_token"].value)
  expected = np.broadcast_to(token, dec_in.shape).copy()
  expected[keep.nonzero()] = dec_embed.reshape(-1, dec_embed.shape[-1])
  np.testing.assert_allclose(dec_in, expected + pos, rtol=0, atol=0)


@pytest.mark.skipif(not GOLDEN_FILES, reason=f"no mar_*.npz in {GOLDEN_DIR}")
def test_converter_names_every_bad_key():
  d = np.load(GOLDEN_FILES[0], allow_pickle=False)
  config = json.loads(str(d["config_json"]))
  state_dict = {k[len("param/"):]: d[k] for k in d.files if k.startswith("param/")}
  del state_dict["encoder_blocks.0.attn.qkv.weight"]
  state_dict["decoder_blocks.0.attn.extra"] = np.zeros(3, np.float32)
  state_dict["mask_token"] = np.zeros((1, 1, 7), np.float32)
  state_dict["diffloss.net.anything"] = np.zeros(1)  # the head's keys are not judged here
  with pytest.raises(ValueError) as info:
    backbone_params_from_state_dict(state_dict, config)
  message = str(info.value)
  assert "missing: encoder_blocks.0.attn.qkv.weight" in message
  assert "unexpected: decoder_blocks.0.attn.extra" in message
  assert "mis-shaped: mask_token: got (1, 1, 7)" in message
  assert "diffloss.net" not in message


def test_every_parameter_has_known_logical_axes():
  import flax.linen as nn
  from arjax.config import schema as configs
  model = _small_backbone()
  boxed = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 16, 4)), jnp.zeros((1, 16), bool),
      jnp.zeros((1,), jnp.int32), 16))["params"]
  known = {name for name, _ in configs.load(str(REPO_ROOT / "configs/digits.py")).sharding.rules}
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= known, leaf.names
    # A mesh axis used twice in one spec is an error at sharding time.
    assert len(set(leaf.names)) == len(leaf.names), leaf.names


@pytest.mark.parametrize("scan_layers", [False, True])
def test_z_at_positions_equals_the_full_z_gathered_there(scan_layers):
  """The sampler asks for z at the positions a step predicts only; with unrolled blocks the
  last decoder block then runs those query rows alone. Same numbers as the full decoder."""
  model = mar.MarBackbone(seq_len=16, token_dim=4, encoder_embed_dim=32, encoder_depth=1,
                          encoder_num_heads=2, decoder_embed_dim=24, decoder_depth=2,
                          decoder_num_heads=2, num_classes=3, buffer_size=2,
                          scan_layers=scan_layers)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((3, 16, 4)), jnp.float32)
  mask = jnp.asarray(_mask(rng, 3, 16, 10))
  labels = jnp.array([0, 1, 2])
  params = jax.jit(model.init, static_argnums=4)(jax.random.PRNGKey(0), x, mask, labels, 6)
  # Perturb the zero/constant initialisations so every parameter moves the output.
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                        params)
  positions = jnp.asarray([[3, 0, 15], [7, 7, 2], [15, 14, 13]])
  full = jax.jit(lambda p: model.apply(p, x, mask, labels, 6))(params)
  at = jax.jit(lambda p: model.apply(p, x, mask, labels, 6, None, positions))(params)
  assert at.shape == (3, 3, 24)
  np.testing.assert_allclose(at, np.take_along_axis(full, positions[:, :, None], axis=1),
                             rtol=1e-5, atol=1e-5)
