"""Golden: the xAR family against the official PyTorch xAR (every `xar_*.npz` of the folder).

Every `xar_*.npz` in $ARJAX_GOLDEN_DIR (default `<repo>/../shared/golden`) is one test id, named
after the file. Its `param/*` go through the importer `python -m arjax convert` uses
(`arjax.families.xar.weights`), and every `out/*` array it holds must be reproduced from its
`in/*` arrays by arjax's own code:
  * const: the token order of the entity layout, the block-causal mask of the attention
    layer, the RoPE rotation the attention applies (read back from the layer itself);
  * emb: class and time embeddings, the integer timesteps, the sampler's time grids;
  * train: one Noisy Context Learning loss from the stored draws, with its intermediates;
  * si: KV-cached entity calls (cache-filling and cache-reading) and the final cache;
  * sample_*: the whole Euler-Maruyama sampling runs replayed from the stored draws, entity for
    entity (every velocity call, every state, the tokens), with and without CFG.
Tolerances: the `suggested rtol` column of README_xar.md beside the files (relative to each
array's max |golden|), for keys it lists; otherwise integers and bools exactly, float64 within
1e-6, float32 within 1e-4 relative. An `out/*` key no check knows fails the file by name.
"""
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.families.xar import weights
from arjax.families.xar.backbone import TimeEmbedding, XAR_ROPE, time_steps
from arjax.families.xar.model import (XarModel, drop_labels, logit_normal_times, to_sequence,
                                      velocity_loss)
from arjax.families.xar.sampler import entity_scales, sample_tokens, time_grid
from arjax.layers import adaln, attention
from conftest import golden_cases

DEFAULT_RTOL, ATOL_FLOAT64 = 1e-4, 1e-6
_README_ROW = re.compile(r"^\| `(out/[^`]+)` \|[^|]*\|[^|]*\|[^|]*\| ([0-9.e+-]+) \|", re.M)


def readme_tolerances(folder) -> dict:
  """{out key: suggested rtol} from README_xar.md's key tables (empty if there is none)."""
  readme = pathlib.Path(folder) / "README_xar.md"
  if not readme.is_file():
    return {}
  return {key: float(tol) for key, tol in _README_ROW.findall(readme.read_text())}


class XarGolden:
  """One golden file: its arrays, every comparison made, and the failures (collected)."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    with np.load(self.path, allow_pickle=False) as npz:
      self.arrays = {key: npz[key] for key in npz.files}
    self.config = json.loads(str(self.arrays["config_json"]))
    self.tolerances = readme_tolerances(self.path.parent)
    self.failures, self.errors, self.covered = [], {}, set()

  def __getitem__(self, key):
    return self.arrays[key]

  def keys(self, prefix):
    return sorted(k for k in self.arrays if k.startswith(prefix))

  def compare(self, key, actual):
    self.covered.add(key)
    golden, actual = self.arrays[key], np.asarray(actual)
    if actual.shape != golden.shape:
      self.failures.append(f"{key}: shape {actual.shape} != golden {golden.shape}")
      return
    if golden.dtype.kind in "biu" or self.tolerances.get(key) == 0:
      err = int(np.count_nonzero(actual != golden))
      self.errors[key] = err
      if err:
        self.failures.append(f"{key}: {err} of {golden.size} entries differ (exact)")
      return
    diff = np.abs(actual.astype(np.float64) - golden.astype(np.float64)).max(initial=0.0)
    if golden.dtype == np.float64 and key not in self.tolerances:
      err, tol = diff, ATOL_FLOAT64
    else:
      err = diff / max(np.abs(golden).max(initial=0.0), 1e-30)
      tol = self.tolerances.get(key, DEFAULT_RTOL)
    self.errors[key] = float(err)
    if not err <= tol:
      self.failures.append(f"{key}: max|diff|/max|golden| = {err:.3g} > {tol:g}")

  def unchecked(self):
    return [k for k in self.keys("out/") if k not in self.covered]

  def report(self):
    return (f"{self.path.name}: {len(self.failures)} failures ({len(self.errors)} comparisons):\n"
            + "\n".join(self.failures))


def import_xar(golden: XarGolden):
  """(model, params) through the converter's importer."""
  state_dict = {k[len("param/"):]: golden[k] for k in golden.keys("param/")}
  backbone = weights.backbone_from_config(golden.config)
  params = {"backbone": weights.backbone_params_from_state_dict(state_dict, backbone)}
  return XarModel(backbone), params


def check_const(g, model):
  layout = model.backbone.layout
  g.compare("out/const/seq_to_raster", layout.seq_to_raster())
  pos = jnp.arange(layout.num_tokens)
  g.compare("out/const/attn_mask_allowed",
            attention.visible(attention.BlockCausal(layout.block_sizes()), pos, pos))
  for part, heads in (("enc", model.backbone.encoder_heads), ("dec", model.backbone.decoder_heads)):
    hd = model.backbone.width // heads
    # The rotation of each basis vector e_i (as a head of its own) at every position.
    basis = jnp.broadcast_to(jnp.eye(hd), (1, layout.num_tokens, hd, hd))
    r = np.asarray(XAR_ROPE.apply(basis, jnp.asarray(layout.grid_positions())))[0]
    i = np.arange(hd)
    cos = r[:, i, i]
    sin = np.where(i % 2 == 1, r[:, i - 1, i], -r[:, (i + 1) % hd, i])
    g.compare(f"out/const/rope_{part}_cos", cos)
    g.compare(f"out/const/rope_{part}_sin", sin)


def check_emb(g, model, params):
  p = params["backbone"]
  g.compare("out/emb/class_embedding", p["class_emb"]["embedding"][g["in/emb/labels"]])
  steps = time_steps(g["in/emb/t"])
  g.compare("out/emb/t_int", steps)
  g.compare("out/emb/t_freq", adaln.timestep_embedding(steps, 256))
  g.compare("out/emb/time_emb", TimeEmbedding(model.backbone.width).apply(
      {"params": p["time_embed"]}, steps))
  for key in g.keys("out/emb/em_grid_n"):
    num_steps = int(re.match(r"out/emb/em_grid_n(\d+)_t", key).group(1))
    times = call_times(num_steps)
    g.compare(key, times if key.endswith("_t") else time_steps(times))


def call_times(num_steps):
  """The time of each network call of one entity, as the sampler passes it (float32)."""
  return np.asarray(time_grid("euler_maruyama", num_steps)[:-1], np.float32).astype(np.float64)


def check_train(g, model, params):
  kw = g.config["xAR_kwargs"]
  layout = model.backbone.layout
  x = g["in/train/x"]  # NCHW latent
  batch = x.shape[0]
  tokens = x.transpose(0, 2, 3, 1).reshape(batch, layout.num_tokens, -1)
  labels = drop_labels(g["in/train/labels"], g["in/train/label_drop_u"], kw["label_drop_prob"],
                       model.backbone.num_classes)
  g.compare("out/train/labels_used", labels)
  # Draws are stored entity-major (entry k * B + b); arjax holds them per image [B, E].
  t = logit_normal_times(g["in/train/logit_normal_z"].reshape(-1, batch).T)
  entity_major = lambda a: np.asarray(a).swapaxes(0, 1).reshape((-1,) + np.shape(a)[2:])
  g.compare("out/train/t", entity_major(t))
  g.compare("out/train/t_int", entity_major(time_steps(t)))
  noise = g["in/train/noise"]
  noise = noise.transpose(1, 0, 2, 3).reshape(batch, layout.num_tokens, -1)
  x_seq = to_sequence(jnp.asarray(tokens), layout)
  loss, (x_t, target, v) = jax.jit(lambda p: velocity_loss(
      p, x_seq, labels, t, jnp.asarray(noise), model=model))(params)
  # The intermediates, sown by the backbone on the same inputs.
  _, state = model.apply(params_tree(params), x_t, labels, t, method=XarModel.velocity,
                         mutable=["intermediates"])
  inter = jax.tree.map(lambda a: a[0], state["intermediates"]["backbone"],
                       is_leaf=lambda a: isinstance(a, tuple))
  g.compare("out/train/model_input", x_t)
  g.compare("out/train/model_target", target)
  g.compare("out/train/velocity", v)
  g.compare("out/train/loss", loss)
  g.compare("out/train/class_embedding", inter["class_embedding"])
  for name in ("time_emb", "condition"):
    g.compare(f"out/train/{name}", entity_major(inter[name]))
  for name in ("enc_in", "encoder", "dec_in"):
    g.compare(f"out/train/{name}", inter[name])
  for key in g.keys("out/train/"):
    m = re.match(r"out/train/(enc|dec)_block(\d+)(_ada)?$", key)
    if m is None:
      continue
    part, i, ada = m.groups()
    stack = {"enc": "encoder_blocks", "dec": "decoder_blocks"}[part]
    if ada:
      g.compare(key, entity_major(inter[f"{stack}_{i}"]["ada"]))
    elif f"{part}_block{i}" in inter:
      g.compare(key, inter[f"{part}_block{i}"])


def params_tree(params):
  return {"params": params}


def check_sample_inference(g, model, params):
  size = model.backbone.layout.size
  labels = jnp.asarray(g["in/si/labels"])
  rows = labels.shape[0]
  call = jax.jit(lambda x, t, cache, index: model.apply(
      {"params": params}, x, labels, t, cache, index, method=XarModel.velocity))
  cache = model.backbone.init_cache(rows)
  for s in range(model.backbone.layout.num_entities):
    e = f"si/e{s}"
    if f"in/{e}/x_first" not in g.arrays:
      break
    x = g[f"in/{e}/x_first"]
    t = g[f"in/{e}/t_first"]  # segment-major: one entry per (entity of the call, row)
    g.compare(f"out/{e}/t_int_first", time_steps(t))
    t = t.reshape(-1, rows).T
    v, cache = call(x, t, cache, (s + 1) * size - x.shape[1])  # fills the cache
    g.compare(f"out/{e}/v_first", v[:, -size:])
    t = g[f"in/{e}/t_next"]
    g.compare(f"out/{e}/t_int_next", time_steps(t))
    v, _ = call(g[f"in/{e}/x_next"], t[:, None], cache, s * size)  # reads it, leaves it
    g.compare(f"out/{e}/v_next", v)
  for key in g.keys("out/si/cache/"):
    stack, i, kind = re.match(r"out/si/cache/(encoder|decoder)_blocks\.(\d+)/(k|v)$", key).groups()
    layer = cache[stack][int(i)][kind]  # [B, L, H, hd] -> the official [B, H, L_cache, hd]
    g.compare(key, np.asarray(layer).transpose(0, 2, 1, 3)[:, :, :g[key].shape[2]])


def check_sampling_run(g, model, params, run):
  layout = model.backbone.layout
  labels = g[f"in/{run}/labels"]
  num_steps, cfg = int(g[f"in/{run}/num_steps"]), float(g[f"in/{run}/cfg"])
  g.compare(f"out/{run}/t_steps", time_grid("euler_maruyama", num_steps))
  scales = entity_scales(cfg, "linear", layout.num_entities)
  g.compare(f"out/{run}/cfg_scaled", scales.astype(np.float64))
  g.compare(f"out/{run}/t_int", time_steps(call_times(num_steps)))
  latents = jnp.stack([g[f"in/{run}/e{s}/latents"] for s in range(layout.num_entities)])
  em = jnp.stack([g[f"in/{run}/e{s}/em_noise"] for s in range(layout.num_entities)])
  draw = lambda s, i: jnp.where(i == 0, latents[s], em[s, jnp.maximum(i - 1, 0)])
  # The official sampler always doubles the batch with the null class, even at cfg = 1.
  tokens, record = jax.jit(lambda p, scales: sample_tokens(
      p, jnp.asarray(labels), draw, scales, 1.0, model=model, solver="euler_maruyama",
      num_steps=num_steps, guided=True, trace=True))(params, jnp.asarray(scales))
  for s in range(layout.num_entities):
    g.compare(f"out/{run}/e{s}/v", record["v"][s])
    g.compare(f"out/{run}/e{s}/x", record["x"][s])
  grid = (len(labels), layout.grid_h, layout.grid_w, -1)
  g.compare(f"out/{run}/tokens", np.asarray(tokens).reshape(grid).transpose(0, 3, 1, 2))


def check_golden_file(path) -> XarGolden:
  g = XarGolden(path)
  model, params = import_xar(g)
  check_const(g, model)
  check_emb(g, model, params)
  check_train(g, model, params)
  check_sample_inference(g, model, params)
  for run in sorted({k.split("/")[1] for k in g.keys("in/sample_")}):
    check_sampling_run(g, model, params, run)
  for key in g.unchecked():
    g.failures.append(f"{key}: no check covers this key")
  return g




@pytest.mark.parametrize("path", golden_cases("xar_*.npz"))
def test_golden_xar(path):
  g = check_golden_file(path)
  worst = max(((k, v) for k, v in g.errors.items() if isinstance(v, float)),
              key=lambda kv: kv[1], default=None)
  print(f"{path.name}: {len(g.errors)} comparisons, worst {worst}")
  assert not g.failures, g.report()


# A golden test that cannot fail proves nothing: perturb one key of each section (the first
# key matching each pattern) and add a key no check knows; the file must fail naming each.
_PERTURBED = ("out/const/seq_to_raster", "out/const/rope_enc_sin", "out/emb/t_freq",
              "out/emb/em_grid_n*_t_int", "out/train/velocity", "out/train/enc_block*_ada",
              "out/si/e*/v_next", "out/si/cache/*", "out/sample_cfg/e*/x",
              "out/sample_nocfg/tokens")
_UNKNOWN = "out/an_output_no_check_knows"


def _perturbed(golden):
  """One entry moved: by 1e-2 of max|golden| (floats), by one (integers), flipped (bools)."""
  golden = golden.copy()
  flat = golden.reshape(-1)
  i = flat.size // 2
  if golden.dtype == bool:
    flat[i] = ~flat[i]
  elif golden.dtype.kind in "iu":
    flat[i] += 1
  else:
    flat[i] += 1e-2 * np.abs(golden).max()
  return golden


@pytest.mark.parametrize("path", golden_cases("xar_*.npz"))
def test_a_tampered_golden_file_fails_naming_every_tampered_key(path, tmp_path):
  import fnmatch
  arrays = XarGolden(path).arrays
  perturbed = sorted({next(iter(fnmatch.filter(sorted(arrays), p)), None)
                      for p in _PERTURBED} - {None})
  tampered = {k: _perturbed(v) if k in perturbed else v for k, v in arrays.items()}
  tampered[_UNKNOWN] = np.zeros(3, np.float32)
  np.savez(tmp_path / path.name, **tampered)
  readme = path.parent / "README_xar.md"
  if readme.is_file():  # the same tolerances
    (tmp_path / readme.name).symlink_to(readme)
  report = check_golden_file(tmp_path / path.name).report()
  for key in perturbed + [_UNKNOWN]:
    assert re.search(rf"^{re.escape(key)}:", report, re.M), (
        f"tampering with {key} went unnoticed:\n{report}")
