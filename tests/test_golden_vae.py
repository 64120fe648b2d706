"""KL VAE port vs the official PyTorch MAR `models/vae.py` AutoencoderKL (golden files).

Every `vae_*.npz` in $ARJAX_GOLDEN_DIR (default <repo>/../shared/golden) is one test id; its
`param/*` state_dict goes through `arjax.tokenizers.kl_vae_weights` and every `out/*` array it holds must be
reproduced from `in/img` (README: "VAE (models/vae.py)"). Golden arrays are NCHW, the port is
NHWC, so goldens are compared after `transpose(0, 2, 3, 1)`.
"""
import json
import pickle

import jax
import numpy as np
import pytest

from arjax.tokenizers import kl_vae_weights as convert_vae
from arjax.tokenizers import kl_vae

from conftest import GOLDEN_DIR

# max|ours - golden| / max|golden| in float32. The README's f32 noise floor for vae_tiny is at
# most 1.4e-5 absolute on decode_mean (max 2.35), i.e. ~6e-6 relative, so 1e-4 is ample.
REL_TOL = 1e-4


def _golden_params():
  if not GOLDEN_DIR.is_dir():
    return [pytest.param(None, id="no-golden-dir", marks=pytest.mark.skip(
        reason=f"golden folder {GOLDEN_DIR} is absent (set ARJAX_GOLDEN_DIR)"))]
  files = sorted(GOLDEN_DIR.glob("vae_*.npz"))
  if not files:
    return [pytest.param(None, id="no-vae-golden", marks=pytest.mark.skip(
        reason=f"no vae_*.npz in {GOLDEN_DIR}"))]
  return [pytest.param(f, id=f.name) for f in files]


def _config_from_golden(cfg_json: dict) -> kl_vae.KLVAEConfig:
  """The harness built AutoencoderKL with Encoder/Decoder kwargs injected via functools.partial."""
  enc, dec, ae = cfg_json["Encoder_kwargs"], cfg_json["Decoder_kwargs"], cfg_json[
      "AutoencoderKL_kwargs"]
  return kl_vae.KLVAEConfig(
      ch=enc["ch"], ch_mult=tuple(enc["ch_mult"]), num_res_blocks=enc["num_res_blocks"],
      encoder_attn_resolutions=tuple(enc["attn_resolutions"]),
      decoder_attn_resolutions=tuple(dec["attn_resolutions"]), resolution=enc["resolution"],
      in_channels=enc["in_channels"], out_ch=dec["out_ch"], z_channels=enc["z_channels"],
      embed_dim=ae["embed_dim"], double_z=enc["double_z"],
      use_variational=ae.get("use_variational", True),
      resamp_with_conv=enc["resamp_with_conv"], give_pre_end=dec["give_pre_end"])


def _nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def _rel_err(ours, golden):
  return float(np.max(np.abs(np.asarray(ours) - golden)) / max(np.max(np.abs(golden)), 1e-30))


@pytest.mark.parametrize("path", _golden_params())
def test_golden_vae(path):
  data = np.load(path, allow_pickle=False)
  cfg = _config_from_golden(json.loads(str(data["config_json"])))
  params = convert_vae.load_vae_params(path, cfg, prefix="param/")
  module = kl_vae.AutoencoderKL(cfg)
  apply = lambda method: jax.jit(  # noqa: E731
      lambda x: module.apply({"params": params}, x, method=method))

  img = _nhwc(data["in/img"])
  encoder_h, moments = apply(kl_vae.AutoencoderKL.encode_moments)(img)
  mean, logvar, std = kl_vae.posterior_from_moments(moments, cfg.use_variational)
  golden_mean = _nhwc(data["out/posterior_mean"])
  ours = {
      "out/encoder_h": encoder_h,
      "out/moments": moments,
      "out/posterior_mean": mean,
      "out/posterior_logvar": logvar,
      "out/posterior_std": std,
      # Downstream stages start from the golden mean (README: decode(out/posterior_mean)), so
      # each comparison measures one stage, not the accumulated chain.
      "out/post_quant_conv": apply(lambda m, z: m.post_quant_conv(z))(golden_mean),
      "out/decode_mean": apply(kl_vae.AutoencoderKL.decode)(golden_mean),
  }
  outs = [k for k in data.files if k.startswith("out/")]
  unknown = sorted(set(outs) - set(ours))
  assert not unknown, f"{path.name} holds outputs this test does not check: {unknown}"
  errors = {k: _rel_err(ours[k], _nhwc(data[k])) for k in outs}
  for k in outs:
    assert ours[k].shape == _nhwc(data[k]).shape, (k, ours[k].shape)
  bad = {k: e for k, e in errors.items() if not e <= REL_TOL}
  assert not bad, f"{path.name}: relative error above {REL_TOL}: {bad} (all: {errors})"

  # Tokenizer on the golden: MAR tokens (patch 1) = mean NCHW -> NHWC -> (B, h*w, C) * 0.2325.
  tok = kl_vae.KLVAETokenizer(params, cfg, image_size=img.shape[1])
  tokens = np.asarray(jax.jit(tok.encode)(img))
  b = img.shape[0]
  expected = golden_mean.reshape(b, -1, cfg.embed_dim) * kl_vae.MAR_LATENT_SCALE
  assert tokens.shape == (b, tok.num_tokens, tok.token_dim)
  assert _rel_err(tokens, expected) <= REL_TOL


# A small config (f=2, attention in both encoder and decoder) for the non-golden tests.
_TINY = kl_vae.KLVAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, encoder_attn_resolutions=(8,),
                           decoder_attn_resolutions=(8,), resolution=16, z_channels=4,
                           embed_dim=4)


def _zeros_state_dict(cfg):
  return {name: np.zeros(shape, np.float32)
          for name, (_, shape, _) in convert_vae._expected(cfg).items()}


def test_state_dict_errors_name_every_bad_key():
  state_dict = _zeros_state_dict(_TINY)
  # The full state dict converts to exactly the module's parameter tree.
  params = convert_vae.vae_params_from_state_dict(state_dict, _TINY)
  init = kl_vae.param_shapes(_TINY)
  assert (jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(init))
  assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, init)

  del state_dict["decoder.up.1.upsample.conv.bias"]
  state_dict["encoder.down.0.block.0.extra.weight"] = np.zeros((3,), np.float32)
  state_dict["encoder.mid.attn_1.q.weight"] = np.zeros((64, 64, 3, 3), np.float32)
  with pytest.raises(ValueError) as err:
    convert_vae.vae_params_from_state_dict(state_dict, _TINY)
  message = str(err.value)
  assert "missing: decoder.up.1.upsample.conv.bias" in message
  assert "unexpected: encoder.down.0.block.0.extra.weight" in message
  assert "mis-shaped: encoder.mid.attn_1.q.weight" in message
  # Deliberately ignored prefixes are the only way to drop keys.
  state_dict = _zeros_state_dict(_TINY)
  state_dict["loss.logvar"] = np.zeros((), np.float32)
  with pytest.raises(ValueError, match="unexpected: loss.logvar"):
    convert_vae.vae_params_from_state_dict(state_dict, _TINY)
  convert_vae.vae_params_from_state_dict(state_dict, _TINY, ignore_prefixes=("loss.",))


def test_loader_refuses_pickles(tmp_path):
  # A pickle that would call a function: refused without torch, and by weights_only with it.
  (tmp_path / "kl16.ckpt").write_bytes(pickle.dumps(print, protocol=2))
  with pytest.raises(ValueError, match="refused"):
    convert_vae.load_state_dict(tmp_path / "kl16.ckpt")


def _mar_patchify(latent_nchw, p):
  """mar.py MAR.patchify, verbatim in numpy."""
  b, c, h, w = latent_nchw.shape
  x = latent_nchw.reshape(b, c, h // p, p, w // p, p)
  x = np.einsum("nchpwq->nhwcpq", x)
  return x.reshape(b, (h // p) * (w // p), c * p * p)


@pytest.mark.parametrize("patch_size", [1, 2])
def test_tokenizer_shapes_and_latent_scale_round_trip(patch_size):
  params = kl_vae.init_params(_TINY, jax.random.PRNGKey(0), image_size=16)
  tok = kl_vae.KLVAETokenizer(params, _TINY, image_size=16, patch_size=patch_size,
                              latent_scale=0.5)
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3), minval=-1, maxval=1)
  grid = 8 // patch_size
  assert tok.value_range is None
  assert (tok.num_tokens, tok.token_dim) == (grid * grid, 4 * patch_size ** 2)

  tokens = tok.encode(images)
  assert tokens.shape == (2, tok.num_tokens, tok.token_dim)
  latents = np.asarray(tok.latents(images))
  np.testing.assert_allclose(  # MAR's token order, from the NCHW latent.
      tokens, _mar_patchify(latents.transpose(0, 3, 1, 2) * 0.5, patch_size), rtol=1e-6)
  np.testing.assert_allclose(tok.unpatchify(tokens) / 0.5, latents, rtol=1e-6)

  decoded = tok.decode(tokens)
  assert decoded.shape == images.shape
  direct = tok.module.apply({"params": params}, latents, method=kl_vae.AutoencoderKL.decode)
  np.testing.assert_allclose(decoded, direct, rtol=1e-5, atol=1e-5)

  # A posterior sample is mean + std * N(0, 1), scaled the same way.
  sample = tok.encode(images, rng=jax.random.PRNGKey(2))
  _, _, std = tok.module.apply({"params": params}, images, method=kl_vae.AutoencoderKL.encode)
  noise = jax.random.normal(jax.random.PRNGKey(2), latents.shape)
  np.testing.assert_allclose(
      sample, tok.patchify((latents + np.asarray(std) * np.asarray(noise)) * 0.5),
      rtol=1e-5, atol=1e-6)
