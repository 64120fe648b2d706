"""TFDS ArrayRecord datasets in, host batches of normalised images out.

Datasets are read by name from a TFDS data dir in ArrayRecord format. Only the
bundled `digits` is prepared by arjax itself (from scikit-learn's copy, see
`arjax/data/digits.py`); anything else (cifar10, imagenet2012, ...) must be
prepared beforehand, because arjax never downloads:

  tfds build cifar10 --file_format=array_record --data_dir=$ARJAX_DATA_DIR

The training pipeline is a grain `MapDataset`, so every batch is a pure
function of (seed, step) and the iterator's state is a single integer:

  positions 0..N-1 -> shuffle (reshuffled every epoch) -> repeat forever
    -> per-element flip and translation draws (seeded by seed and the element's
       index in this global stream, so they do not depend on the number of processes)
    -> shard: with G = global_batch_size and L = G // P, process p takes the
       contiguous block [k*G + p*L, k*G + (p+1)*L) of global batch k
    -> read + validate + resize/convert channels + flip + translate
    -> batch(L), normalise to [-1, 1]

With P processes, step k's local batches, concatenated in process order (as
`jax.make_array_from_process_local_data` assembles them), are exactly the
single-process batch k, row for row, whatever P is: per-row noise drawn over
the global batch then meets the same example, so a run's numbers do not depend
on the number of hosts. Since MapDataset is lazy, each process only reads its
own share.

Same-class groups (`config.data.group_size` = G > 1, ARFlow's training sequences): the
stream is cut into groups of G consecutive elements, element i belonging to group g = i // G.
Group g's first member is the g-th draw of the shuffled stream above (its anchor: every record
anchors one group per epoch); members 1 .. G-1 are drawn from the anchor's class, without
replacement and never the anchor itself (with replacement when the class has fewer than G
records), by an RNG seeded by (seed, g) alone. Flips and translations are then drawn per
element as above. So a batch of global_batch_size = k G images is k whole sequences, rows
[j G, (j + 1) G) one class, and the group is still a pure function of (seed, index): the
process sharding, the concatenation property and the iterator's one-integer state hold
unchanged. The split's labels are read once, up front (`source_labels`).

The steps before the read are `element_stream`; a VAE latent cache (config.data.latents,
arjax/data/latents.py) is read through the same stream, so it visits the same records with the
same flips as this pipeline would for the same seed.

Checkpointing the iterator through Orbax (as an item of a CheckpointManager):

  manager = ocp.CheckpointManager(dir, item_names=("state", "data_iter"))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data_iter=iterator_save_args(it)))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), data_iter=iterator_restore_args()))
  set_iterator_position(it, restored["data_iter"])

The item is one JSON file (written by process 0) holding the next batch number,
which is the same on every process; so a checkpoint written by 2 processes
resumes on 1 or on 16. (grain's own checkpoint handler writes one file per
process, named after the process count, which ties a checkpoint to its topology.)
"""
import contextlib
import dataclasses
import fcntl
import os
import sys
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

import grain
import numpy as np
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds

from arjax.data import digits

DATA_DIR_ENV = "ARJAX_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/arjax/tensorflow_datasets"

# Datasets arjax can prepare itself because their data ship with a dependency.
_BUILDERS = {"digits": digits.Digits}

# Separate random streams derived from the one data seed.
_SHUFFLE_STREAM = 0
_FLIP_STREAM = 1
_TRANSLATE_STREAM = 3
_GROUP_STREAM = 4


# -----------------------------------------------------------------------------
# Where datasets live, and preparing them.


def default_data_dir(data_dir: Optional[str]) -> str:
  """`data_dir`, else $ARJAX_DATA_DIR, else ~/.cache/arjax/tensorflow_datasets."""
  return os.path.expanduser(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


@contextlib.contextmanager
def _exclusive_lock(path: str):
  # TFDS writes into a temporary dir and renames it at the end; two processes
  # preparing at once would both write, and the second rename would fail.
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(name: str, data_dir: Optional[str]) -> None:
  """Makes `name` readable from `data_dir` as ArrayRecord, without downloading anything.

  `digits` is built from scikit-learn's bundled copy (once; later calls return
  at once, and concurrent callers wait for the first). Any other dataset must
  already be prepared; if it is not, this raises FileNotFoundError saying how.
  """
  root = default_data_dir(data_dir)
  if name in _BUILDERS:
    os.makedirs(root, exist_ok=True)
    with _exclusive_lock(os.path.join(root, f".{name}.prepare.lock")):
      builder = _BUILDERS[name](data_dir=root)
      if not builder.is_prepared():
        _build(builder, name, root)
    return
  _prepared_builder(name, root)


def _build(builder: tfds.core.DatasetBuilder, name: str, root: str) -> None:
  """Prepares `builder` as ArrayRecord, reporting it: TFDS's own bars on a terminal, and in a
  log file (where their carriage returns would garble it) one line before and one after."""
  import jax
  from arjax.util import progress

  report = jax.process_index() == 0
  bars = report and progress.mode() == "bar"
  start = time.perf_counter()
  if report:
    print(f"preparing TFDS dataset {name!r} in {root} from data bundled with a dependency "
          "(once; later runs reuse it)", file=sys.stderr, flush=True)
  tfds.display_progress_bar(bars)
  try:
    builder.download_and_prepare(file_format="array_record")
  finally:
    tfds.display_progress_bar(True)
  if report:
    splits = ", ".join(f"{split} {info.num_examples}" for split, info in builder.info.splits.items())
    print(f"prepared {name!r} ({splits} examples) in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)


def _prepared_builder(name: str, root: str) -> tfds.core.DatasetBuilder:
  """The builder of `name` in `root`, or an error explaining how to prepare it."""
  how = (f"arjax never downloads datasets; prepare it yourself, e.g.\n"
         f"  tfds build {name} --file_format=array_record --data_dir={root}\n"
         f"or, if it is prepared in another directory, point arjax there with "
         f"--config.data.data_dir=DIR or ${DATA_DIR_ENV}=DIR (now {root})")
  try:
    builder = tfds.builder(name, data_dir=root, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is neither known to TFDS nor prepared in {root}. {how}") from e
  if not builder.is_prepared():
    raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in {root}. {how}")
  file_format = builder.info.file_format
  if file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise FileNotFoundError(
        f"TFDS dataset {name!r} in {root} is stored as {file_format.value}, but arjax reads "
        f"random-access ArrayRecord files. {how}\n(or convert the existing copy with "
        f"`tfds convert_format --root_data_dir={root} --out_file_format=array_record`)")
  return builder


def data_source(data_cfg, split: str):
  """The random-access TFDS source of `split`: `len()`, and `[i]` gives a dict of numpy values."""
  root = default_data_dir(data_cfg.data_dir)
  return _prepared_builder(data_cfg.name, root).as_data_source(split=split)


def _declared_image_shape(source) -> Optional[tuple]:
  """The image shape the dataset's features declare (None entries: any), if it has features."""
  info = getattr(source, "dataset_info", None)
  if info is None or "image" not in info.features:
    return None
  return tuple(info.features["image"].shape)


# -----------------------------------------------------------------------------
# One record: validate, resize, convert channels.


def normalize(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1]; the one place this convention lives."""
  return np.asarray(images_uint8, np.float32) / np.float32(127.5) - np.float32(1.0)


def denormalize(images: np.ndarray) -> np.ndarray:
  """float in [-1, 1] -> uint8 pixels, rounded and clipped (inverse of `normalize`)."""
  pixels = (np.asarray(images, np.float32) + np.float32(1.0)) * np.float32(127.5)
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _record_name(record: Mapping[str, Any], position: int) -> str:
  if "index" in record:
    return f"record index={int(record['index'])} (position {position} in the source)"
  return f"record at position {position} of the source"


@dataclasses.dataclass(frozen=True)
class RecordDecoder:
  """Checks one source record and returns {'image': uint8 [S, S, C], 'label': int}.

  Images of another size are centre-cropped to a square and resized (bicubic,
  antialiased); grayscale becomes RGB by repetition and RGB becomes grayscale
  by ITU-R 601 luma. Anything malformed raises ValueError naming the record and
  the field, so bad data fails loudly at the record, not later in a model.
  """
  image_size: int
  channels: int
  num_classes: int
  # The image shape the dataset declares, None entries matching any size; None: not checked.
  declared_shape: Optional[tuple] = None

  @classmethod
  def from_config(cls, data_cfg, declared_shape: Optional[tuple] = None) -> "RecordDecoder":
    return cls(image_size=data_cfg.image_size, channels=data_cfg.channels,
               num_classes=data_cfg.num_classes, declared_shape=declared_shape)

  def __call__(self, record: Mapping[str, Any], position: int) -> dict:
    for field in ("image", "label"):
      if field not in record:
        raise ValueError(f"{_record_name(record, position)}: field '{field}' is missing "
                         f"(fields: {sorted(record)})")
    image = self._check_image(record, position)
    label = self._check_label(record, position)
    return {"image": self._to_target(image), "label": label}

  def _check_image(self, record, position) -> np.ndarray:
    image = record["image"]
    where = f"{_record_name(record, position)}: field 'image'"
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
      raise ValueError(f"{where} must be a uint8 array, got "
                       f"{getattr(image, 'dtype', type(image).__name__)}")
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or 0 in image.shape:
      raise ValueError(f"{where} must have shape [H, W, C] with C in (1, 3, 4), "
                       f"got {image.shape}")
    declared = self.declared_shape
    if declared is not None and (
        len(declared) != 3 or any(d is not None and d != s for d, s in zip(declared, image.shape))):
      raise ValueError(f"{where} has shape {image.shape}, but the dataset declares {declared}")
    return image

  def _check_label(self, record, position) -> int:
    label = record["label"]
    where = f"{_record_name(record, position)}: field 'label'"
    is_integer = isinstance(label, (int, np.integer)) or (
        isinstance(label, np.ndarray) and label.ndim == 0 and np.issubdtype(label.dtype, np.integer))
    if not is_integer or isinstance(label, (bool, np.bool_)):
      raise ValueError(f"{where} must be an integer scalar, got {label!r}")
    label = int(label)
    if not 0 <= label < self.num_classes:
      raise ValueError(f"{where} is {label}, outside [0, {self.num_classes}) "
                       f"(config.data.num_classes)")
    return label

  def _to_target(self, image: np.ndarray) -> np.ndarray:
    if image.shape[-1] == 4:  # RGBA: drop alpha.
      image = image[..., :3]
    size = self.image_size
    if image.shape[:2] != (size, size):
      image = _center_crop_resize(image, size)
    if image.shape[-1] != self.channels:
      if self.channels == 3:
        image = np.repeat(image, 3, axis=-1)
      else:
        luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        image = np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
    return image


def _center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  from PIL import Image  # Only datasets whose images differ from the target size need PIL here.

  h, w, c = image.shape
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  square = image[top:top + side, left:left + side]
  pil = Image.fromarray(square[..., 0] if c == 1 else square)
  resized = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None))
  return resized.reshape(size, size, c)


# -----------------------------------------------------------------------------
# The training pipeline.


def _derived_seed(seed: int, stream: int) -> int:
  # grain's shuffle uses seed + epoch for each epoch, so seeds s and s + 1 would
  # give the same stream one epoch apart; hashing the seed avoids that.
  return int(np.random.SeedSequence([seed % 2**64, stream]).generate_state(1, np.uint32)[0])


@dataclasses.dataclass(frozen=True)
class _FlipDraw:
  """(stream index, source position) -> (position, flip?), seeded by (seed, stream index)."""
  seed: Optional[int]

  def __call__(self, stream_index: int, position: int) -> tuple:
    if self.seed is None:
      return int(position), False
    rng = np.random.default_rng([self.seed, stream_index])
    return int(position), bool(rng.integers(2))


@dataclasses.dataclass(frozen=True)
class _TranslateDraw:
  """(stream index, (position, flip?)) -> (position, flip?, (dy, dx)), each shift uniform in
  [-max_shift, max_shift], seeded by (seed, stream index); (0, 0) when off."""
  seed: Optional[int]
  max_shift: int

  def __call__(self, stream_index: int, drawn: tuple) -> tuple:
    if self.seed is None:
      return (*drawn, (0, 0))
    rng = np.random.default_rng([self.seed, stream_index])
    dy, dx = rng.integers(-self.max_shift, self.max_shift + 1, size=2)
    return (*drawn, (int(dy), int(dx)))


def source_labels(source) -> np.ndarray:
  """The label of every record of `source`, int64 [N], in source order: one read per record
  (what same-class groups need, once per pipeline)."""
  return np.asarray([int(source[i]["label"]) for i in range(len(source))], np.int64)


@dataclasses.dataclass(frozen=True)
class _GroupMember:
  """Element i of the grouped stream -> the source position it reads (module docstring)."""
  anchors: grain.MapDataset     # the shuffled, repeated positions: anchors[g] is group g's
  members: tuple                # per class, its source positions (int64 arrays)
  labels: np.ndarray            # [N] each position's class
  group_size: int
  seed: int

  def __call__(self, index: int) -> int:
    group, member = divmod(int(index), self.group_size)
    anchor = int(self.anchors[group])
    if member == 0:
      return anchor
    pool = self.members[int(self.labels[anchor])]
    others = pool[pool != anchor]
    need = self.group_size - 1
    rng = np.random.default_rng([self.seed, group])
    if len(others) >= need:
      picked = rng.choice(len(others), size=need, replace=False)
    elif len(others):
      picked = rng.integers(len(others), size=need)
    else:  # a class of one record: the group repeats it
      return anchor
    return int(others[picked[member - 1]])


def group_positions(ds: grain.MapDataset, labels, group_size: int, seed: int
                    ) -> grain.MapDataset:
  """The stream of positions `ds` (shuffled, repeated) cut into same-class groups of
  `group_size` (module docstring); `labels` [N] the class of each source position."""
  labels = np.asarray(labels, np.int64)
  members = tuple(np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1))
  member = _GroupMember(ds, members, labels, group_size, _derived_seed(seed, _GROUP_STREAM))
  return grain.MapDataset.range(len(ds)).map(member)


def translate(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """image [H, W, C] moved down dy and right dx pixels; what leaves the frame is lost and what
  enters is 0 (the digits' background)."""
  if not dy and not dx:
    return image
  h, w = image.shape[:2]
  out = np.zeros_like(image)
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
      image[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
  return out


@dataclasses.dataclass(frozen=True)
class _ReadRecord:
  source: Any
  decode: RecordDecoder

  def __call__(self, drawn: tuple) -> dict:
    position, flip, shift = drawn
    example = self.decode(self.source[position], position)
    if flip:
      example["image"] = example["image"][:, ::-1]
    example["image"] = translate(example["image"], *shift)
    return example


def _collate(examples: Sequence[dict]) -> dict:
  return {"image": normalize(np.stack([e["image"] for e in examples])),
          "label": np.array([e["label"] for e in examples], np.int32)}


def element_stream(num_records: int, data_cfg, *, global_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1, labels=None
                   ) -> grain.MapDataset:
  """This process's endless stream of (source position, flip?, (dy, dx)) draws, before any
  reading. `labels` [num_records]: each record's class, needed (only) when
  `data_cfg.group_size` > 1, whose same-class groups it draws (module docstring).

  Shared by the image pipeline below and the latent cache (arjax/data/latents.py), so that both
  visit the same records in the same order with the same flips for the same seed.
  """
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  flip_seed = _derived_seed(seed, _FLIP_STREAM) if data_cfg.random_flip else None
  ds = grain.MapDataset.range(num_records).shuffle(seed=_derived_seed(seed, _SHUFFLE_STREAM))
  ds = ds.repeat()
  group = data_cfg.get("group_size", 1)
  if group > 1:
    if global_batch_size % group:
      raise ValueError(f"global_batch_size={global_batch_size} must be a multiple of "
                       f"config.data.group_size={group}")
    if labels is None or len(labels) != num_records:
      raise ValueError(f"config.data.group_size={group} needs the labels of all "
                       f"{num_records} records")
    ds = group_positions(ds, labels, group, seed)
  ds = ds.map_with_index(_FlipDraw(flip_seed))
  shift = data_cfg.random_translate
  ds = ds.map_with_index(_TranslateDraw(
      _derived_seed(seed, _TRANSLATE_STREAM) if shift else None, shift))
  if process_count == 1:
    return ds
  block = _ProcessBlock(ds, global_batch_size, process_index, process_count)
  return grain.MapDataset.range(len(ds) // process_count).map(block)


@dataclasses.dataclass(frozen=True)
class _ProcessBlock:
  """Local element i -> the global stream element it stands for (see the module docstring)."""
  stream: grain.MapDataset
  global_batch_size: int
  process_index: int
  process_count: int

  def __call__(self, index: int):
    local = self.global_batch_size // self.process_count
    step, row = divmod(index, local)
    return self.stream[step * self.global_batch_size + self.process_index * local + row]


def train_dataset(source, data_cfg, *, global_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1, declared_shape: Optional[tuple] = None
                  ) -> grain.MapDataset:
  """The infinite training MapDataset of this process's batches over any random-access `source`.

  `source` is anything with `len()` and `[i]` giving dicts with 'image' and
  'label' (a TFDS data source, or a list in tests). Element k is this process's
  share of global batch k: {'image': float32 [b, S, S, C] in [-1, 1],
  'label': int32 [b]} with b = global_batch_size // process_count.
  """
  if len(source) == 0:
    raise ValueError(f"the training source {source} is empty")
  labels = source_labels(source) if data_cfg.get("group_size", 1) > 1 else None
  ds = element_stream(len(source), data_cfg, global_batch_size=global_batch_size, seed=seed,
                      process_index=process_index, process_count=process_count, labels=labels)
  ds = ds.map(_ReadRecord(source, RecordDecoder.from_config(data_cfg, declared_shape)))
  return ds.batch(global_batch_size // process_count, drop_remainder=True, batch_fn=_collate)


def make_train_iterator(data_cfg, *, global_batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """This process's endless iterator of training batches (see `train_dataset`).

  Checkpointable: `get_state()` / `set_state()` (a dict with the next batch
  number), or through Orbax with `iterator_save_args` / `iterator_restore_args`.
  `data_cfg.worker_count` threads decode batches ahead of time (0: in the caller's thread).
  """
  source = data_source(data_cfg, data_cfg.train_split)
  ds = train_dataset(source, data_cfg, global_batch_size=global_batch_size, seed=seed,
                     process_index=process_index, process_count=process_count,
                     declared_shape=_declared_image_shape(source))
  return iterate(ds, data_cfg.worker_count)


def iterate(ds: grain.MapDataset, worker_count: int) -> grain.DatasetIterator:
  """A checkpointable iterator over batches, `worker_count` threads reading ahead."""
  # The buffer holds whole batches, so a couple per thread keeps them busy without
  # hoarding memory (grain's default of 500 elements assumes single examples).
  read_options = grain.ReadOptions(num_threads=worker_count, prefetch_buffer_size=2 * worker_count)
  return iter(ds.to_iter_dataset(read_options))


def iterator_save_args(iterator: grain.DatasetIterator) -> ocp.args.CheckpointArgs:
  """Orbax args saving `iterator`'s position (JSON), as an item of a Composite checkpoint.

  Taken now, synchronously: batches drawn while an asynchronous save is still
  writing do not leak into it.
  """
  return ocp.args.JsonSave(dict(iterator.get_state()))


def iterator_restore_args() -> ocp.args.CheckpointArgs:
  """Orbax args reading a position saved by `iterator_save_args`; give the result to
  `set_iterator_position`."""
  return ocp.args.JsonRestore()


def set_iterator_position(iterator: grain.DatasetIterator, position) -> None:
  """Moves `iterator` to a saved position: the dict `iterator_save_args` wrote, or a plain
  batch number (what a checkpoint without a data item implies: one batch per step)."""
  if isinstance(position, int):
    position = {"next_index": position}
  expected = set(iterator.get_state())
  if not isinstance(position, dict) or set(position) != expected:
    raise ValueError(f"saved data position {position!r} does not fit this pipeline's iterator "
                     f"(fields {sorted(expected)})")
  iterator.set_state(position)


# -----------------------------------------------------------------------------
# Whole splits, for evaluation.


def load_split(data_cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
  """All of `split`: images uint8 [N, S, S, C] and labels int64 [N], in the prepared files' order.

  Validated, resized and channel-converted like the training pipeline, never flipped.
  """
  source = data_source(data_cfg, split)
  decode = RecordDecoder.from_config(data_cfg, _declared_image_shape(source))
  n, size = len(source), data_cfg.image_size
  images = np.empty((n, size, size, data_cfg.channels), np.uint8)
  labels = np.empty((n,), np.int64)
  for position in range(n):
    example = decode(source[position], position)
    images[position], labels[position] = example["image"], example["label"]
  return images, labels


def split_image_batches(data_cfg, split: str, batch_size: int, *, process_index: int = 0,
                        process_count: int = 1) -> Iterator[np.ndarray]:
  """This process's share of `split`, as uint8 image batches [<= batch_size, S, S, C], streamed
  (decoded like `load_split`, never flipped), so that memory does not grow with the split.

  Process p of P reads the contiguous block of records [p * N // P, (p + 1) * N // P): the
  blocks cover the split once, whatever P.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  source = data_source(data_cfg, split)
  decode = RecordDecoder.from_config(data_cfg, _declared_image_shape(source))
  n = len(source)
  start, stop = process_index * n // process_count, (process_index + 1) * n // process_count
  for first in range(start, stop, batch_size):
    positions = range(first, min(first + batch_size, stop))
    yield np.stack([decode(source[i], i)["image"] for i in positions])
