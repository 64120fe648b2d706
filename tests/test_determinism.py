"""Same config + seed, same numbers on CPU; an image's noise depends on its index, not its batch.

Training: two fresh runs log identical loss curves (read back from their TensorBoard event
files) and end in bit-identical states. Sampling: the same seed gives bit-identical images,
and a request split into batches of 8 gives the images of one batch of 20, because each
image draws its noise from (seed, image index) (arjax/families/causal/sampler.py, "Seeds"). Bit-identity
across batch sizes is not promised: XLA may order a reduction differently for another batch
shape. Observed on CPU: the causal sampler and MAR with the DDPM head give identical bits,
MAR with the flow head differs by <= 1e-6 in [-1, 1]; the tests allow 1e-5 (the heads alone,
whose stand-in outputs are not bounded, also a relative 1e-6).
"""
import collections
import os
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.config import schema as configs
from arjax.commands import sample as generate
from arjax.training import loop as train
from arjax.training.experiment import Experiment
from arjax.heads import FlowMatching, MarDiffusion, noise
from conftest import REPO_ROOT, SMOKE_RUN_STEPS

# Float images are in [-1, 1]: 1e-5 is ~1/400 of a uint8 level.
BATCH_SPLIT_ATOL = 1e-5


def tensorboard_scalars(logdir: str) -> dict:
  """{tag: [(step, value), ...]} of every event file in `logdir`.

  Event files are TFRecords: per record a little-endian u64 length, a u32 CRC, the Event
  proto, a u32 CRC (the CRCs are not checked here: a torn file fails to parse anyway).
  """
  from tensorboardX.proto import event_pb2

  scalars = collections.defaultdict(list)
  for name in sorted(os.listdir(logdir)):
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    position = 0
    while position < len(data):
      (length,) = struct.unpack("<Q", data[position:position + 8])
      event = event_pb2.Event.FromString(data[position + 12:position + 12 + length])
      position += 12 + length + 4
      for value in event.summary.value:
        scalars[value.tag].append((event.step, value.simple_value))
  return dict(scalars)


def test_two_fresh_runs_log_the_same_curves_and_end_in_the_same_state(smoke_run, tmp_path):
  config, first_workdir, first = smoke_run
  second = train.train_and_evaluate(config, str(tmp_path / "second"), stop_after=SMOKE_RUN_STEPS)
  curves = [tensorboard_scalars(os.path.join(w, "tensorboard"))
            for w in (first_workdir, str(tmp_path / "second"))]
  # Throughput is a wall-clock measurement, the one logged value that may differ.
  for logged in curves:
    del logged["train/images_per_second"]
  assert curves[0] == curves[1]
  losses = [v for _, v in curves[0]["train/loss"]]
  assert [s for s, _ in curves[0]["train/loss"]] == list(range(1, SMOKE_RUN_STEPS + 1))
  assert len(set(losses)) == len(losses)  # a real curve, one loss per step
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_same_seed_same_images_and_batch_split_does_not_matter(smoke_run):
  config, _, state = smoke_run
  config = config.copy_and_resolve_references()
  config.sample.num_images = 20
  labels = generate.parse_labels("", 20, config.data.num_classes)
  images = {}
  for batch_size in (20, 8):  # 8: batches of 8, 8 and 4 padded to 8
    config.sample.batch_size = batch_size
    images[batch_size] = generate.sample_images(Experiment(config), state.ema_params, labels,
                                                progress=False)
  again = generate.sample_images(Experiment(config), state.ema_params, labels, progress=False)
  np.testing.assert_array_equal(again, images[8])  # fresh sampler, same seed: same bits
  assert images[20].shape == (20, 8, 8, 1)
  # uint8 pixels: a float difference below BATCH_SPLIT_ATOL can at most flip a rounding.
  assert np.abs(images[20].astype(int) - images[8]).max() <= 1
  assert np.mean(images[20] == images[8]) > 0.99
  # Images 0 and 1 share label 0 but not their noise: the comparisons above can fail.
  assert labels[0] == labels[1] and not np.array_equal(images[20][0], images[20][1])


def _random_params(exp):
  """Parameters of the model's shapes drawn at random on the host: nothing to compile (the
  MAR model's init compiles for ~20 s), and no zero-initialised layer leaves the backbone out."""
  shapes = jax.eval_shape(lambda rng: nn.meta.unbox(exp.model.init(
      rng, exp.example_tokens, exp.example_labels)["params"]), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(s.dtype), shapes)


def _sample_in_batches(sampler, params, labels, batch_size, **kwargs):
  out = []
  for start in range(0, len(labels), batch_size):
    chunk = labels[start:start + batch_size]
    images = sampler(params, np.resize(chunk, batch_size), jax.random.PRNGKey(0),
                     first_index=start, **kwargs)
    out.append(np.asarray(images)[:len(chunk)])
  return np.concatenate(out)


def test_mar_images_do_not_depend_on_the_batch_split():
  # Per-image generation orders and per-token draws (the DDPM head's: test below).
  config = configs.load(str(REPO_ROOT / "configs/digits_mar.py:smoke"))
  config.sample.kept_buckets = 1  # one scan to compile per batch size
  exp = Experiment(config)
  params, sampler = _random_params(exp), exp.sampler()
  labels = np.arange(20) % 10
  kwargs = dict(cfg_scale=3.0, cfg_schedule_name="linear")
  whole = _sample_in_batches(sampler, params, labels, 20, **kwargs)
  split = _sample_in_batches(sampler, params, labels, 8, **kwargs)
  np.testing.assert_allclose(split, whole, rtol=0, atol=BATCH_SPLIT_ATOL)
  # Images 0 and 10 share a label, not their noise; another seed gives other images.
  assert np.abs(whole[0] - whole[10]).max() > 0.1
  other = np.asarray(sampler(params, labels, jax.random.PRNGKey(1), **kwargs))
  assert np.abs(other - whole).max() > 0.1


@pytest.mark.parametrize("head", [FlowMatching(token_dim=4), MarDiffusion(token_dim=4)],
                         ids=["flow", "ddpm"])
def test_a_heads_rows_drawn_from_per_row_keys_are_those_rows_sampled_alone(head):
  """The head contract behind the samplers' independence (arjax/heads/noise.py)."""
  # A stand-in network, row-wise in x, t and z (DDPM: eps and the learned-range variance).
  def net_fn(x_t, t, z):
    # t is [N] in training and a scalar shared by the rows in sampling (the head contract).
    eps = 0.5 * x_t + 1e-3 * jnp.reshape(t, (-1, 1)) * z[:, :4]
    return eps if isinstance(head, FlowMatching) else jnp.concatenate([eps, jnp.tanh(z[:, 4:])], -1)

  sample = jax.jit(lambda z, keys: head.sample(net_fn, z, keys, temperature=0.9, steps=3))
  z = jax.random.normal(jax.random.PRNGKey(3), (5, 8))
  keys = jax.random.split(jax.random.PRNGKey(4), 5)
  together = sample(z, keys)
  for i in (0, 3):
    np.testing.assert_allclose(together[i], sample(z[i:i + 1], keys[i:i + 1])[0], rtol=1e-6,
                               atol=BATCH_SPLIT_ATOL)
  assert np.abs(together[0] - together[1]).max() > 0.1
  # One key still draws all rows at once, exactly as before per-row keys existed.
  assert noise.is_per_row(keys) and not noise.is_per_row(keys[0])
  np.testing.assert_array_equal(noise.normal(keys[0], 5, (3,)), jax.random.normal(keys[0], (5, 3)))
