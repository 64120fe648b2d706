"""The recurrent causal family (gated linear attention, 'pure' and 'hybrid'): its two forms of
the recurrence agree, its scan decoding with a constant-size state is the teacher-forced
forward pass, it is causal, its FLOP model is its programs', bad fields are errors naming
them, and it trains (sharded as the other families, resumed bit for bit) and runs the CLI."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax import registry
from arjax.config import schema as configs
from arjax.errors import ConfigError
from arjax.families.causal.model import ARModel
from arjax.families.causal.sampler import sample_tokens
from arjax.families.recurrent.backbone import RecurrentTransformer
from arjax.layers import linear_attention as la
from arjax.util import jaxpr_flops
import family_testing
from conftest import REPO_ROOT

MIXERS = ["pure", "hybrid"]


def recurrent_config(mixer="pure"):
  return configs.load(str(REPO_ROOT / "configs" / ("digits_recurrent.py:smoke" if mixer == "pure"
                                                   else "digits_recurrent.py:hybrid_smoke")))


@functools.lru_cache(maxsize=None)
def built(mixer):
  """(model, head, tokenizer, params) of the smoke config, every parameter perturbed so that
  all of them matter (the head's output layers start at zero)."""
  tok, model, head, params = family_testing.built_with_perturbed_params(recurrent_config(mixer))
  return model, head, tok, params


# ---------------------------------------------------------------- the layer's two forms

@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 8, 20])
def test_chunk_parallel_form_equals_the_step_form_with_and_without_gates(chunk, gated):
  """Ungated (log g = 0: plain linear attention, nothing forgotten) and with data-dependent
  gates; chunks dividing the 20 tokens or not, from a non-zero state: <= 1e-5 in fp32."""
  ks = jax.random.split(jax.random.PRNGKey(chunk), 5)
  q, k = (jax.random.normal(key, (2, 20, 3, 4)) for key in ks[:2])
  v = jax.random.normal(ks[2], (2, 20, 3, 5))
  log_g = (jax.nn.log_sigmoid(2.0 * jax.random.normal(ks[3], (2, 20, 3))) if gated
           else jnp.zeros((2, 20, 3)))
  state = jax.random.normal(ks[4], (2, 3, 4, 5))
  o_step, s_step = jnp.zeros((2, 0, 3, 5)), state
  for t in range(20):  # the decoder's step, token by token
    o, s_step = la.recurrent_step(q[:, t], k[:, t], v[:, t], log_g[:, t], s_step)
    o_step = jnp.concatenate([o_step, o[:, None]], axis=1)
  o_chunk, s_chunk = la.chunk_parallel(q, k, v, log_g, state, chunk)
  scale = float(jnp.max(jnp.abs(o_step)))
  np.testing.assert_allclose(o_chunk / scale, o_step / scale, atol=1e-5, rtol=0)
  np.testing.assert_allclose(s_chunk, s_step, atol=1e-5 * float(jnp.max(jnp.abs(s_step))))
  if not gated:  # without gates the state is the initial one plus every k^T v
    np.testing.assert_allclose(s_chunk, state + jnp.einsum("bthk,bthv->bhkv", k, v),
                               rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- decoding = forward

@pytest.mark.parametrize("mixer", MIXERS)
def test_scan_decoding_with_the_state_equals_the_teacher_forced_forward(mixer):
  """The causal sampler's scan (head draw, then one position through the blocks against the
  state) conditions every token on the z the full chunked forward gives for the same tokens;
  with CFG, so the null-class rows decode too. Hybrid: chunks of 4 over 16 positions, so the
  chunk's key/value slots are overwritten three times."""
  model, head, tok, params = built(mixer)
  labels = jnp.array([0, 3, 7])
  run = jax.jit(functools.partial(sample_tokens, model=model, head=head, guided=True,
                                  num_steps=2, num_tokens=tok.num_tokens))
  tokens, z_decoded = run(params, labels, jax.random.PRNGKey(0),
                          jnp.full((tok.num_tokens,), 2.0), jnp.float32(1.0))
  all_labels = jnp.concatenate([labels, jnp.full_like(labels, 10)])
  z_forward = jax.jit(lambda x: model.apply({"params": params}, x, all_labels,
                                            method=ARModel.condition))(
                                                jnp.concatenate([tokens, tokens]))
  assert z_decoded.shape == z_forward.shape == (6, tok.num_tokens, 32)
  error = float(jnp.max(jnp.abs(z_decoded - z_forward)) / jnp.max(jnp.abs(z_forward)))
  assert error <= 1e-5, error


def test_the_decoding_state_does_not_grow_with_the_sequence():
  """Per layer [B, H, Dh, Dh] ('pure'), plus the chunk's keys/values [B, C, H, Dh] ('hybrid'):
  the same for 16 tokens as for 1024; a KV cache would hold P + T rows."""
  def cache_shapes(mixer, num_tokens):
    backbone = RecurrentTransformer(num_tokens=num_tokens, token_dim=4, width=32, depth=2,
                                    num_heads=2, mlp_ratio=4.0, num_classes=10,
                                    num_class_tokens=1, mixer=mixer, chunk_size=4)
    return jax.tree.map(lambda a: a.shape, backbone.init_cache(3))

  assert cache_shapes("pure", 16) == cache_shapes("pure", 1024) == [{"state": (3, 2, 16, 16)}] * 2
  hybrid = {"state": (3, 2, 16, 16), "k": (3, 4, 2, 16), "v": (3, 4, 2, 16)}
  assert cache_shapes("hybrid", 16) == cache_shapes("hybrid", 1024) == [hybrid] * 2


def test_scanned_remat_blocks_give_the_unrolled_numbers_and_decode_with_a_stacked_cache():
  from arjax.layers import transformer as layers
  fields = dict(num_tokens=16, token_dim=4, width=32, depth=2, num_heads=2, mlp_ratio=4.0,
                num_classes=10, num_class_tokens=2, mixer="hybrid", chunk_size=4)
  unrolled = RecurrentTransformer(**fields)
  scanned = RecurrentTransformer(**fields, scan_layers=True, remat="full")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 4))
  labels = jnp.array([1, 2])
  params = nn.meta.unbox(unrolled.init(jax.random.PRNGKey(1), x, labels)["params"])
  stacked = {"params": layers.stack_unrolled_blocks(params, "block", 2, "blocks")}
  full = jax.jit(lambda: unrolled.apply({"params": params}, x, labels))()
  np.testing.assert_allclose(jax.jit(lambda: scanned.apply(stacked, x, labels))(), full,
                             atol=1e-5, rtol=1e-5)
  cache = scanned.init_cache(2)
  assert cache["state"].shape == (2, 2, 2, 16, 16) and cache["k"].shape == (2, 2, 4, 2, 16)
  z, cache = jax.jit(lambda c: scanned.apply(stacked, labels, c, method=scanned.prefill))(cache)
  step = jax.jit(lambda token, i, c: scanned.apply(stacked, token, i, c,
                                                   method=scanned.decode_step))
  decoded = [z]
  for i in range(15):
    z, cache = step(x[:, i], i, cache)
    decoded.append(z)
  np.testing.assert_allclose(jnp.stack(decoded, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixer", MIXERS)
def test_a_token_changes_nothing_before_it(mixer):
  """z_i conditions token i: changing token j leaves z_0 .. z_j unchanged and moves a later z
  (within j's chunk and after it: the recurrence carries it across chunks)."""
  model, _, tok, params = built(mixer)
  tokens = jnp.asarray(np.random.default_rng(0).normal(size=(2, tok.num_tokens, 4)), jnp.float32)
  condition = jax.jit(lambda x: model.apply({"params": params}, x, jnp.array([1, 2]),
                                            method=ARModel.condition))
  z = condition(tokens)
  for j in (0, 5, tok.num_tokens - 2):
    moved = condition(tokens.at[:, j].add(1.0))
    np.testing.assert_array_equal(np.asarray(moved[:, :j + 1]), np.asarray(z[:, :j + 1]))
    assert float(jnp.max(jnp.abs(moved[:, j + 1] - z[:, j + 1]))) > 1e-4
    assert float(jnp.max(jnp.abs(moved[:, -1] - z[:, -1]))) > 1e-6


# ---------------------------------------------------------------- config and FLOPs

@pytest.mark.parametrize("field, value, message", [
    ("mixer", "attention", r"config\.model\.mixer.*one of \('pure', 'hybrid'\)"),
    ("chunk_size", 0, r"config\.model\.chunk_size"),
    ("num_heads", 5, r"num_heads"),  # 32 does not split into 5 heads
])
def test_a_bad_model_field_is_an_error_naming_it(field, value, message):
  config = recurrent_config()
  config.model[field] = value
  with pytest.raises(ConfigError, match=message):
    registry.validate(config)


def test_another_familys_field_is_an_unknown_key():
  config = recurrent_config()
  config.model.flow_net = "token"  # the scale family's
  with pytest.raises(ConfigError, match="model.flow_net"):
    registry.validate(config)


@pytest.mark.parametrize("mixer", MIXERS)
def test_the_analytic_flops_are_the_programs_matmuls(mixer):
  """Train: the family's accounting against the jaxpr of jax.grad(loss) within 2% (the
  norms' and gates' tiny matmul-free parts aside, it is the same arithmetic). Decode: the
  backbone's one-position step exactly."""
  config = recurrent_config(mixer)
  config.model.width, config.model.num_heads = 64, 2
  tok = registry.make_tokenizer(config.tokenizer, config.data)
  model, _, loss = registry.build_model(config, tok)
  family = registry.family(config)
  params = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.PRNGKey(0), *family.example_inputs(tok))["params"]))
  batch = 4
  analytic = family.flops(config, tok, registry.head(config), "train", batch)
  counted = jaxpr_flops.count(jax.grad(loss), params,
                              jax.ShapeDtypeStruct((batch, 16, 4), jnp.float32),
                              jax.ShapeDtypeStruct((batch,), jnp.int32), jax.random.PRNGKey(0),
                              modules=("head",))
  assert abs(analytic["total"] - counted.flops) <= 0.02 * counted.flops, (analytic, counted.flops)

  config.sample.cfg_scale = 1.0
  decode = family.flops(config, tok, registry.head(config), "decode", batch)
  cache = model.backbone.init_cache(batch)
  step = jaxpr_flops.count(
      lambda p, x, c: model.apply({"params": p}, x, 5, c, method=ARModel.decode_step), params,
      jax.ShapeDtypeStruct((batch, 4), jnp.float32), cache)
  assert decode["backbone"] == step.flops


# ---------------------------------------------------------------- training

def test_sharded_recurrent_step_equals_single_device_step():
  """Hybrid (both mixers' parameters) on data 2 x fsdp 2 x tensor 2: the recurrence's and the
  attention's heads over 'tensor'."""
  state_8 = family_testing.assert_sharded_step_equals_single_device_step(
      recurrent_config("hybrid"), (2, 2, 2))
  block = state_8.params["backbone"]["block_0"]
  spec = jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert block["recurrence"]["query"]["kernel"].sharding.spec == spec
  assert block["attn"]["query"]["kernel"].sharding.spec == spec


def test_resume_continues_bit_for_bit(tmp_path, data_dir):
  """With dropout: its draws, the label drops and the flow noise come from the step's key."""
  config = recurrent_config()
  config.data.data_dir = data_dir
  config.model.attention_dropout = config.model.dropout = 0.1
  family_testing.assert_resume_continues_bit_for_bit(config, tmp_path)


@pytest.mark.slow
def test_train_sample_eval_through_the_cli(tmp_path, data_dir):
  family_testing.assert_cli_trains_samples_and_scores("configs/digits_recurrent.py:hybrid_smoke", str(tmp_path / "run"),
                                                      data_dir)


def test_describe_and_the_decode_bench_see_the_family():
  """`describe` names the mixer and extrapolates activations over the block stack; `bench
  --mode=decode` times the state step at the first, middle and last position and reports the
  state it carries: z [2B, W] and per layer the state [2B, H, Dh, Dh] and, hybrid, the chunk's
  k, v [2B, 4, H, Dh] (CFG doubles the 20 rows), the same at every position."""
  from arjax.perf import bench, describe
  config = recurrent_config("hybrid")
  table = describe.format_table(config, describe.describe(config))
  assert "recurrent (hybrid): 32 x 2 (2 heads of gated linear attention, softmax attention " \
         "in chunks of 4)" in table
  r = bench.run(config, mode="decode", batch_size=None, repeats=2, warmup=1, profile_dir=None)
  assert r["decode_positions"] == [0, 8, 15] and all(t > 0 for t in r["decode_median_s"])
  rows = 2 * config.sample.batch_size
  assert r["decode_state_bytes"] == [4 * rows * (32 + 2 * (2 * 16 * 16 + 2 * 4 * 2 * 16))] * 3
  assert r["flops_per_call"] == registry.flops(config, "decode", config.sample.batch_size)["total"]
