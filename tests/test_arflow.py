"""The ARFlow family: its gated retention's chunk-parallel form is its step form, its sampler's
recurrent steps are the full forward pass over the same sequence of images, images are causal,
the input pipeline builds same-class sequences (deterministic, resumable, independent of the
process count), bad fields are errors naming them, and it trains (sharded as the other
families, resumed bit for bit) and runs the CLI."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax import registry
from arjax.config import schema as configs
from arjax.data import pipeline
from arjax.errors import ConfigError
from arjax.families.arflow.model import ArflowModel, flow_loss, sequence_times, sequences
from arjax.families.arflow.sampler import image_draws, sample_tokens
from arjax.layers import linear_attention as la
import family_testing
from conftest import REPO_ROOT


def arflow_config():
  return configs.load(str(REPO_ROOT / "configs" / "digits_arflow.py:smoke"))


@functools.lru_cache(maxsize=None)
def built():
  """(model, tokenizer, params) of the smoke config, every parameter perturbed so that all of
  them matter (the adaLN-Zero layers and the output start at zero)."""
  tok, model, _, params = family_testing.built_with_perturbed_params(arflow_config())
  return model, tok, params


def forward(params, model, x, labels, t):
  """The training form: all images of x [B, n, T, D] at once."""
  return model.apply({"params": params}, x, labels, t, method=ArflowModel.velocity)[0]


# ---------------------------------------------------------------- the layer's two forms

@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_chunk_parallel_retention_equals_the_step_form(chunk, gated):
  """5 chunks from a non-zero state: the training form's outputs and final state are those of
  one chunk at a time with the state carried (the sampler's step), <= 1e-5 in fp32; ungated
  (log g = 0: nothing forgotten) and with data-dependent gates."""
  n = 5
  ks = jax.random.split(jax.random.PRNGKey(chunk), 5)
  q, k = (jax.random.normal(key, (2, n * chunk, 3, 4)) for key in ks[:2])
  v = jax.random.normal(ks[2], (2, n * chunk, 3, 6))
  log_g = (jax.nn.log_sigmoid(2.0 * jax.random.normal(ks[3], (2, n * chunk, 3))) if gated
           else jnp.zeros((2, n * chunk, 3)))
  state = jax.random.normal(ks[4], (2, 3, 4, 6))
  o_par, s_par = la.chunk_retention(q, k, v, log_g, state, chunk)
  s_step, outs = state, []
  for c in range(n):
    part = slice(c * chunk, (c + 1) * chunk)
    o, s_step = la.retention_step(q[:, part], k[:, part], v[:, part], log_g[:, part], s_step)
    outs.append(o)
  np.testing.assert_allclose(o_par, jnp.concatenate(outs, axis=1), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(s_par, s_step, atol=1e-5, rtol=1e-5)
  # The state is read: a different entering state changes every output.
  o_other, _ = la.chunk_retention(q, k, v, log_g, 2.0 * state, chunk)
  assert np.all(np.abs(np.asarray(o_other - o_par)).max(axis=(0, 2, 3)) > 1e-4)


def test_retention_step_is_the_published_recurrence_written_out():
  """One chunk by hand: softmax(q k^T) v within the chunk + (q exp(cumsum a)) S, and the state
  S exp(mean a) + K^T V (ARFlow's chunk_gate_retention)."""
  ks = jax.random.split(jax.random.PRNGKey(7), 5)
  q, k, v = (jax.random.normal(key, (1, 3, 1, 2)) for key in ks[:3])
  a = -jax.nn.softplus(jax.random.normal(ks[3], (1, 3, 1)))
  s = jax.random.normal(ks[4], (1, 1, 2, 2))
  o, s_new = la.retention_step(q, k, v, a, s)
  q0, k0, v0, a0, s0 = (np.asarray(x, np.float64) for x in (q[0, :, 0], k[0, :, 0], v[0, :, 0],
                                                            a[0, :, 0], s[0, 0]))
  logits = q0 @ k0.T
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  expected = probs @ v0 + (q0 * np.exp(np.cumsum(a0))[:, None]) @ s0
  np.testing.assert_allclose(o[0, :, 0], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s_new[0, 0], s0 * np.exp(a0.mean()) + k0.T @ v0, rtol=1e-5,
                             atol=1e-6)


# ---------------------------------------------------------------- the network

def test_recurrent_sampling_steps_equal_the_full_forward_over_the_same_sequence():
  """The sampler's K steps (each one image against the state of the earlier ones, CFG's rows
  included) give the velocities of ONE training-form forward over the K images it fed."""
  model, tok, params = built()
  labels = jnp.array([3, 7])
  num_steps = 4
  draw = image_draws(jax.random.split(jax.random.PRNGKey(0), 2), tok.num_tokens, tok.token_dim)
  _, record = sample_tokens(params, labels, draw, jnp.full((num_steps,), 2.0), 1.0, model=model,
                            solver="euler_maruyama", num_steps=num_steps, guided=True, trace=True)
  x = jnp.moveaxis(record["x"], 0, 1)                     # [B, K, T, D] the images fed
  rows = jnp.concatenate([x, x])                          # conditional and null rows
  row_labels = jnp.concatenate([labels, jnp.full_like(labels, model.backbone.num_classes)])
  t = jnp.broadcast_to(record["t"], (4, num_steps))
  v_full = forward(params, model, rows, row_labels, t)
  np.testing.assert_allclose(jnp.moveaxis(record["v"], 0, 1), v_full, atol=1e-5, rtol=1e-5)
  # ... and the state matters: the last step alone, from a zero state, is different.
  v_alone = forward(params, model, rows[:, -1:], row_labels, t[:, -1:])
  assert float(jnp.max(jnp.abs(v_alone[:, 0] - v_full[:, -1]))) > 1e-3


def test_an_image_changes_nothing_before_it_and_everything_after():
  model, tok, params = built()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, tok.num_tokens, tok.token_dim))
  labels = jnp.array([1, 2])
  t = sequence_times(jax.random.uniform(jax.random.PRNGKey(2), (2, 4)))
  v = forward(params, model, x, labels, t)
  changed = forward(params, model, x.at[:, 2].add(1.0), labels, t)
  np.testing.assert_array_equal(changed[:, :2], v[:, :2])
  diff = np.asarray(jnp.abs(changed - v)).max(axis=(0, 2, 3))
  assert diff[2] > 1e-3 and diff[3] > 1e-3


def test_the_scanned_blocks_give_the_unrolled_numbers():
  config = arflow_config()
  config.model.scan_layers = True
  config.model.remat = "full"
  tok = registry.make_tokenizer(config.tokenizer, config.data)
  scanned, _, _ = registry.build_model(config, tok)
  model, _, params = built()
  from arjax.layers.transformer import stack_unrolled_blocks
  stacked = {"backbone": stack_unrolled_blocks(params["backbone"], "block", 2, "blocks")}
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, tok.num_tokens, tok.token_dim))
  labels, t = jnp.array([0, 9]), jnp.full((2, 4), 0.5)
  np.testing.assert_allclose(forward(stacked, scanned, x, labels, t),
                             forward(params, model, x, labels, t), atol=1e-5, rtol=1e-5)
  draw = image_draws(jax.random.split(jax.random.PRNGKey(4), 2), tok.num_tokens, tok.token_dim)
  sample = lambda m, p: sample_tokens(p, labels, draw, jnp.ones((3,)), 1.0, model=m,
                                      solver="euler", num_steps=3, guided=False)
  np.testing.assert_allclose(sample(scanned, stacked), sample(model, params), atol=1e-5)


def test_the_loss_regresses_each_images_velocity_at_sorted_times():
  """Times descend along the sequence (noisiest first); rows [bN, (b+1)N) are sequence b with
  its first row's label; the loss is the mean squared velocity error at those draws."""
  t = sequence_times(jax.random.uniform(jax.random.PRNGKey(0), (6, 5)))
  assert bool(jnp.all(jnp.diff(t, axis=1) <= 0))
  tokens = jnp.arange(4 * 2 * 3, dtype=jnp.float32).reshape(4, 2, 3)
  x, labels = sequences(tokens, jnp.array([5, 5, 8, 8]), 2)
  np.testing.assert_array_equal(x[1, 0], tokens[2])
  np.testing.assert_array_equal(labels, [5, 8])
  model, tok, params = built()
  config = arflow_config()
  batch = jax.random.normal(jax.random.PRNGKey(5), (8, tok.num_tokens, tok.token_dim))
  lab = jnp.repeat(jnp.array([2, 6]), 4)
  loss = flow_loss(params, batch, lab, jax.random.PRNGKey(6), model=model, group_size=4,
                   label_drop=0.0)
  # The same draws by hand.
  _, time_key, noise_key = jax.random.split(jax.random.PRNGKey(6), 3)
  seq, labels = sequences(batch, lab, 4)
  tt = sequence_times(jax.random.uniform(time_key, (2, 4)))
  noise = jax.random.normal(noise_key, seq.shape)
  x_t = (1 - tt[..., None, None]) * seq + tt[..., None, None] * noise
  v = forward(params, model, x_t, labels, tt)
  np.testing.assert_allclose(loss, jnp.mean(jnp.square(v - (noise - seq))), rtol=1e-6)
  assert config.data.group_size == 4


# ---------------------------------------------------------------- the sampler

def test_an_image_is_independent_of_its_batch_and_the_guidance_matters():
  """The published SDE (its noise drawn per image too); Euler's ODE runs in the scanned-blocks
  test above."""
  config = arflow_config()
  assert config.sample.solver == "euler_maruyama"
  model, tok, params = built()
  sampler = registry.family(config).sampler(model, None, tok, config)
  labels = np.array([0, 1, 2, 3])
  call = lambda lab, first, cfg: np.asarray(sampler(
      params, lab, jax.random.PRNGKey(9), cfg_scale=cfg, cfg_schedule_name="constant",
      temperature=1.0, first_index=first))
  whole = call(labels, 0, 2.0)
  assert whole.shape == (4, 8, 8, 1) and np.all(np.isfinite(whole))
  np.testing.assert_allclose(call(labels[2:], 2, 2.0), whole[2:], atol=1e-5)
  assert np.abs(call(labels, 0, 1.0) - whole).max() > 1e-3


# ---------------------------------------------------------------- the data

_RECORDS = 60  # 6 per class


def _toy_source(n=_RECORDS):
  return [{"image": np.full((2, 2, 1), p, np.uint8), "label": p % 10, "index": p}
          for p in range(n)]


def _grouped(group, batch=10, **kwargs):
  data = configs.load(str(REPO_ROOT / "configs/digits.py")).data
  data.image_size, data.group_size = 2, group
  return pipeline.train_dataset(_toy_source(kwargs.pop("n", _RECORDS)), data,
                                global_batch_size=batch, seed=3, **kwargs)


def _positions(batch):
  return pipeline.denormalize(batch["image"])[:, 0, 0, 0].astype(int)


@pytest.mark.parametrize("n", [_RECORDS, 30])  # 6 per class (distinct members), 3 (repeats)
def test_every_group_is_one_class_of_distinct_records_and_anchors_cover_the_epoch(n):
  ds = _grouped(5, n=n)
  anchors = []
  for k in range(n):  # two epochs of anchors: n groups each, 2 groups per batch
    batch = ds[k]
    for group, labels in zip(_positions(batch).reshape(2, 5), batch["label"].reshape(2, 5)):
      assert len(set(labels.tolist())) == 1 and np.all(group % 10 == labels[0])
      if n == _RECORDS:
        assert len(set(group.tolist())) == 5
      anchors.append(group[0])
  epoch = len(anchors) // 2
  assert sorted(anchors[:epoch]) == list(range(n)) == sorted(anchors[epoch:])
  assert anchors[:epoch] != anchors[epoch:]  # reshuffled every epoch


def test_grouped_batches_are_deterministic_resumable_and_independent_of_the_process_count():
  expected = [_grouped(5)[k] for k in range(4)]
  again = _grouped(5)
  for k in range(4):
    np.testing.assert_array_equal(again[k]["image"], expected[k]["image"])
  it = pipeline.iterate(_grouped(5), 0)
  pipeline.set_iterator_position(it, 2)
  np.testing.assert_array_equal(next(it)["image"], expected[2]["image"])
  # Two processes of 5 rows each (the block boundary splits no group here, but need not).
  for k in range(4):
    parts = [_grouped(5, process_index=p, process_count=2)[k] for p in range(2)]
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[k][key])
  # Group size 1 is the ungrouped pipeline.
  ungrouped = configs.load(str(REPO_ROOT / "configs/digits.py")).data
  ungrouped.image_size = 2
  plain = pipeline.train_dataset(_toy_source(), ungrouped, global_batch_size=10, seed=3)
  np.testing.assert_array_equal(_grouped(1)[3]["image"], plain[3]["image"])


def test_a_batch_of_partial_sequences_is_refused():
  with pytest.raises(ValueError, match="group_size=5"):
    _grouped(5, batch=12)


# ---------------------------------------------------------------- config, training, CLI

@pytest.mark.parametrize("field, value, message", [
    ("head.name", "flow", "config.head.name='flow'"),
    ("train.global_batch_size", 18, "config.train.global_batch_size=18"),
    ("data.group_size", 0, "config.data.group_size"),
    ("model.attention_dropout", 0.1, "config.model.attention_dropout"),
    ("model.num_heads", 3, "config.model.width=32 must be divisible by config.model.num_heads=3"),
    ("model.gate_normalizer", 0.0, "config.model.gate_normalizer"),
    ("sample.solver", "heun", "config.sample.solver"),
    ("sample.head_step_schedule", "linear", "config.sample.head_step_schedule"),
])
def test_a_bad_field_is_an_error_naming_it(field, value, message):
  config = arflow_config()
  section, key = field.split(".")
  if field == "head.name":
    config.head.width = 32  # a flow head's fields, so that the schema passes
    config.head = configs.load(str(REPO_ROOT / "configs/digits.py:smoke")).head
  config[section][key] = value
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    registry.validate(config)


def test_another_familys_field_is_an_unknown_key():
  config = arflow_config()
  config.model.entity = "cell"
  with pytest.raises(ConfigError, match="config.model.entity: unknown key"):
    registry.validate(config)


def test_sharded_arflow_step_equals_single_device_step():
  """data 2 x fsdp 2 x tensor 2: the retention's heads over 'tensor', 4 sequences of 4."""
  state_8 = family_testing.assert_sharded_step_equals_single_device_step(arflow_config(),
                                                                         (2, 2, 2))
  block = state_8.params["backbone"]["block_0"]
  spec = jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert block["retention"]["query"]["kernel"].sharding.spec == spec


def test_resume_continues_bit_for_bit(tmp_path, data_dir):
  """Grouped digits from the real pipeline, with dropout: its draws, the label drops, times
  and noise come from the step's key, the groups from the data position."""
  config = arflow_config()
  config.data.data_dir = data_dir
  config.model.dropout = 0.1
  family_testing.assert_resume_continues_bit_for_bit(config, tmp_path)


@pytest.mark.slow
def test_train_sample_eval_through_the_cli(tmp_path, data_dir):
  family_testing.assert_cli_trains_samples_and_scores("configs/digits_arflow.py:smoke", str(tmp_path / "run"),
                                                      data_dir)


def test_describe_names_the_family_and_counts_its_flops():
  from arjax.perf import describe
  config = arflow_config()
  table = describe.format_table(config, describe.describe(config))
  assert ("arflow: 4 same-class images per sequence, width 32 x 2 blocks (2 heads: softmax "
          "attention inside an image, gated retention across images)") in table
  flops = registry.flops(config, "train", config.train.global_batch_size)
  assert flops["head"] == 0 and flops["backbone"] > 0


@pytest.mark.parametrize("mode", ["train", "sample"])
def test_the_analytic_flops_are_the_programs_matmuls(mode):
  """The family's accounting against the jaxpr count of the real loss gradient / sampler call,
  within 2% (norms, gates and the time MLP's missing input gradient aside)."""
  from arjax.util import jaxpr_flops
  import flax.linen as nn
  config = arflow_config()
  config.model.width, config.model.num_heads = 64, 2
  tok = registry.make_tokenizer(config.tokenizer, config.data)
  model, _, loss = registry.build_model(config, tok)
  family = registry.family(config)
  params = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.PRNGKey(0), *family.example_inputs(tok))["params"]))
  batch = 8
  analytic = family.flops(config, tok, registry.head(config), mode, batch)["total"]
  if mode == "train":
    counted = jaxpr_flops.count(jax.grad(loss), params,
                                jax.ShapeDtypeStruct((batch, 16, 4), jnp.float32),
                                jax.ShapeDtypeStruct((batch,), jnp.int32),
                                jax.random.PRNGKey(0)).flops
  else:
    s = config.sample
    sampler = family.sampler(model, None, tok, config)
    counted = jaxpr_flops.count(lambda p: sampler.sample_images(
        p, jnp.arange(batch) % 10, jax.random.PRNGKey(0),
        jnp.asarray(sampler.guidance_scales(s.cfg_scale, s.cfg_schedule)), jnp.float32(1.0),
        jnp.arange(batch), guided=True), params).flops
  assert abs(analytic - counted) <= 0.02 * counted, (analytic, counted)


def test_the_imagenet_preset_has_arflow_xl2s_dims():
  """ARFlow-XL/2 (28 x 1152, 18 heads): SiT-XL/2's 675M parameters plus the retention's SwiGLU
  gate projection (28 x 1152^2 = 37.2M), on 256 KL-16 tokens of dim 16 a image, 5 a sequence."""
  config = configs.load(str(REPO_ROOT / "configs/imagenet256_arflow_xl.py"))
  registry.validate(config)
  assert (config.model.width, config.model.depth, config.model.num_heads) == (1152, 28, 18)
  assert config.data.group_size == 5 and config.train.global_batch_size % 5 == 0
  tok = registry.make_tokenizer(config.tokenizer, config.data, abstract=True)
  assert (tok.num_tokens, tok.token_dim) == (256, 16)
  model, _, _ = registry.build_model(config, tok)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *registry.family(
      config).example_inputs(tok)))["params"]
  count = sum(leaf.size for leaf in jax.tree.leaves(params))
  assert abs(count / 1e6 - 712.7) < 0.5, count
