"""MAR's encoder/decoder backbone against the official PyTorch outputs (golden `mar_*.npz`).

Every `mar_*.npz` in $ARJAX_GOLDEN_DIR (default `<repo>/../shared/golden`) is one test id;
each file is checked on whichever of these keys it holds (see the golden README):
  * `out/patchify_p` from `in/patchify_p_nchw`; `in/x` == patchify(`in/latent_nchw`);
  * `out/class_embedding`, `out/enc_*`, `out/encoder`, `out/dec_*`, `out/decoder_z` from
    `in/x`, `in/mask`, `in/labels` (converter + `MarBackbone`, intermediates via `sow`);
  * the CFG batch `out/cfg_class_embedding`, `out/cfg_encoder`, `out/cfg_decoder_z`
    (`[x; x]`, `[mask; mask]`, `[class_emb(labels); fake_latent]`). mar_tiny_cfg.npz does
    not repeat mar_tiny's `in/x, in/labels, in/mask` (README: it "uses mar_tiny's"), so
    they are taken from the sibling file without the `_cfg` suffix when its weights are
    identical;
  * the decoder z rows handed to `DiffLoss.sample` at every replayed `sample_tokens`
    iteration (`out/sample_*/iter*/z`): tokens start at 0 with everything masked; after
    each iteration the recorded `diffloss_sample` rows are written into the tokens and
    `mask_next` becomes the mask, exactly as sample_tokens does, so no head is run here.

Tolerance: float32 arrays within RTOL = 1e-4 of max|golden| (per array), integers exactly.
"""
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.convert.mar_backbone import backbone_from_config, backbone_params_from_state_dict
from arjax.models import mar

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = pathlib.Path(os.environ.get("ARJAX_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))
GOLDEN_FILES = sorted(GOLDEN_DIR.glob("mar_*.npz")) if GOLDEN_DIR.is_dir() else []

RTOL = 1e-4
_BACKBONE_OUTPUTS = ("out/enc_", "out/dec_", "out/encoder", "out/decoder_z")


class _Checker:
  """Collects every mismatch of one file, so one run reports them all."""

  def __init__(self):
    self.failures, self.checked, self.errors = [], [], {}

  def rel(self, name, actual, golden, rtol=RTOL):
    actual, golden = np.asarray(actual, np.float64), np.asarray(golden, np.float64)
    self.checked.append(name)
    if actual.shape != golden.shape:
      self.failures.append(f"{name}: shape {actual.shape} != golden {golden.shape}")
      return
    err = np.abs(actual - golden).max() / max(np.abs(golden).max(), 1e-30)
    self.errors[name] = err
    if not err <= rtol:
      self.failures.append(f"{name}: max|diff|/max|golden| = {err:.3g} > {rtol:g}")


def _params_of(d):
  return {k[len("param/"):]: d[k] for k in d.files if k.startswith("param/")}


def _batch_inputs(path, d):
  """`in/x, in/mask, in/labels` of this file, or of its `_cfg`-less sibling with equal weights."""
  keys = ("in/x", "in/mask", "in/labels")
  if all(k in d.files for k in keys):
    return tuple(d[k] for k in keys)
  if not path.stem.endswith("_cfg"):
    return None
  sibling = path.with_name(path.stem[: -len("_cfg")] + ".npz")
  if not sibling.is_file():
    return None
  s = np.load(sibling, allow_pickle=False)
  mine, theirs = _params_of(d), _params_of(s)
  if set(mine) != set(theirs) or any(not np.array_equal(mine[k], theirs[k]) for k in mine):
    return None
  return tuple(s[k] for k in keys) if all(k in s.files for k in keys) else None


def _check_golden_file(path: pathlib.Path):
  d = np.load(path, allow_pickle=False)
  config = json.loads(str(d["config_json"]))
  kw = config["MAR_kwargs"]
  check = _Checker()

  # patchify (MAR.patchify) is pure layout: exact.
  if "out/patchify_p" in d.files:
    nchw, golden = d["in/patchify_p_nchw"], d["out/patchify_p"]
    p = int(round((golden.shape[2] / nchw.shape[1]) ** 0.5))
    check.rel("out/patchify_p", mar.patchify(jnp.asarray(nchw), p), golden, rtol=0)
  if "in/latent_nchw" in d.files and "in/x" in d.files:
    check.rel("in/x == patchify(in/latent_nchw)",
              mar.patchify(jnp.asarray(d["in/latent_nchw"]), kw["patch_size"]), d["in/x"], rtol=0)

  model = backbone_from_config(config)
  params = backbone_params_from_state_dict(_params_of(d), config)

  def run(x, mask, class_embedding, num_kept):
    def fwd(m, x, mask, ce):
      return m.decode(m.encode(x, mask, ce, num_kept), mask)
    z, state = model.apply({"params": params}, x, mask, class_embedding, method=fwd,
                           mutable=["intermediates"])
    return z, {k: v[0] for k, v in state["intermediates"].items()}
  run = jax.jit(run, static_argnums=3)
  class_emb = jax.jit(lambda labels, drop: model.apply(
      {"params": params}, labels, drop, method=model.class_embedding))

  def num_kept_of(mask):
    counts = (~np.asarray(mask, bool)).sum(axis=1)
    assert (counts == counts[0]).all(), f"MAR needs equal kept counts per row, got {counts}"
    return int(counts[0])

  inputs = _batch_inputs(path, d)
  if inputs is not None:
    x, mask, labels = inputs
    num_kept = num_kept_of(mask)
    ce = class_emb(jnp.asarray(labels), None)
    if "out/class_embedding" in d.files:
      check.rel("out/class_embedding", ce, d["out/class_embedding"], rtol=0)
    if any(k.startswith(_BACKBONE_OUTPUTS) for k in d.files):
      z, inter = run(jnp.asarray(x), jnp.asarray(mask), ce, num_kept)
      # The public entry point must agree with the method-by-method run.
      z_call = jax.jit(model.apply, static_argnums=4)(
          {"params": params}, jnp.asarray(x), jnp.asarray(mask), jnp.asarray(labels), num_kept)
      check.rel("__call__ == decode(encode(...))", z_call, z, rtol=1e-6)
      for key in sorted(k for k in d.files if k.startswith(_BACKBONE_OUTPUTS)):
        name = key[len("out/"):]
        if name not in inter:
          check.failures.append(f"{key}: no arjax counterpart known to this test")
          continue
        check.rel(key, inter[name], d[key])
    if "out/cfg_decoder_z" in d.files or "out/cfg_encoder" in d.files:
      batch = x.shape[0]
      cfg_ce = class_emb(jnp.asarray(np.concatenate([labels, labels])),
                         jnp.asarray(np.arange(2 * batch) >= batch))
      if "out/cfg_class_embedding" in d.files:
        check.rel("out/cfg_class_embedding", cfg_ce, d["out/cfg_class_embedding"], rtol=0)
      z, inter = run(jnp.asarray(np.concatenate([x, x])), jnp.asarray(np.concatenate([mask, mask])),
                     cfg_ce, num_kept)
      for key, name in (("out/cfg_encoder", "encoder"), ("out/cfg_decoder_z", "decoder_z")):
        if key in d.files:
          check.rel(key, inter[name], d[key])

  # Replayed sample_tokens: the decoder z rows of every iteration.
  for run_name in sorted({k.split("/")[1] for k in d.files if k.startswith("in/sample_")}):
    labels = d[f"in/{run_name}/labels"]
    _, cfg, _ = (float(v) for v in d[f"in/{run_name}/settings"])
    iters = sorted({k.split("/")[2] for k in d.files
                    if k.startswith(f"out/{run_name}/iter") and k.endswith("/z")},
                   key=lambda s: int(s[len("iter"):]))
    batch = labels.shape[0]
    tokens = np.zeros((batch, model.seq_len, model.token_dim), np.float32)
    mask = np.ones((batch, model.seq_len), bool)
    for it in iters:
      prefix = f"out/{run_name}/{it}"
      mask_to_pred = d[f"{prefix}/mask_to_pred"]
      if cfg != 1.0:  # sample_tokens: `if not cfg == 1.0` doubles the batch.
        ce = class_emb(jnp.asarray(np.concatenate([labels, labels])),
                       jnp.asarray(np.arange(2 * batch) >= batch))
        x_in, mask_in = np.concatenate([tokens, tokens]), np.concatenate([mask, mask])
        pred_in = np.concatenate([mask_to_pred, mask_to_pred])
      else:
        ce = class_emb(jnp.asarray(labels), None)
        x_in, mask_in, pred_in = tokens, mask, mask_to_pred
      z, _ = run(jnp.asarray(x_in), jnp.asarray(mask_in), ce, num_kept_of(mask))
      check.rel(f"{prefix}/z", np.asarray(z)[pred_in], d[f"{prefix}/z"])
      sampled = d[f"{prefix}/diffloss_sample"]
      tokens = tokens.copy()
      tokens[mask_to_pred] = sampled[: int(mask_to_pred.sum())]
      mask = d[f"{prefix}/mask_next"]
  return check


# One test id per file (its name in the id); a clean skip when the folder has none.
_CASES = [pytest.param(p, id=p.name) for p in GOLDEN_FILES] or [pytest.param(
    None, id="no-golden-files",
    marks=pytest.mark.skip(reason=f"no mar_*.npz in {GOLDEN_DIR} (set ARJAX_GOLDEN_DIR)"))]


@pytest.mark.parametrize("path", _CASES)
def test_golden_mar_backbone(path):
  check = _check_golden_file(path)
  if not check.checked:
    pytest.skip(f"{path.name} holds none of the backbone keys")
  worst = max(check.errors.items(), key=lambda kv: kv[1], default=None)
  print(f"{path.name}: {len(check.checked)} checks, worst {worst}")
  assert not check.failures, (f"{path.name}: {len(check.failures)} of {len(check.checked)} "
                              "checks failed:\n" + "\n".join(check.failures))


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
  state_dict = _params_of(d)
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
  from arjax import configs
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
