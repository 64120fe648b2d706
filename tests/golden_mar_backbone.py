"""Golden checks of MAR's encoder/decoder backbone (run by `tests/test_golden_mar.py`).

On whichever of these keys a golden file holds (see the golden README):
  * `out/patchify_p` from `in/patchify_p_nchw`; `in/x` == patchify(`in/latent_nchw`);
  * `out/class_embedding`, `out/enc_*`, `out/encoder`, `out/dec_*`, `out/decoder_z` from
    `in/x`, `in/mask`, `in/labels` (MarBackbone's public entry, intermediates via `sow`);
  * the CFG batch `out/cfg_class_embedding`, `out/cfg_encoder`, `out/cfg_decoder_z`
    (`[x; x]`, `[mask; mask]`, `[class_emb(labels); fake_latent]`). mar_tiny_cfg.npz does
    not repeat mar_tiny's `in/x, in/labels, in/mask` (README: it "uses mar_tiny's"), so
    they are taken from the sibling file without the `_cfg` suffix when its weights are
    identical; without such a sibling these keys stay unchecked, which fails the file;
  * the decoder z rows handed to `DiffLoss.sample` at every replayed `sample_tokens`
    iteration (`out/sample_*/iter*/z`): tokens start at 0 with everything masked; after
    each iteration the recorded `diffloss_sample` rows are written into the tokens and
    `mask_next` becomes the mask, exactly as sample_tokens does, so no head runs here.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from arjax.families.masked import backbone as mar

# Golden keys `out/<name>` compared with the backbone's sown intermediate `<name>`.
_BACKBONE_OUTPUTS = ("out/enc_", "out/dec_", "out/encoder", "out/decoder_z")


@functools.partial(jax.jit, static_argnames=("backbone", "num_kept"))
def _condition(params, x, mask, labels, drop, *, backbone, num_kept):
  """The public entry (what `MaskedARModel.condition` calls), with the sown intermediates."""
  z, state = backbone.apply({"params": params}, x, mask, labels, num_kept, drop,
                            mutable=["intermediates"])
  return z, {name: value[0] for name, value in state["intermediates"].items()}


@functools.partial(jax.jit, static_argnames="backbone")
def _class_embedding(params, labels, drop, *, backbone):
  return backbone.apply({"params": params}, labels, drop, method=backbone.class_embedding)


def _params_of(arrays):
  return {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}


def _batch_inputs(check):
  """`in/x, in/mask, in/labels` of this file, or of its `_cfg`-less sibling with equal weights."""
  keys = ("in/x", "in/mask", "in/labels")
  if all(k in check for k in keys):
    return tuple(check[k] for k in keys)
  path = check.path
  if not path.stem.endswith("_cfg"):
    return None
  sibling = path.with_name(path.stem[: -len("_cfg")] + ".npz")
  if not sibling.is_file():
    return None
  with np.load(sibling, allow_pickle=False) as npz:
    theirs = {k: npz[k] for k in npz.files}
  mine, their_params = _params_of(check.arrays), _params_of(theirs)
  if set(mine) != set(their_params) or any(
      not np.array_equal(mine[k], their_params[k]) for k in mine):
    return None
  return tuple(theirs[k] for k in keys) if all(k in theirs for k in keys) else None


def _num_kept(mask):
  counts = (~np.asarray(mask, bool)).sum(axis=1)
  assert (counts == counts[0]).all(), f"MAR needs equal kept counts per row, got {counts}"
  return int(counts[0])


def _doubled(a):
  return np.concatenate([a, a])


def check_backbone(check, imported):
  backbone, params = imported.backbone, imported.params["backbone"]
  kw = check.config["MAR_kwargs"]
  condition = functools.partial(_condition, params, backbone=backbone)
  class_embedding = functools.partial(_class_embedding, params, backbone=backbone)

  # patchify (MAR.patchify) is pure layout: exact.
  if "out/patchify_p" in check:
    nchw, golden = check["in/patchify_p_nchw"], check["out/patchify_p"]
    p = int(round((golden.shape[2] / nchw.shape[1]) ** 0.5))
    check.compare("out/patchify_p", mar.patchify(jnp.asarray(nchw), p), exact=True)
  if "in/latent_nchw" in check and "in/x" in check:
    check.compare("in/x", mar.patchify(jnp.asarray(check["in/latent_nchw"]), kw["patch_size"]),
                  exact=True, label="in/x == patchify(in/latent_nchw)")

  inputs = _batch_inputs(check)
  if inputs is not None:
    x, mask, labels = inputs
    num_kept = _num_kept(mask)
    if "out/class_embedding" in check:  # a row gather: exact
      check.compare("out/class_embedding", class_embedding(labels, None), exact=True)
    if any(k.startswith(_BACKBONE_OUTPUTS) for k in check.keys("out/")):
      z, inter = condition(x, mask, labels, None, num_kept=num_kept)
      found = dict(inter, decoder_z=z)  # the returned z, not only its sown copy
      for prefix in _BACKBONE_OUTPUTS:
        check.compare_found(prefix, found, strip="out/")
    if any(k in check for k in ("out/cfg_class_embedding", "out/cfg_encoder", "out/cfg_decoder_z")):
      batch = x.shape[0]
      drop = np.arange(2 * batch) >= batch
      if "out/cfg_class_embedding" in check:
        check.compare("out/cfg_class_embedding", class_embedding(_doubled(labels), drop),
                      exact=True)
      z, inter = condition(_doubled(x), _doubled(mask), _doubled(labels), drop, num_kept=num_kept)
      for key, value in (("out/cfg_encoder", inter["encoder"]), ("out/cfg_decoder_z", z)):
        if key in check:
          check.compare(key, value)

  # Replayed sample_tokens: the decoder z rows of every iteration, teacher-forced with the
  # recorded samples. The encoder is padded to all L positions (as the one-bucket sampler
  # does), so every iteration of a run is one compiled program.
  seq_len, token_dim = backbone.seq_len, backbone.token_dim
  for run in sorted({k.split("/")[1] for k in check.keys("in/sample_")}):
    labels = check[f"in/{run}/labels"]
    cfg = float(check[f"in/{run}/settings"][1])
    batch = labels.shape[0]
    tokens = np.zeros((batch, seq_len, token_dim), np.float32)
    mask = np.ones((batch, seq_len), bool)
    iters = sorted({k.split("/")[2] for k in check.keys(f"out/{run}/iter")},
                   key=lambda it: int(it[len("iter"):]))
    for it in iters:
      prefix = f"out/{run}/{it}"
      if f"{prefix}/z" not in check:
        continue
      mask_to_pred = check[f"{prefix}/mask_to_pred"]
      if cfg != 1.0:  # sample_tokens: `if not cfg == 1.0` doubles the batch.
        z, _ = condition(_doubled(tokens), _doubled(mask), _doubled(labels),
                         np.arange(2 * batch) >= batch, num_kept=seq_len)
        rows = _doubled(mask_to_pred)
      else:
        z, _ = condition(tokens, mask, labels, None, num_kept=seq_len)
        rows = mask_to_pred
      check.compare(f"{prefix}/z", np.asarray(z)[rows])
      tokens = tokens.copy()
      tokens[mask_to_pred] = check[f"{prefix}/diffloss_sample"][: int(mask_to_pred.sum())]
      mask = check[f"{prefix}/mask_next"]
