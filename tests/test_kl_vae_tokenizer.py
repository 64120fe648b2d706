"""The KL VAE behind the tokenizer interface: chosen by config, weights from a file or an Orbax
directory, every mistake refused naming the field (and the path), posterior sampling in training."""
import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from arjax import registry
from arjax.config import schema as configs
from arjax.training import step as train_step
from arjax.tokenizers import kl_vae
from conftest import REPO_ROOT
from vae_testing import tiny_params, vae_config, write_npz

GOLDEN_TINY = REPO_ROOT.parent / "shared" / "golden" / "vae_tiny.npz"


def _images(n=2, size=32):
  return jax.random.uniform(jax.random.PRNGKey(1), (n, size, size, 3), minval=-1, maxval=1)


def test_kl16_is_mars_vae_and_kl16_tiny_is_the_golden_tiny_vae():
  assert kl_vae.ARCHITECTURES["kl16"] == kl_vae.KLVAEConfig()
  if not GOLDEN_TINY.exists():
    pytest.skip(f"{GOLDEN_TINY} is absent")
  with np.load(GOLDEN_TINY) as data:
    golden = json.loads(str(data["config_json"]))
  enc, ae = golden["Encoder_kwargs"], golden["AutoencoderKL_kwargs"]
  tiny = kl_vae.ARCHITECTURES["kl16_tiny"]
  assert (tiny.ch, tuple(tiny.ch_mult), tiny.num_res_blocks, tiny.resolution) == (
      enc["ch"], tuple(enc["ch_mult"]), enc["num_res_blocks"], enc["resolution"])
  assert tuple(tiny.encoder_attn_resolutions) == tuple(enc["attn_resolutions"])
  assert tuple(tiny.decoder_attn_resolutions) == tuple(golden["Decoder_kwargs"]["attn_resolutions"])
  assert (tiny.embed_dim, tiny.z_channels) == (ae["embed_dim"], enc["z_channels"])


def test_config_builds_the_tokenizer_from_a_state_dict_npz(tmp_path):
  params = tiny_params()
  config = vae_config(write_npz(tmp_path / "tiny.npz", params))
  registry.validate(config)
  tok = registry.make_tokenizer(config.tokenizer, config.data)
  assert isinstance(tok, kl_vae.KLVAETokenizer)
  assert (tok.num_tokens, tok.token_dim, tok.latent_scale, tok.sample_posterior) == (
      4, 16, 0.2325, True)
  for ours, theirs in zip(jax.tree.leaves(tok.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(ours, theirs)


def test_a_release_file_nesting_the_state_dict_under_model_loads_as_is(tmp_path):
  """kl16.ckpt's layout, {'model': state_dict} with the LDM loss's weights beside the VAE's
  (as .npz: `model/<name>` keys), loads without converting first; `loss.*` is left out."""
  from arjax.tokenizers.kl_vae_weights import state_dict_from_vae_params
  params = tiny_params()
  nested = {f"model/{k}": v for k, v in state_dict_from_vae_params(params).items()}
  nested["model/loss.discriminator.main.0.weight"] = np.zeros((4, 3, 4, 4), np.float32)
  np.savez(tmp_path / "kl16_tiny_release.npz", **nested)
  config = vae_config(str(tmp_path / "kl16_tiny_release.npz"))
  tok = registry.make_tokenizer(config.tokenizer, config.data)
  for ours, theirs in zip(jax.tree.leaves(tok.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(ours, theirs)


def test_an_orbax_params_directory_loads_the_same_weights(tmp_path):
  """What `python -m arjax convert` writes for a VAE: StandardSave of the Flax params tree."""
  params = tiny_params()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(str(tmp_path / "kl16_tiny"), params)
    checkpointer.wait_until_finished()
  config = vae_config(str(tmp_path / "kl16_tiny"))
  tok = registry.make_tokenizer(config.tokenizer, config.data)
  for ours, theirs in zip(jax.tree.leaves(tok.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(ours, theirs)


def test_weight_errors_name_the_field_and_the_path(tmp_path):
  config = vae_config(None)
  registry.validate(config)  # a config may ship without weights ...
  with pytest.raises(configs.ConfigError, match="config.tokenizer.checkpoint is None"):
    registry.make_tokenizer(config.tokenizer, config.data)  # ... but nothing builds without

  missing = str(tmp_path / "nowhere.npz")
  with pytest.raises(FileNotFoundError, match="config.tokenizer.checkpoint=.*nowhere.npz"):
    registry.make_tokenizer(vae_config(missing).tokenizer, config.data)

  # Weights of another architecture: every mismatch is listed under the path.
  tiny = write_npz(tmp_path / "tiny.npz", tiny_params())
  with pytest.raises(configs.ConfigError) as e:
    registry.make_tokenizer(vae_config(tiny, architecture="kl16").tokenizer, config.data)
  message = str(e.value)
  assert "config.tokenizer.checkpoint=" in message and "tiny.npz" in message
  assert "config.tokenizer.architecture='kl16'" in message
  assert "mis-shaped: encoder.conv_in.weight" in message

  os.makedirs(tmp_path / "empty_dir")
  with pytest.raises((configs.ConfigError, FileNotFoundError), match="empty_dir"):
    registry.make_tokenizer(vae_config(str(tmp_path / "empty_dir")).tokenizer, config.data)


@pytest.mark.parametrize("change, message", [
    (dict(data=dict(image_size=24)),
     "config.data.image_size=24 must be a multiple of 16: the VAE stride 16 "
     "(config.tokenizer.architecture='kl16_tiny') times config.tokenizer.patch_size=1"),
    (dict(tokenizer=dict(patch_size=3)), "config.data.image_size=32 must be a multiple of 48"),
    (dict(data=dict(channels=1)), "config.data.channels=1: the VAE"),
    (dict(tokenizer=dict(architecture="kl8")),
     "config.tokenizer.architecture='kl8': must be one of ['kl16', 'kl16_tiny']"),
    (dict(tokenizer=dict(sample_posterior=1)), "config.tokenizer.sample_posterior=1: expected bool"),
    (dict(tokenizer=dict(latent_scale=0.0)), "config.tokenizer.latent_scale=0.0: must be > 0"),
    (dict(tokenizer=dict(scale=1.0)), "config.tokenizer.scale: unknown key"),
    (dict(data=dict(latents=7)), "config.data.latents=7: expected str/NoneType"),
])
def test_bad_vae_config_is_refused_naming_the_field(change, message):
  config = vae_config("weights.npz")
  registry.validate(config)
  as_dict = config.to_dict()  # as a hand-written config file could hold it
  for section, fields in change.items():
    as_dict[section].update(fields)
  with pytest.raises(configs.ConfigError) as e:
    registry.validate(ml_collections.ConfigDict(as_dict))
  assert message in str(e.value)


def test_latent_cache_needs_a_vae_tokenizer():
  config = configs.load(str(REPO_ROOT / "configs/digits.py"))
  config.data.latents = "/data/latents"
  with pytest.raises(configs.ConfigError, match="config.data.latents='/data/latents'.*'kl_vae'"):
    registry.validate(config)


def test_training_tokens_are_a_posterior_sample_on_their_own_stream_when_asked():
  params = tiny_params()
  sampled = kl_vae.KLVAETokenizer(params, kl_vae.ARCHITECTURES["kl16_tiny"], image_size=32,
                                  sample_posterior=True)
  mean_only = kl_vae.KLVAETokenizer(params, kl_vae.ARCHITECTURES["kl16_tiny"], image_size=32)
  images, labels = _images(), np.zeros((2,), np.int32)
  rng = jax.random.PRNGKey(3)
  # Jitted: op by op, the VAE would compile for seconds.
  tokens = jax.jit(lambda x: train_step.training_tokens(
      sampled, {"image": x, "label": labels}, rng))(images)
  moments = jax.jit(sampled.moments)(images)

  # Not the loss's rng itself: the posterior noise must not reuse the model's noise draws.
  noise_rng = jax.random.fold_in(rng, train_step._TOKENIZER_STREAM)
  np.testing.assert_allclose(tokens, sampled.encode_moments(moments, noise_rng), rtol=1e-5)
  assert not np.allclose(tokens, sampled.encode_moments(moments, rng))
  assert not np.allclose(tokens, sampled.encode_moments(moments))
  # From cached moments: the same tokens; a mean-only tokenizer ignores the rng.
  cached = {"moments": moments, "label": labels}
  np.testing.assert_array_equal(train_step.training_tokens(sampled, cached, rng),
                                sampled.encode_moments(moments, noise_rng))
  np.testing.assert_array_equal(train_step.training_tokens(mean_only, cached, rng),
                                mean_only.encode_moments(moments))
