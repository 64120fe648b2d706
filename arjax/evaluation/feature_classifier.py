"""A small image classifier whose last hidden layer is the eval feature space.

Sample-quality metrics (Fréchet distance, precision/recall) need an embedding
in which distances mean something, and class-consistency needs a classifier.
For large natural images that role is played by Inception-v3; for the tiny
bundled datasets (8x8 grayscale digits) we train our own little CNN on the
train split only, once, and cache it. Its `features` are the post-ReLU
activations of the layer just before the logits.

The cache lives in `cache_dir/arjax_eval/<name>/`:
  params.npz     the parameters as plain arrays, keys are '/'-joined paths;
  metadata.json  architecture, training recipe, seed and a fingerprint of the
                 train split the parameters were fitted on.
A cache is used only if its metadata matches the current recipe and the
fingerprint of the train split passed in; otherwise the classifier is
retrained (and the reason logged), so a changed dataset can never silently
be scored by a stale classifier. No pickle is involved in either file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

_LOG = logging.getLogger(__name__)

_CACHE_FORMAT_VERSION = 1
_PARAMS_FILE = "params.npz"
_METADATA_FILE = "metadata.json"
_INFERENCE_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Architecture:
  """Shape of the CNN; part of the cache key."""
  conv_widths: tuple[int, ...] = (32, 64)
  feature_dim: int = 64


@dataclasses.dataclass(frozen=True)
class TrainingRecipe:
  """How the classifier is fitted; part of the cache key."""
  seed: int = 0
  epochs: int = 40
  batch_size: int = 64
  learning_rate: float = 2e-3
  weight_decay: float = 1e-4
  # Random translation by up to this many pixels. Digits are not perfectly
  # centred, and generated digits will be off by a pixel here and there; the
  # classifier must not call those wrong.
  max_shift: int = 1


class FeatureNet(nn.Module):
  """Conv stack -> dense feature layer -> logits."""
  num_classes: int
  conv_widths: tuple[int, ...]
  feature_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [B, H, W, C] in [-1, 1]. Returns (logits [B, K], features [B, F])."""
    for i, width in enumerate(self.conv_widths):
      x = nn.relu(nn.Conv(width, (3, 3), padding="SAME")(x))
      # Pool after every conv but the first: keeps full resolution for the
      # first edge detectors, then halves it; 8x8 -> 4x4 after two layers.
      if i > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    x = x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(self.feature_dim)(x))
    logits = nn.Dense(self.num_classes)(features)
    return logits, features


def normalise_images(images_uint8: np.ndarray | jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0


def train_split_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
  """SHA-256 over shape, dtype and bytes of the train images and labels."""
  images = np.ascontiguousarray(images)
  labels = np.ascontiguousarray(np.asarray(labels, np.int64))
  digest = hashlib.sha256()
  digest.update(f"{images.shape}|{images.dtype.str}|{labels.shape}".encode())
  digest.update(images.tobytes())
  digest.update(labels.tobytes())
  return digest.hexdigest()


class FeatureClassifier:
  """A trained FeatureNet with batched, jitted inference on uint8 images."""

  def __init__(self, params: Any, *, num_classes: int,
               image_shape: tuple[int, int, int],
               architecture: Architecture = Architecture(),
               metadata: dict[str, Any] | None = None):
    self.params = params
    self.num_classes = num_classes
    self.image_shape = tuple(image_shape)
    self.architecture = architecture
    self.metadata = dict(metadata or {})
    self._net = FeatureNet(num_classes=num_classes,
                           conv_widths=architecture.conv_widths,
                           feature_dim=architecture.feature_dim)
    self._apply = jax.jit(
        lambda p, x: self._net.apply({"params": p}, normalise_images(x)))

  @property
  def feature_dim(self) -> int:
    return self.architecture.feature_dim

  def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
      raise ValueError(
          f"images must be uint8 [N, {', '.join(map(str, self.image_shape))}]"
          f", got {images.dtype} {images.shape}")
    logits, features = [], []
    # One fixed batch shape, the tail zero-padded, so jit compiles once.
    for start in range(0, len(images), _INFERENCE_BATCH):
      chunk = images[start:start + _INFERENCE_BATCH]
      padded = np.zeros((_INFERENCE_BATCH,) + self.image_shape, np.uint8)
      padded[:len(chunk)] = chunk
      chunk_logits, chunk_features = self._apply(self.params, padded)
      logits.append(np.asarray(chunk_logits)[:len(chunk)])
      features.append(np.asarray(chunk_features)[:len(chunk)])
    if not logits:
      return (np.zeros((0, self.num_classes), np.float32),
              np.zeros((0, self.feature_dim), np.float32))
    return np.concatenate(logits), np.concatenate(features)

  def features(self, images_uint8: np.ndarray) -> np.ndarray:
    """[N, H, W, C] uint8 -> [N, feature_dim] float64 embedding."""
    return self._run(images_uint8)[1].astype(np.float64)

  def predict(self, images_uint8: np.ndarray) -> np.ndarray:
    """[N, H, W, C] uint8 -> [N] int64 predicted class."""
    return np.argmax(self._run(images_uint8)[0], axis=-1).astype(np.int64)

  def accuracy(self, images_uint8: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose predicted class equals the label."""
    if len(images_uint8) == 0:
      raise ValueError("accuracy needs at least one image")
    return float(np.mean(self.predict(images_uint8) == np.asarray(labels)))


def _random_shift(key: jax.Array, images: jax.Array,
                  max_shift: int) -> jax.Array:
  """Translates each image by an integer offset, filling with background."""
  if max_shift == 0:
    return images
  _, h, w, _ = images.shape
  pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
  # Background of [-1, 1]-normalised digits is -1 (pixel value 0).
  padded = jnp.pad(images, pad, constant_values=-1.0)
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * max_shift + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                 (h, w, image.shape[-1]))

  return jax.vmap(crop)(padded, offsets)


def train(images: np.ndarray, labels: np.ndarray, *, num_classes: int,
          architecture: Architecture = Architecture(),
          recipe: TrainingRecipe = TrainingRecipe()) -> tuple[Any, float]:
  """Fits a FeatureNet on (images, labels). Returns (params, train accuracy)."""
  net = FeatureNet(num_classes=num_classes,
                   conv_widths=architecture.conv_widths,
                   feature_dim=architecture.feature_dim)
  x_all = normalise_images(images)
  y_all = jnp.asarray(labels, jnp.int32)
  key = jax.random.PRNGKey(recipe.seed)
  init_key, aug_key = jax.random.split(key)
  params = net.init(init_key, x_all[:1])["params"]

  steps_per_epoch = max(1, len(images) // recipe.batch_size)
  total_steps = recipe.epochs * steps_per_epoch
  schedule = optax.cosine_decay_schedule(recipe.learning_rate, total_steps)
  optimizer = optax.adamw(schedule, weight_decay=recipe.weight_decay)
  opt_state = optimizer.init(params)

  def loss_fn(p, x, y):
    logits, _ = net.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, state, step_key, idx):
    x = _random_shift(step_key, x_all[idx], recipe.max_shift)
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y_all[idx])
    updates, state = optimizer.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  order_rng = np.random.default_rng(recipe.seed)
  batch = min(recipe.batch_size, len(images))
  for epoch in range(recipe.epochs):
    order = order_rng.permutation(len(images))
    for i in range(steps_per_epoch):
      # Drop the ragged tail so every step has the same shape (one compile);
      # the reshuffle each epoch means no example is left out for long.
      idx = jnp.asarray(order[i * batch:(i + 1) * batch])
      step_key = jax.random.fold_in(aug_key, epoch * steps_per_epoch + i)
      params, opt_state, _ = step(params, opt_state, step_key, idx)

  classifier = FeatureClassifier(params, num_classes=num_classes,
                                 image_shape=images.shape[1:],
                                 architecture=architecture)
  return params, classifier.accuracy(images, labels)


def _check_train_split(images: np.ndarray, labels: np.ndarray) -> None:
  if not isinstance(images, np.ndarray) or images.dtype != np.uint8 \
      or images.ndim != 4 or len(images) == 0:
    raise ValueError("train_images must be a non-empty uint8 [N, H, W, C] "
                     f"array, got {getattr(images, 'dtype', type(images))} "
                     f"{getattr(images, 'shape', '')}")
  labels = np.asarray(labels)
  if labels.shape != (len(images),) or not np.issubdtype(labels.dtype,
                                                         np.integer):
    raise ValueError(f"train_labels must be integer [{len(images)}], got "
                     f"{labels.dtype} {labels.shape}")
  if labels.min() < 0:
    raise ValueError(f"train_labels must be >= 0, got min {labels.min()}")


def _expected_metadata(fingerprint: str, num_classes: int,
                       image_shape: tuple[int, ...], num_train: int,
                       architecture: Architecture,
                       recipe: TrainingRecipe) -> dict[str, Any]:
  return {
      "format_version": _CACHE_FORMAT_VERSION,
      "model": "FeatureNet",
      "architecture": dataclasses.asdict(architecture),
      "recipe": dataclasses.asdict(recipe),
      "num_classes": num_classes,
      "image_shape": list(image_shape),
      "num_train": num_train,
      "train_fingerprint": fingerprint,
  }


def _cache_mismatch(directory: pathlib.Path,
                    expected: dict[str, Any]) -> str | None:
  """Why the cache in `directory` can't be used, or None if it can."""
  meta_path = directory / _METADATA_FILE
  if not meta_path.exists() or not (directory / _PARAMS_FILE).exists():
    return "no cached classifier"
  try:
    stored = json.loads(meta_path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    return f"unreadable metadata ({e})"
  # JSON turns tuples into lists; compare in JSON form.
  expected = json.loads(json.dumps(expected))
  for key, value in expected.items():
    if stored.get(key) != value:
      if key == "train_fingerprint":
        return ("train split fingerprint differs (cached "
                f"{str(stored.get(key))[:12]}, given {value[:12]})")
      return f"{key} differs (cached {stored.get(key)!r}, now {value!r})"
  return None


def _atomic_write(path: pathlib.Path, write) -> None:
  # Write-then-rename so a concurrent reader never sees half a file.
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _save(directory: pathlib.Path, params: Any,
          metadata: dict[str, Any]) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  arrays = {k: np.asarray(v) for k, v in flat.items()}
  _atomic_write(directory / _PARAMS_FILE, lambda f: np.savez(f, **arrays))
  # Metadata last: its presence marks the params as complete.
  _atomic_write(directory / _METADATA_FILE,
                lambda f: f.write(json.dumps(metadata, indent=2).encode()))


def _load_params(directory: pathlib.Path) -> Any:
  with np.load(directory / _PARAMS_FILE, allow_pickle=False) as data:
    flat = {k: jnp.asarray(data[k]) for k in data.files}
  return traverse_util.unflatten_dict(flat, sep="/")


def load_or_train(cache_dir: str | os.PathLike, train_images: np.ndarray,
                  train_labels: np.ndarray, *, name: str,
                  architecture: Architecture = Architecture(),
                  recipe: TrainingRecipe = TrainingRecipe()
                  ) -> FeatureClassifier:
  """Returns the classifier cached under cache_dir/arjax_eval/<name>/.

  Trains (and caches) it first when there is no cache, or when the cache was
  fitted on a different train split or with a different recipe.

  Args:
    cache_dir: root of the cache; created if missing.
    train_images: uint8 [N, H, W, C], the train split only.
    train_labels: integer [N] class labels; classes are 0..max(labels).
    name: cache sub-directory, e.g. the dataset name.
    architecture: network shape.
    recipe: training hyperparameters and seed.
  """
  if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name) \
      or name in (".", ".."):
    raise ValueError(f"name must be a plain directory name, got {name!r}")
  _check_train_split(train_images, train_labels)
  train_labels = np.asarray(train_labels, np.int64)
  num_classes = int(train_labels.max()) + 1
  directory = pathlib.Path(cache_dir) / "arjax_eval" / name
  expected = _expected_metadata(
      train_split_fingerprint(train_images, train_labels), num_classes,
      train_images.shape[1:], len(train_images), architecture, recipe)

  reason = _cache_mismatch(directory, expected)
  if reason is None:
    metadata = json.loads((directory / _METADATA_FILE).read_text())
    _LOG.info("Loaded evaluation classifier from %s", directory)
    return FeatureClassifier(_load_params(directory), num_classes=num_classes,
                             image_shape=train_images.shape[1:],
                             architecture=architecture, metadata=metadata)

  _LOG.warning("Training evaluation classifier in %s: %s", directory, reason)
  start = time.perf_counter()
  params, train_accuracy = train(train_images, train_labels,
                                 num_classes=num_classes,
                                 architecture=architecture, recipe=recipe)
  metadata = dict(expected, train_accuracy=train_accuracy,
                  train_seconds=round(time.perf_counter() - start, 2))
  _save(directory, params, metadata)
  _LOG.info("Evaluation classifier trained in %.1fs (train accuracy %.4f)",
            metadata["train_seconds"], train_accuracy)
  return FeatureClassifier(params, num_classes=num_classes,
                           image_shape=train_images.shape[1:],
                           architecture=architecture, metadata=metadata)
