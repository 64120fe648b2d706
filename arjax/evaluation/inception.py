"""The FID Inception-v3 in Flax: the network behind the FID / IS numbers the papers report.

This is torch-fidelity's `inception-v3-compat` extractor (`FeatureExtractorInceptionV3`, the
network of MAR's and xAR's evaluation, weights `pt_inception-2015-12-05`), rebuilt from its
definition and checked against its outputs (tests/test_golden_inception.py). It is not
torchvision's Inception-v3: its average pools exclude padding, its last block max-pools, its
BatchNorm epsilon is 1e-3 and it has 1008 classes (the 2015 TF graph).

    images uint8 [N, H, W, 3] (any H, W)
      -> float 0..255 -> TF1 legacy bilinear resize to 299x299 (`resize_to_299`)
      -> (x - 128) / 128 -> the network -> {feat_64, feat_192, feat_768, pool3,
                                           logits_unbiased, logits}

`pool3` [N, 2048] is the FID feature; `logits_unbiased` (pool3 @ fc.weight.T, no bias) is what
torch-fidelity's Inception Score reads; `logits` adds the bias. `feat_64|192|768` are the
spatial means after MaxPool_1, MaxPool_2 and Mixed_6e (torch-fidelity's features '64', '192',
'768'). Every block's output is also sown into the 'intermediates' collection under the
package's module name (`STAGES`; `stage_outputs`), so a port error can be located block by block.

Parameters come from a PyTorch state dict (`params_from_state_dict`); `flax_path` is the
name -> Flax path mapping that `python -m arjax convert --kind=inception` uses too. All of
them, the BatchNorm running statistics included, live in the 'params' collection: the network
is never trained, and one collection keeps conversion, saving and jit simple.

Convolutions and the final matmul run at `Precision.HIGHEST` by default: on TPU/GPU the
default bf16 passes move pool3 by ~1e-2, enough to shift a reported FID.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

RESOLUTION = 299
NUM_CLASSES = 1008
POOL3_DIM = 2048
BN_EPS = 1e-3  # torchvision's / flax's default is 1e-5; the TF graph's is 1e-3

# The package's module names whose outputs are sown (and stored as `act/*` in the golden
# files), in network order; `input_299` is the resized, normalised input of Conv2d_1a_3x3.
STAGES = ("input_299", "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1",
          "Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d",
          "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b",
          "Mixed_7c")
# What the network returns, in the order torch-fidelity's features_list names them.
OUTPUTS = ("feat_64", "feat_192", "feat_768", "pool3", "logits_unbiased", "logits")
# sFID's spatial features (returned as 'spatial' beside OUTPUTS): the ADM evaluation suite reads
# `mixed_6/conv:0` of the 2015 TF graph and keeps its first 7 channels, flattened. That tensor
# is the ReLU of the 1x1 branch of the graph's seventh mixed block, Mixed_6d here (the graph's
# mixed, mixed_1, mixed_2 are Mixed_5b..5d, mixed_3 is Mixed_6a, mixed_4..7 are Mixed_6b..6e);
# the block concatenates that branch first, so its output's channels [:7] are those features.
# The input is always resized to 299, so the map is always 17 x 17.
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023

Padding = Tuple[int, int]


# -----------------------------------------------------------------------------
# Preprocessing: torch-fidelity's, which differs from pytorch-fid's.


def source_grid(in_size: int, out_size: int = RESOLUTION
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(lo, hi, frac) of TF1 legacy bilinear resizing along one axis.

  The source coordinate of output pixel i is float32(i) * float32(in/out) with no half-pixel
  offset (output pixel 0 is input pixel 0), rows past the last input pixel clamp to it. Computed
  in float32 as the package does: another rounding moves input_299 by ~1e-5.
  """
  src = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
  lo = np.floor(src).astype(np.int32)
  hi = np.minimum(lo + 1, in_size - 1).astype(np.int32)
  frac = (src - lo.astype(np.float32)).astype(np.float32)
  return lo, hi, frac


def resize_to_299(images: jax.Array) -> jax.Array:
  """float32 [N, H, W, C] -> [N, 299, 299, C] as `tf.image.resize_bilinear(align_corners=False)`
  in TF1 (half_pixel_centers=False), no antialiasing when downsampling, W interpolated first.

  Not `jax.image.resize`: it samples half-pixel centres and antialiases (FID moves by ~1e-3).
  The grids depend on the static H, W only, so they are numpy constants under jit.
  """
  _, h, w, _ = images.shape
  if (h, w) == (RESOLUTION, RESOLUTION):
    return images  # the grid is the identity: skip the gathers
  lo_y, hi_y, frac_y = source_grid(h)
  lo_x, hi_x, frac_x = source_grid(w)
  frac_x = jnp.asarray(frac_x)[None, None, :, None]
  frac_y = jnp.asarray(frac_y)[None, :, None, None]
  rows_lo, rows_hi = images[:, lo_y], images[:, hi_y]
  top = rows_lo[:, :, lo_x] + (rows_lo[:, :, hi_x] - rows_lo[:, :, lo_x]) * frac_x
  bottom = rows_hi[:, :, lo_x] + (rows_hi[:, :, hi_x] - rows_hi[:, :, lo_x]) * frac_x
  return top + (bottom - top) * frac_y


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 [N, H, W, 3] -> the network's float32 [N, 299, 299, 3] input in [-1, 0.9921875].

  Resized on the float 0..255 values (nothing rounded back to integers), then (x - 128) / 128:
  not x / 127.5 - 1 (pytorch-fid's 2x - 1 on [0, 1]), not ImageNet mean/std.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [N, H, W, 3], got shape {tuple(images.shape)}")
  x = resize_to_299(jnp.asarray(images).astype(jnp.float32))
  return (x - 128.0) / 128.0


# -----------------------------------------------------------------------------
# Layers.


class FrozenBatchNorm(nn.Module):
  """Eval-mode BatchNorm2d: (x - running_mean) / sqrt(running_var + eps) * weight + bias,
  evaluated as torch's CPU kernel does (x * alpha + beta)."""
  features: int
  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x):
    shape = (self.features,)
    scale = self.param("scale", nn.initializers.ones, shape)
    bias = self.param("bias", nn.initializers.zeros, shape)
    mean = self.param("mean", nn.initializers.zeros, shape)
    var = self.param("var", nn.initializers.ones, shape)
    alpha = scale / jnp.sqrt(var + self.eps)
    return x * alpha + (bias - mean * alpha)


class BasicConv2d(nn.Module):
  """Conv2d(bias=False) -> BatchNorm2d(eps=1e-3) -> ReLU, symmetric zero padding (pad_h, pad_w)."""
  features: int
  kernel: Tuple[int, int]
  stride: int = 1
  padding: Padding = (0, 0)
  precision: Optional[jax.lax.Precision] = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, tuple(self.kernel), strides=self.stride,
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                name="conv")(x)
    return nn.relu(FrozenBatchNorm(self.features, name="bn")(x))


def _avg_pool_3x3(x):
  """3x3 stride-1 average pool, padding 1, border outputs divided by the real pixels only
  (count_include_pad=False; torchvision's Inception divides by 9)."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class _Block(nn.Module):
  """A block whose convs are `BasicConv2d`s named as in the state dict."""
  precision: Optional[jax.lax.Precision] = jax.lax.Precision.HIGHEST

  def conv(self, name: str, features: int, kernel, stride: int = 1, padding: Padding = (0, 0)):
    if isinstance(kernel, int):
      kernel = (kernel, kernel)
    return BasicConv2d(features, kernel, stride, padding, self.precision, name=name)


class InceptionA(_Block):
  """Mixed_5b/5c/5d: [1x1 64, 5x5 64, 3x3dbl 96, avg-pool -> 1x1 pool_features]."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 64, 1)(x)
    b5 = self.conv("branch5x5_2", 64, 5, padding=(2, 2))(self.conv("branch5x5_1", 48, 1)(x))
    b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
    b3 = self.conv("branch3x3dbl_2", 96, 3, padding=(1, 1))(b3)
    b3 = self.conv("branch3x3dbl_3", 96, 3, padding=(1, 1))(b3)
    bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a (35 -> 17): [3x3/2 384, 3x3dbl 96 (last /2), max-pool/2], all VALID."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3", 384, 3, stride=2)(x)
    bd = self.conv("branch3x3dbl_1", 64, 1)(x)
    bd = self.conv("branch3x3dbl_2", 96, 3, padding=(1, 1))(bd)
    bd = self.conv("branch3x3dbl_3", 96, 3, stride=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(_Block):
  """Mixed_6b-6e: [1x1 192, 7x7 192, 7x7dbl 192, avg-pool -> 1x1 192], 7x7 factored into
  (1,7)/(7,1) convs of `channels_7x7` channels."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row = lambda name, features: self.conv(name, features, (1, 7), padding=(0, 3))
    col = lambda name, features: self.conv(name, features, (7, 1), padding=(3, 0))
    b1 = self.conv("branch1x1", 192, 1)(x)
    b7 = self.conv("branch7x7_1", c7, 1)(x)
    b7 = col("branch7x7_3", 192)(row("branch7x7_2", c7)(b7))
    bd = self.conv("branch7x7dbl_1", c7, 1)(x)
    bd = row("branch7x7dbl_3", c7)(col("branch7x7dbl_2", c7)(bd))
    bd = row("branch7x7dbl_5", 192)(col("branch7x7dbl_4", c7)(bd))
    bp = self.conv("branch_pool", 192, 1)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Mixed_7a (17 -> 8): [3x3/2 320, 7x7x3 192 (last /2), max-pool/2], reductions VALID."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3_2", 320, 3, stride=2)(self.conv("branch3x3_1", 192, 1)(x))
    b7 = self.conv("branch7x7x3_1", 192, 1)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, 3, stride=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(_Block):
  """Mixed_7b (pool 'avg', InceptionE_1) and Mixed_7c (pool 'max', InceptionE_2):
  [1x1 320, 3x3 (1x3 | 3x1) 2x384, 3x3dbl (1x3 | 3x1) 2x384, pool -> 1x1 192]; the two halves
  of each split branch read the same tensor."""
  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 320, 1)(x)
    b3 = self.conv("branch3x3_1", 384, 1)(x)
    b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                          self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
    bd = self.conv("branch3x3dbl_1", 448, 1)(x)
    bd = self.conv("branch3x3dbl_2", 384, 3, padding=(1, 1))(bd)
    bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                          self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)],
                         axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    else:  # its input is post-ReLU, so max_pool's -inf padding equals the package's zeros
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    bp = self.conv("branch_pool", 192, 1)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
  """fc: 2048 -> 1008; returns (pool3 @ W.T, pool3 @ W.T + b): the Inception Score reads the
  unbiased logits, as the original TF IS code multiplies by the MatMul weight only."""
  precision: Optional[jax.lax.Precision] = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, pool3):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (POOL3_DIM, NUM_CLASSES))
    bias = self.param("bias", nn.initializers.zeros, (NUM_CLASSES,))
    unbiased = jnp.dot(pool3, kernel, precision=self.precision)
    return unbiased, unbiased + bias


# -----------------------------------------------------------------------------
# The network.


class FIDInceptionV3(nn.Module):
  """uint8 [N, H, W, 3] images -> {name: [N, dim] float32} for the names in OUTPUTS, and
  'spatial' [N, SPATIAL_DIM] (sFID's features, flattened in H, W, C order as ADM's NHWC graph).

  `model.apply({'params': params}, images, mutable=['intermediates'])` also returns every
  stage's output (`stage_outputs` reads them)."""
  precision: Optional[jax.lax.Precision] = jax.lax.Precision.HIGHEST

  def _stage(self, name: str, x):
    # One variable holding {stage name: output}: a variable named after a stage would clash
    # with the submodule of that name.
    self.sow("intermediates", "stages", {name: x}, init_fn=dict,
             reduce_fn=lambda stages, new: {**stages, **new})
    return x

  @nn.compact
  def __call__(self, images, preprocessed: bool = False):
    """images: uint8 [N, H, W, 3]; or, with `preprocessed`, float32 [N, 299, 299, 3] that
    `preprocess` made already (so that batches of several sizes share one compiled network)."""
    p = self.precision
    conv = lambda name, features, kernel, stride=1, padding=(0, 0): BasicConv2d(
        features, (kernel, kernel), stride, padding, p, name=name)
    if preprocessed:
      if tuple(images.shape[1:]) != (RESOLUTION, RESOLUTION, 3):
        raise ValueError(f"preprocessed images must be [N, {RESOLUTION}, {RESOLUTION}, 3], got "
                         f"{tuple(images.shape)}")
      x = images
    else:
      x = preprocess(images)
    x = self._stage("input_299", x)
    x = self._stage("Conv2d_1a_3x3", conv("Conv2d_1a_3x3", 32, 3, stride=2)(x))
    x = self._stage("Conv2d_2a_3x3", conv("Conv2d_2a_3x3", 32, 3)(x))
    x = self._stage("Conv2d_2b_3x3", conv("Conv2d_2b_3x3", 64, 3, padding=(1, 1))(x))
    x = self._stage("MaxPool_1", _max_pool_3x3_stride2(x))
    feat_64 = x.mean(axis=(1, 2))
    x = self._stage("Conv2d_3b_1x1", conv("Conv2d_3b_1x1", 80, 1)(x))
    x = self._stage("Conv2d_4a_3x3", conv("Conv2d_4a_3x3", 192, 3)(x))
    x = self._stage("MaxPool_2", _max_pool_3x3_stride2(x))
    feat_192 = x.mean(axis=(1, 2))
    blocks = (
        InceptionA(p, pool_features=32, name="Mixed_5b"),
        InceptionA(p, pool_features=64, name="Mixed_5c"),
        InceptionA(p, pool_features=64, name="Mixed_5d"),
        InceptionB(p, name="Mixed_6a"),
        InceptionC(p, channels_7x7=128, name="Mixed_6b"),
        InceptionC(p, channels_7x7=160, name="Mixed_6c"),
        InceptionC(p, channels_7x7=160, name="Mixed_6d"),
        InceptionC(p, channels_7x7=192, name="Mixed_6e"),
        InceptionD(p, name="Mixed_7a"),
        InceptionE(p, pool="avg", name="Mixed_7b"),
        InceptionE(p, pool="max", name="Mixed_7c"),
    )
    feat_768 = spatial = None
    for block in blocks:
      x = self._stage(block.name, block(x))
      if block.name == "Mixed_6d":
        spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
      if block.name == "Mixed_6e":
        feat_768 = x.mean(axis=(1, 2))
    pool3 = x.mean(axis=(1, 2))
    logits_unbiased, logits = Logits(p, name="fc")(pool3)
    return {"feat_64": feat_64, "feat_192": feat_192, "feat_768": feat_768, "pool3": pool3,
            "logits_unbiased": logits_unbiased, "logits": logits, "spatial": spatial}


def stage_outputs(variables) -> Dict[str, jax.Array]:
  """{stage name: NHWC output} from the mutable 'intermediates' an apply returned."""
  return dict(variables["intermediates"]["stages"])


# -----------------------------------------------------------------------------
# PyTorch state dict <-> Flax params.

# The last part of a state-dict name -> the Flax leaf it becomes.
_LEAF_NAMES = {"conv.weight": ("conv", "kernel"), "bn.weight": ("bn", "scale"),
               "bn.bias": ("bn", "bias"), "bn.running_mean": ("bn", "mean"),
               "bn.running_var": ("bn", "var")}
# BatchNorm's step counter (int64 scalar): unused in eval mode, absent from files saved before
# torch 0.4.1 (pt_inception-2015-12-05 may have none), so accepted when present, never required.
UNUSED_SUFFIX = ".bn.num_batches_tracked"


def flax_path(name: str) -> Optional[Tuple[str, ...]]:
  """The Flax params path of a state-dict entry, or None for one the network does not use
  (`*.bn.num_batches_tracked`). ValueError for a name of no known form.

      'Mixed_5b.branch1x1.conv.weight' -> ('Mixed_5b', 'branch1x1', 'conv', 'kernel')
      'Conv2d_1a_3x3.bn.running_var'   -> ('Conv2d_1a_3x3', 'bn', 'var')
      'fc.weight'                      -> ('fc', 'kernel')
  """
  if name.endswith(UNUSED_SUFFIX):
    return None
  if name in ("fc.weight", "fc.bias"):
    return ("fc", "kernel" if name == "fc.weight" else "bias")
  parts = name.split(".")
  leaf = ".".join(parts[-2:])
  if len(parts) < 3 or leaf not in _LEAF_NAMES:
    raise ValueError(f"{name}: not a parameter name of the FID Inception-v3")
  return tuple(parts[:-2]) + _LEAF_NAMES[leaf]


def kernel_to_flax(weight: np.ndarray) -> np.ndarray:
  """A state-dict weight in Flax layout: conv OIHW -> HWIO, fc (out, in) -> (in, out)."""
  return weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T


def abstract_params(model: Optional[FIDInceptionV3] = None):
  """The params tree's shapes (jax.ShapeDtypeStruct leaves), without computing anything."""
  model = FIDInceptionV3() if model is None else model
  images = jax.ShapeDtypeStruct((1, RESOLUTION, RESOLUTION, 3), jnp.uint8)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def state_dict_shapes() -> Dict[str, Tuple[int, ...]]:
  """Every state-dict name the network needs -> its PyTorch shape (num_batches_tracked aside)."""
  inverse = {v: k for k, v in _LEAF_NAMES.items()}
  shapes = {}
  for path, leaf in _flatten(abstract_params()):
    if path[0] == "fc":
      name = f"fc.{'weight' if path[-1] == 'kernel' else 'bias'}"
      shape = tuple(reversed(leaf.shape)) if path[-1] == "kernel" else tuple(leaf.shape)
    else:
      name = ".".join(path[:-2] + (inverse[path[-2:]],))
      shape = (tuple(leaf.shape[i] for i in (3, 2, 0, 1)) if path[-1] == "kernel"
               else tuple(leaf.shape))
    shapes[name] = shape
  return shapes


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], *,
                           what: str = "FID Inception-v3 state dict") -> dict:
  """The Flax params tree (float32 numpy arrays) of a torch-fidelity / pytorch-fid
  `pt_inception-2015-12-05` state dict.

  ValueError listing every missing, unexpected and mis-shaped key (the same checks as every
  importer: `arjax.weights.state_dict.to_params`); `*.bn.num_batches_tracked` is dropped.
  """
  from arjax.weights import state_dict as state_dict_lib  # pylint: disable=import-outside-toplevel

  expected = {}
  for name, shape in state_dict_shapes().items():
    expected[name] = (flax_path(name), shape, np.float32)
  given = {k: v for k, v in state_dict.items() if not k.endswith(UNUSED_SUFFIX)}
  tree = state_dict_lib.to_params(given, expected, what=what, kernel_layout=kernel_to_flax)
  return jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), tree)


# -----------------------------------------------------------------------------
# The converted params on disk: one .npz, '/'-joined paths, no pickle.


def save_params(path: str, params) -> str:
  """Writes the params tree to `path` (.npz) atomically; returns `path`."""
  import os  # pylint: disable=import-outside-toplevel

  flat = {"/".join(p): np.asarray(v, np.float32) for p, v in _flatten(params)}
  tmp = f"{path}.tmp.npz"
  np.savez(tmp, **flat)
  os.replace(tmp, path)
  return path


def load_params(path: str) -> dict:
  """The params tree `save_params` wrote (what `convert --kind=inception` writes), checked
  against the network: InputFileError naming the file and its missing or mis-shaped entries."""
  from arjax.errors import InputFileError  # pylint: disable=import-outside-toplevel
  from arjax.evaluation import npz_files  # pylint: disable=import-outside-toplevel

  want = {"/".join(p): tuple(leaf.shape) for p, leaf in _flatten(abstract_params())}
  arrays = npz_files.read_arrays(path, "FID Inception params", required=(),
                                 optional=tuple(want))
  problems = [f"missing {k}" for k in sorted(set(want) - set(arrays))]
  problems += [f"{k} has shape {arrays[k].shape}, expected {want[k]}" for k in sorted(arrays)
               if arrays[k].shape != want[k]]
  if problems:
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5
                                       else "")
    raise InputFileError(f"{path}: not the FID Inception params `python -m arjax convert "
                         f"--kind=inception` writes ({shown})")
  tree: dict = {}
  for key, value in arrays.items():
    node = tree
    *parents, leaf = key.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = np.asarray(value, np.float32)
  return tree
