"""Latent caching: a TFDS image split encoded once by the VAE, then trained on instead of images.

MAR reports about twice the training speed from caching: the frozen VAE encoder is most of a
step's work at 256px. Write a cache, then point `config.data.latents` at it:

  python -m arjax cache_latents --config=configs/X.py --out=DIR [--split=SPLIT] [--batch=N]
  python -m arjax train --config=configs/X.py --config.data.latents=DIR --workdir=...

`--out` defaults to `config.data.latents`, `--split` to `config.data.train_split`. The images
are read with the training pipeline's own decoder (validation, resize, channels), each image and
its horizontal flip is encoded by the config's VAE (`config.tokenizer`, weights included) in one
jitted call sharded over every device, and the raw posterior moments are written as ArrayRecord.

Layout of DIR (one split per run; several splits may share a DIR):

  DIR/<split>.json                               metadata, written last: present = complete
  DIR/<split>.array_record-00000-of-00003 ...    the records, in the source split's order

(`<split>` is URL-quoted, so `train[:1%]` is a file name too.) Record i holds source position i
as raw little-endian bytes, no header:

  moments  float32 [2, h, w, M]   [0] the image, [1] its horizontal flip. M = 2 * embed_dim:
                                  the quant_conv output, mean then logvar before the clamp
                                  (MAR's `posterior.parameters`), so posterior sampling stays
                                  a training-time choice
  label    int64

The metadata records what the moments depend on (dataset, split, image size and channels,
VAE architecture, a sha256 of the VAE weights, moments shape); training refuses a cache that
disagrees with its config, naming the field.

Training from a cache (`make_train_iterator`) runs the image pipeline's own stream
(`pipeline.element_stream`: seeded shuffle, repeat, per-element flip draw, process shard), so
for the same seed every element is the same record with the same flip as on the image path;
the read picks moments[flip] and batches are {'moments': float32 [b, h, w, M], 'label': int32
[b]}. The train step then samples (or takes the mean of) the posterior, scales and patchifies
(`KLVAETokenizer.encode_moments`): the tokens the image path would give. The iterator
checkpoints like the image one (its state is the next batch number).
"""
import json
import math
import os
import urllib.parse
from typing import Optional

import grain
import numpy as np

from arjax.data import pipeline

FORMAT = "arjax.latents/1"
# Shards of about this many bytes: few enough files, and parallel reads for big splits.
SHARD_BYTES = 1 << 30
# Images per encoding call and device when --batch is not given.
BATCH_PER_DEVICE = 32

_LABEL = np.dtype("<i8")
_MOMENTS = np.dtype("<f4")


def _stem(split: str) -> str:
  return urllib.parse.quote(split, safe="")


def metadata_path(directory: str, split: str) -> str:
  return os.path.join(directory, f"{_stem(split)}.json")


def _shard_names(split: str, num_shards: int) -> list:
  return [f"{_stem(split)}.array_record-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]


# -----------------------------------------------------------------------------
# Reading.


class LatentSource:
  """Random access to a cached split: `len()`, and `[i]` gives {'moments': float32 [2, h, w, M],
  'label': int} for source position i. `metadata` is the split's JSON."""

  def __init__(self, directory: str, split: str):
    path = metadata_path(directory, split)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"no latent cache of split {split!r} in {directory} ({path} is missing; a cache is "
          f"complete once it is written). Write one with\n  python -m arjax cache_latents "
          f"--config=... --out={directory} --split={split}")
    with open(path) as f:
      self.metadata = json.load(f)
    if self.metadata.get("format") != FORMAT:
      raise ValueError(f"{path}: format {self.metadata.get('format')!r}, expected {FORMAT!r}")
    self.directory, self.split = directory, split
    self.moments_shape = (2, *self.metadata["moments_shape"])
    self._record_bytes = math.prod(self.moments_shape) * _MOMENTS.itemsize + _LABEL.itemsize
    files = [os.path.join(directory, name) for name in self.metadata["files"]]
    self._records = grain.sources.ArrayRecordDataSource(files)
    if len(self._records) != self.metadata["num_examples"]:
      raise ValueError(f"{directory}: the {split!r} files hold {len(self._records)} records, "
                       f"its metadata says {self.metadata['num_examples']}")

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, position: int) -> dict:
    raw = self._records[position]
    if len(raw) != self._record_bytes:
      raise ValueError(f"latent record at position {position} of {self.directory} split "
                       f"{self.split!r} has {len(raw)} bytes, expected {self._record_bytes}")
    split_at = self._record_bytes - _LABEL.itemsize
    moments = np.frombuffer(raw, _MOMENTS, count=split_at // _MOMENTS.itemsize)
    label = int(np.frombuffer(raw, _LABEL, offset=split_at)[0])
    return {"moments": moments.reshape(self.moments_shape), "label": label}

  def __repr__(self) -> str:
    return f"LatentSource({self.directory!r}, {self.split!r})"


def check_matches(source: LatentSource, config, tokenizer) -> None:
  """Raises ConfigError naming the config field a cache disagrees with."""
  from arjax.config.schema import ConfigError
  from arjax.tokenizers import kl_vae

  meta, where = source.metadata, f"latent cache {source.directory} (split {source.split!r})"
  d, t = config.data, config.tokenizer
  for field, ours, theirs in (
      ("data.name", d.name, meta["dataset"]),
      ("data.image_size", d.image_size, meta["image_size"]),
      ("data.channels", d.channels, meta["channels"]),
      ("data.num_classes", d.num_classes, meta["num_classes"]),
      ("tokenizer.architecture", t.architecture, meta["architecture"])):
    if ours != theirs:
      raise ConfigError(f"config.{field}={ours!r}, but the {where} was written with {theirs!r}")
  if tuple(meta["moments_shape"]) != tuple(tokenizer.moments_shape):
    raise ConfigError(f"the {where} holds moments of shape {tuple(meta['moments_shape'])}, "
                      f"config.tokenizer gives {tuple(tokenizer.moments_shape)}")
  if meta["params_sha256"] != kl_vae.params_fingerprint(tokenizer.params):
    raise ConfigError(f"config.tokenizer.checkpoint={t.checkpoint!r}: these are not the VAE "
                      f"weights the {where} was encoded with ({meta['checkpoint']!r})")


class _ReadLatent:
  """(position, flip?) -> {'moments': the image's or its flip's [h, w, M], 'label'}."""

  def __init__(self, source: LatentSource):
    self.source = source

  def __call__(self, drawn: tuple) -> dict:
    position, flip, _ = drawn  # no translation: config checks refuse it with a latent cache
    record = self.source[position]
    return {"moments": record["moments"][int(flip)], "label": record["label"]}


def _collate(examples) -> dict:
  return {"moments": np.stack([e["moments"] for e in examples]).astype(np.float32),
          "label": np.array([e["label"] for e in examples], np.int32)}


def train_dataset(source: LatentSource, data_cfg, *, global_batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """The image pipeline's stream over a latent cache: element k is this process's share of
  global batch k, {'moments': float32 [b, h, w, M], 'label': int32 [b]}."""
  if len(source) == 0:
    raise ValueError(f"the training source {source} is empty")
  labels = pipeline.source_labels(source) if data_cfg.get("group_size", 1) > 1 else None
  ds = pipeline.element_stream(len(source), data_cfg, global_batch_size=global_batch_size,
                               seed=seed, process_index=process_index,
                               process_count=process_count, labels=labels)
  ds = ds.map(_ReadLatent(source))
  return ds.batch(global_batch_size // process_count, drop_remainder=True, batch_fn=_collate)


def make_train_iterator(config, tokenizer, *, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1):
  """This process's checkpointable iterator over `config.data.latents`, checked against the
  config and the tokenizer (see `check_matches`)."""
  d = config.data
  source = LatentSource(d.latents, d.train_split)
  check_matches(source, config, tokenizer)
  ds = train_dataset(source, d, global_batch_size=global_batch_size, seed=seed,
                     process_index=process_index, process_count=process_count)
  return pipeline.iterate(ds, d.worker_count)


# -----------------------------------------------------------------------------
# Writing.


def _encoder(tokenizer, mesh):
  """jitted images [B, H, W, C] -> moments [B, 2, h, w, M] (image, flip), batch split on mesh."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  def encode(images):
    # One call for both halves keeps the VAE's weights read once per batch.
    both = tokenizer.moments(jnp.concatenate([images, images[:, :, ::-1]]))
    return jnp.stack(jnp.split(both, 2), axis=1)

  split = NamedSharding(mesh, P("batch"))
  return jax.jit(encode, in_shardings=split, out_shardings=split)


def _image_batches(config, split: str, batch_size: int):
  """The split in file order through the training decoder: (images [b, S, S, C] in [-1, 1],
  labels [b]), b = batch_size but for the last."""
  d = config.data
  source = pipeline.data_source(d, split)
  decode = pipeline.RecordDecoder.from_config(d, pipeline._declared_image_shape(source))
  ds = grain.MapDataset.source(source).map_with_index(lambda i, record: decode(record, i))
  ds = ds.batch(batch_size, drop_remainder=False, batch_fn=pipeline._collate)
  return len(source), pipeline.iterate(ds, d.worker_count)


def cache_latents(config, out_dir: str, *, split: Optional[str] = None,
                  batch_size: Optional[int] = None, shard_bytes: int = SHARD_BYTES,
                  progress: bool = False) -> dict:
  """Encodes `split` (default config.data.train_split) into `out_dir`; returns the metadata.

  Refuses to overwrite a complete cache (FileExistsError: delete `<split>.json` to re-encode).
  `batch_size`: images per encoding call (default 32 per device), rounded up to a multiple of
  the device count. One process only: on a multi-host job run it on one host.
  """
  import jax
  from jax.sharding import Mesh
  from arjax.config import schema as configs
  from arjax.util import progress as progress_lib
  from arjax import registry
  from arjax.tokenizers import kl_vae

  registry.validate(config)
  d, t = config.data, config.tokenizer
  if t.name != "kl_vae":
    raise configs.ConfigError(f"config.tokenizer.name={t.name!r}: only a VAE tokenizer "
                              "('kl_vae') has latents to cache")
  if jax.process_count() > 1:
    raise RuntimeError("cache_latents runs in one process; start it on one host")
  split = d.train_split if split is None else split
  meta_path = metadata_path(out_dir, split)
  if os.path.exists(meta_path):
    raise FileExistsError(f"{meta_path}: a complete latent cache of split {split!r} is already "
                          "there; delete it to encode again")
  tokenizer = registry.make_tokenizer(t, d)
  pipeline.prepare(d.name, d.data_dir)

  devices = jax.devices()
  mesh = Mesh(np.asarray(devices), ("batch",))
  batch_size = batch_size or BATCH_PER_DEVICE * len(devices)
  batch_size = -(-batch_size // len(devices)) * len(devices)
  encode = _encoder(tokenizer, mesh)

  num_examples, batches = _image_batches(config, split, batch_size)
  if num_examples == 0:
    raise ValueError(f"split {split!r} of {d.name!r} is empty: nothing to cache")
  moments_shape = tuple(tokenizer.moments_shape)
  record_bytes = 2 * math.prod(moments_shape) * _MOMENTS.itemsize + _LABEL.itemsize
  per_shard = max(1, shard_bytes // record_bytes)
  names = _shard_names(split, max(1, -(-num_examples // per_shard)))
  os.makedirs(out_dir, exist_ok=True)

  from array_record.python.array_record_module import ArrayRecordWriter

  written, writer = 0, None
  bar = progress_lib.bar(num_examples, desc=f"cache {split}", unit="image", enabled=progress)
  for batch in batches:
    images, labels = batch["image"], batch["label"]
    n = len(images)
    if n < batch_size:  # pad the last batch: one compiled shape; encodings are per example
      images = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]),
                                                images.dtype)])
    moments = np.asarray(jax.device_get(encode(images)), _MOMENTS)[:n]
    for i in range(n):
      if written % per_shard == 0:
        if writer is not None:
          writer.close()
        # group_size:1 makes every record its own chunk: random access reads one record.
        writer = ArrayRecordWriter(os.path.join(out_dir, names[written // per_shard]),
                                   "group_size:1")
      writer.write(moments[i].tobytes() + np.asarray(labels[i], _LABEL).tobytes())
      written += 1
    bar.update(n)
  if writer is not None:
    writer.close()
  bar.close()
  if written != num_examples:
    raise RuntimeError(f"encoded {written} of the {num_examples} records of split {split!r}")

  metadata = {
      "format": FORMAT,
      "dataset": d.name,
      "split": split,
      "num_examples": num_examples,
      "image_size": d.image_size,
      "channels": d.channels,
      "num_classes": d.num_classes,
      "architecture": t.architecture,
      "checkpoint": t.checkpoint,
      "params_sha256": kl_vae.params_fingerprint(tokenizer.params),
      "moments_shape": list(moments_shape),
      "record": "moments float32 [2, h, w, M] (image, horizontal flip; mean then raw logvar) "
                "then label int64, little-endian",
      "files": names,
  }
  tmp = meta_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(metadata, f, indent=2)
  os.replace(tmp, meta_path)  # last, and atomic: the cache exists once complete
  return metadata
