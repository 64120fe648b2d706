"""Latent caching: `cache_latents` writes each image's and its flip's VAE moments as ArrayRecord;
training reads them through the image pipeline's own stream and gets the image path's tokens.

Real files throughout: the prepared digits (resized to 32x32 RGB by the pipeline), a tiny KL
VAE's weights as a state-dict .npz, ArrayRecord shards read back by grain.
"""
import json
import os
import subprocess
import sys
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from arjax import registry
from arjax.config import schema as configs
from arjax.training import loop as train
from arjax.data import latents, pipeline
from conftest import REPO_ROOT
from vae_testing import tiny_params, vae_config, write_npz

SPLIT = "train[:40]"  # a slice keeps encoding cheap; records are the slice's, in file order
RECORD_BYTES = 2 * 2 * 2 * 32 * 4 + 8  # moments [2, 2, 2, 32] float32 + label int64


class Cached(NamedTuple):
  config: Any  # reads the cache: config.data.latents = out
  out: str
  meta: dict
  tok: Any  # the config's tokenizer
  moments: Callable  # jitted tok.moments: one compile shared by the tests


@pytest.fixture(scope="module")
def cached(tmp_path_factory, data_dir) -> Cached:
  """SPLIT cached in shards of at most 16 records."""
  root = tmp_path_factory.mktemp("latent_cache")
  config = vae_config(write_npz(root / "tiny_vae.npz", tiny_params()))
  config.data.data_dir = data_dir
  config.data.train_split = SPLIT
  config.data.random_flip = True
  out = str(root / "cache")
  meta = latents.cache_latents(config, out, batch_size=16, shard_bytes=16 * RECORD_BYTES)
  config.data.latents = out  # from here on, training reads the cache
  tok = registry.make_tokenizer(config.tokenizer, config.data)
  return Cached(config, out, meta, tok, jax.jit(tok.moments))


def test_cache_is_array_record_shards_plus_metadata_written_last(cached):
  out, meta = cached.out, cached.meta
  stem = "train%5B%3A40%5D"
  assert sorted(os.listdir(out)) == [f"{stem}.array_record-0000{i}-of-00003" for i in range(3)] + [
      f"{stem}.json"]
  with open(os.path.join(out, f"{stem}.json")) as f:
    assert json.load(f) == meta
  assert (meta["dataset"], meta["split"], meta["num_examples"]) == ("digits", SPLIT, 40)
  assert (meta["image_size"], meta["channels"], meta["architecture"]) == (32, 3, "kl16_tiny")
  assert meta["moments_shape"] == [2, 2, 32]  # 2x2 latents; mean and logvar of 16 channels


def test_records_are_the_moments_of_each_image_and_its_flip(cached):
  images, labels = pipeline.load_split(cached.config.data, SPLIT)  # same decoder: resize, RGB
  x = pipeline.normalize(images)
  x = np.concatenate([x, x[:, :, ::-1]])
  expected = np.concatenate([cached.moments(x[i:i + 16]) for i in range(0, 80, 16)])
  source = latents.LatentSource(cached.out, SPLIT)
  assert len(source) == 40
  for position in range(40):
    record = source[position]
    assert record["moments"].shape == (2, 2, 2, 32) and record["label"] == labels[position]
    np.testing.assert_allclose(record["moments"][0], expected[position], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(record["moments"][1], expected[40 + position], rtol=1e-5,
                               atol=1e-5)
  assert not np.allclose(expected[:40], expected[40:])  # a flip is another image to the VAE


def test_latent_batches_give_the_tokens_of_the_image_batches(cached):
  """Same seed, same stream: each element is the same record with the same flip, so the
  moments' mean tokens are the images' tokens; over 3 batches of 16 the 40 records wrap into a
  second epoch."""
  config, tok = cached.config, cached.tok
  kwargs = dict(global_batch_size=16, seed=config.data.shuffle_seed)
  draws = [pipeline.element_stream(40, config.data, **kwargs)[k] for k in range(48)]
  assert 0 < sum(flip for _, flip, _ in draws) < 48

  from_images = pipeline.make_train_iterator(config.data, **kwargs)
  from_latents = latents.make_train_iterator(config, tok, **kwargs)
  for _ in range(3):
    a, b = next(from_images), next(from_latents)
    assert set(b) == {"moments", "label"} and b["moments"].dtype == np.float32
    np.testing.assert_array_equal(a["label"], b["label"])
    # tok.encode(images) is encode_moments(moments(images)); the moments call is the jitted one.
    np.testing.assert_allclose(tok.encode_moments(b["moments"]),
                               tok.encode_moments(cached.moments(a["image"])),
                               rtol=1e-5, atol=1e-5)


def test_latent_iterator_resumes_exactly(cached):
  config, tok = cached.config, cached.tok
  kwargs = dict(global_batch_size=16, seed=3)
  original = latents.make_train_iterator(config, tok, **kwargs)
  next(original)
  state = original.get_state()
  expected = [next(original) for _ in range(2)]
  resumed = latents.make_train_iterator(config, tok, **kwargs)
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(2)]):
    np.testing.assert_array_equal(a["moments"], b["moments"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_training_runs_from_the_cache_and_checkpoints_its_iterator(cached, tmp_path):
  config, tok = cached.config.copy_and_resolve_references(), cached.tok
  config.train.num_steps = 2
  workdir = str(tmp_path / "run")
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 2
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.params))

  # The checkpoint's data_iter item puts a fresh latent iterator at batch 2.
  kwargs = dict(global_batch_size=config.train.global_batch_size, seed=config.data.shuffle_seed)
  fresh = latents.make_train_iterator(config, tok, **kwargs)
  third = [next(fresh) for _ in range(3)][2]
  restored = latents.make_train_iterator(config, tok, **kwargs)
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                             item_names=("state", "data_iter")) as manager:
    position = manager.restore(2, args=ocp.args.Composite(
        data_iter=pipeline.iterator_restore_args()))["data_iter"]
  pipeline.set_iterator_position(restored, position)
  np.testing.assert_array_equal(next(restored)["moments"], third["moments"])


def test_a_cache_that_disagrees_with_the_config_is_refused_naming_the_field(cached, tmp_path):
  def refusal(mutate, error=configs.ConfigError, tok=cached.tok):
    changed = cached.config.copy_and_resolve_references()
    mutate(changed)
    with pytest.raises(error) as e:
      latents.make_train_iterator(changed, tok or registry.make_tokenizer(
          changed.tokenizer, changed.data), global_batch_size=16, seed=0)
    return str(e.value)

  assert "config.data.image_size=48, but the latent cache" in refusal(
      lambda c: c.data.__setattr__("image_size", 48))
  assert "config.data.num_classes=9" in refusal(lambda c: c.data.__setattr__("num_classes", 9))
  other = write_npz(tmp_path / "other.npz", tiny_params(seed=1))
  message = refusal(lambda c: c.tokenizer.__setattr__("checkpoint", other), tok=None)
  assert "config.tokenizer.checkpoint=" in message and "not the VAE weights" in message
  message = refusal(lambda c: c.data.__setattr__("train_split", "test"), FileNotFoundError)
  assert "no latent cache of split 'test'" in message and "cache_latents" in message


def test_a_complete_cache_is_never_overwritten(cached):
  with pytest.raises(FileExistsError, match="delete it to encode again"):
    latents.cache_latents(cached.config, cached.out, batch_size=16)


def test_command_line_caches_a_split_next_to_the_others(cached, tmp_path, data_dir):
  config, out = cached.config, cached.out
  config_file = tmp_path / "vae_digits.py"
  config_file.write_text(
      "import sys\n"
      f"sys.path.insert(0, {str(REPO_ROOT / 'tests')!r})\n"
      "from vae_testing import vae_config\n\n"
      "def get_config():\n"
      f"  return vae_config({config.tokenizer.checkpoint!r})\n")
  env = dict(os.environ, ARJAX_DATA_DIR=data_dir)
  run = lambda *args: subprocess.run(  # noqa: E731
      [sys.executable, "-m", "arjax", "cache_latents", f"--config={config_file}", *args],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  result = run(f"--out={out}", "--split=test[:8]", "--batch=8")
  assert result.returncode == 0, result.stderr
  assert f"train on them: --config.data.latents={out}" in result.stdout
  assert len(latents.LatentSource(out, "test[:8]")) == 8
  assert len(latents.LatentSource(out, SPLIT)) == 40  # untouched
