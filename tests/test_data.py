"""The data layer: the digits TFDS builder, the grain pipeline and its checkpoints, validation."""
import os
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from arjax.config import schema as configs
from arjax.data import digits, pipeline
from conftest import REPO_ROOT


def _digits_data(data_dir, **overrides):
  cfg = configs.load(str(REPO_ROOT / "configs/digits.py")).data
  cfg.data_dir = data_dir
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(expected, actual):
  assert len(expected) == len(actual)
  for a, b in zip(expected, actual):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


# An in-memory source whose record at position p has every pixel equal to p, so
# batches show which records they hold.
_TOY_SIZE = 24


def _toy_source(n=_TOY_SIZE):
  return [{"image": np.full((2, 2, 1), p, np.uint8), "label": p % 10, "index": p} for p in range(n)]


def _toy_data(**overrides):
  return _digits_data(None, image_size=2, **overrides)


def _positions(batch):
  return pipeline.denormalize(batch["image"])[:, 0, 0, 0].tolist()


# -----------------------------------------------------------------------------
# The builder and whole splits.


def test_builder_writes_the_documented_split(data_dir):
  sk = load_digits()
  expected_images = np.round(sk.images * 255.0 / 16.0).astype(np.uint8)[..., None]
  sizes = {}
  for split in ("train", "test"):
    source = tfds.data_source("digits", split=split, data_dir=data_dir, download=False)
    records = [source[i] for i in range(len(source))]
    indices = np.array([r["index"] for r in records])
    sizes[split] = len(records)
    np.testing.assert_array_equal(np.sort(indices), digits.split_indices(split))
    assert all((indices % 4 == 0) == (split == "test"))
    images = np.stack([r["image"] for r in records])
    assert images.dtype == np.uint8 and images.shape == (len(records), 8, 8, 1)
    np.testing.assert_array_equal(images, expected_images[indices])
    np.testing.assert_array_equal([r["label"] for r in records], sk.target[indices])
  assert sizes == {"train": 1347, "test": 450}


def test_prepare_twice_and_concurrently_is_safe(data_dir, tmp_path):
  pipeline.prepare("digits", data_dir)  # Already prepared: returns without rebuilding.
  fresh = str(tmp_path / "fresh")
  code = ("import tensorflow_datasets as tfds; tfds.disable_progress_bar()\n"
          f"from arjax.data import pipeline; pipeline.prepare('digits', {fresh!r})")
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
           for _ in range(2)]
  for proc in procs:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
  assert len(tfds.data_source("digits", split="test", data_dir=fresh, download=False)) == 450


def test_load_split_is_the_whole_split_in_file_order(data_dir):
  images, labels = pipeline.load_split(_digits_data(data_dir), "test")
  assert images.shape == (450, 8, 8, 1) and images.dtype == np.uint8
  assert labels.shape == (450,) and labels.dtype == np.int64
  source = tfds.data_source("digits", split="test", data_dir=data_dir, download=False)
  np.testing.assert_array_equal(images[5], source[5]["image"])
  assert labels[5] == source[5]["label"]
  # Other sizes and channel counts are produced the way the trainer would see them.
  rgb, _ = pipeline.load_split(_digits_data(data_dir, image_size=16, channels=3), "test")
  assert rgb.shape == (450, 16, 16, 3)
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_normalize_round_trips():
  pixels = np.arange(256, dtype=np.uint8)
  x = pipeline.normalize(pixels)
  assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
  np.testing.assert_array_equal(pipeline.denormalize(x), pixels)
  np.testing.assert_array_equal(pipeline.denormalize(np.array([-3.0, 3.0])), [0, 255])


# -----------------------------------------------------------------------------
# The training pipeline.


def test_batches_are_seeded_normalised_and_typed(data_dir):
  data = _digits_data(data_dir)
  first = _take(pipeline.make_train_iterator(data, global_batch_size=32, seed=0), 3)
  again = _take(pipeline.make_train_iterator(data, global_batch_size=32, seed=0), 3)
  other = _take(pipeline.make_train_iterator(data, global_batch_size=32, seed=1), 3)
  _assert_same_batches(first, again)
  assert not np.array_equal(first[0]["image"], other[0]["image"])
  batch = first[0]
  assert batch["image"].dtype == np.float32 and batch["image"].shape == (32, 8, 8, 1)
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["label"].dtype == np.int32 and batch["label"].shape == (32,)
  assert 0 <= batch["label"].min() and batch["label"].max() < 10


def test_every_epoch_is_a_fresh_permutation_and_seeds_do_not_alias():
  # One batch = one epoch here. grain reshuffles epoch e with seed + e, which
  # would make seed 1 replay seed 0 one epoch late; the pipeline must not.
  def epochs(seed):
    ds = pipeline.train_dataset(_toy_source(), _toy_data(), global_batch_size=_TOY_SIZE, seed=seed)
    return [_positions(ds[k]) for k in range(3)]

  seed0, seed1 = epochs(0), epochs(1)
  for epoch in seed0 + seed1:
    assert sorted(epoch) == list(range(_TOY_SIZE))
  assert seed0[0] != seed0[1] != seed0[2]
  assert seed1[0] != seed0[1] and seed1[1] != seed0[2]


def test_process_shards_are_disjoint_and_make_up_the_global_batches():
  data = _toy_data()
  steps = _TOY_SIZE // 8  # One epoch at global batch 8.

  def batches(process_index, process_count):
    ds = pipeline.train_dataset(_toy_source(), data, global_batch_size=8, seed=3,
                                process_index=process_index, process_count=process_count)
    return [_positions(ds[k]) for k in range(steps)]

  shard0, shard1, whole = batches(0, 2), batches(1, 2), batches(0, 1)
  seen0, seen1 = sum(shard0, []), sum(shard1, [])
  assert len(shard0[0]) == len(shard1[0]) == 4
  assert not set(seen0) & set(seen1)
  assert sorted(seen0 + seen1) == list(range(_TOY_SIZE))
  # Step k's shards, in process order, are the single-process batch k row for row: the
  # global array assembled from them is the same whatever the number of processes.
  for k in range(steps):
    assert shard0[k] + shard1[k] == whole[k]
  quarters = [batches(p, 4) for p in range(4)]
  for k in range(steps):
    assert sum((q[k] for q in quarters), []) == whole[k]


def test_a_saved_data_position_fits_any_process_count(data_dir, tmp_path):
  data = _digits_data(data_dir)
  two = [pipeline.make_train_iterator(data, global_batch_size=32, seed=0, process_index=p,
                                      process_count=2) for p in range(2)]
  for it in two:
    _take(it, 3)
  with ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data_iter",)) as manager:
    manager.save(3, args=ocp.args.Composite(data_iter=pipeline.iterator_save_args(two[0])))
    manager.wait_until_finished()
    restored = manager.restore(3, args=ocp.args.Composite(
        data_iter=pipeline.iterator_restore_args()))
  one = pipeline.make_train_iterator(data, global_batch_size=32, seed=0)
  pipeline.set_iterator_position(one, restored["data_iter"])
  expected = [np.concatenate([next(it)["image"] for it in two]) for _ in range(2)]
  for want, got in zip(expected, _take(one, 2)):
    np.testing.assert_array_equal(got["image"], want)


def test_a_data_position_of_another_pipeline_is_refused(data_dir):
  it = pipeline.make_train_iterator(_digits_data(data_dir), global_batch_size=32, seed=0)
  with pytest.raises(ValueError, match="does not fit"):
    pipeline.set_iterator_position(it, {"last_seen_index": 3})


def test_global_batch_size_must_split_evenly_over_processes(data_dir):
  with pytest.raises(ValueError, match="global_batch_size"):
    pipeline.make_train_iterator(_digits_data(data_dir), global_batch_size=9, seed=0,
                                 process_index=0, process_count=2)


def test_random_flip_is_per_element_and_reproducible():
  # Asymmetric images: column 0 holds the position, column 1 is 0.
  source = [{"image": np.array([[[p], [0]], [[p], [0]]], np.uint8), "label": 0}
            for p in range(1, 201)]

  def first_batch(flip):
    ds = pipeline.train_dataset(source, _toy_data(random_flip=flip), global_batch_size=200, seed=0)
    return pipeline.denormalize(ds[0]["image"])

  plain, flipped = first_batch(False), first_batch(True)
  np.testing.assert_array_equal(flipped, first_batch(True))
  was_flipped = (flipped[:, 0, 0, 0] == 0)
  np.testing.assert_array_equal(flipped[was_flipped], plain[was_flipped][:, :, ::-1])
  np.testing.assert_array_equal(flipped[~was_flipped], plain[~was_flipped])
  assert 60 < was_flipped.sum() < 140


def test_random_translation_moves_each_image_by_its_own_seeded_shift():
  # 5x5 images with one bright pixel at the centre: where it lands is the shift.
  centre = np.zeros((5, 5, 1), np.uint8)
  centre[2, 2] = 255
  source = [{"image": centre, "label": 0}] * 300

  def first_batch(shift):
    data = _digits_data(None, image_size=5, random_translate=shift)
    return pipeline.denormalize(pipeline.train_dataset(source, data, global_batch_size=300,
                                                       seed=0)[0]["image"])

  moved = first_batch(1)
  np.testing.assert_array_equal(moved, first_batch(1))
  np.testing.assert_array_equal(first_batch(0), np.broadcast_to(centre, moved.shape))
  where = np.array([np.unravel_index(np.argmax(m[..., 0]), (5, 5)) for m in moved]) - 2
  assert np.all(moved.reshape(300, -1).max(1) == 255) and np.all(np.abs(where) <= 1)
  # Every one of the 9 shifts occurs, about equally often.
  counts = np.unique(where, axis=0, return_counts=True)[1]
  assert len(counts) == 9 and counts.min() > 15
  # What leaves the frame is lost, what enters is background.
  np.testing.assert_array_equal(pipeline.translate(np.arange(9).reshape(3, 3, 1), 1, -1)[..., 0],
                                [[0, 0, 0], [1, 2, 0], [4, 5, 0]])


def test_get_state_set_state_resumes_exactly(data_dir):
  data = _digits_data(data_dir, random_flip=True)
  original = pipeline.make_train_iterator(data, global_batch_size=64, seed=7)
  _take(original, 5)
  state = original.get_state()
  expected = _take(original, 3)
  # Decoding in worker threads changes nothing about the batches.
  resumed = pipeline.make_train_iterator(_digits_data(data_dir, random_flip=True, worker_count=2),
                                         global_batch_size=64, seed=7)
  resumed.set_state(state)
  _assert_same_batches(expected, _take(resumed, 3))


def test_orbax_checkpoint_manager_resumes_exactly(data_dir, tmp_path):
  data = _digits_data(data_dir)
  original = pipeline.make_train_iterator(data, global_batch_size=32, seed=0)
  state = {"w": np.arange(4.0)}
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                         enable_async_checkpointing=True)
  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("state", "data_iter"),
                                  options=options)
  for step in (2, 4):
    _take(original, 2)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data_iter=pipeline.iterator_save_args(original)))
  # Batches drawn while the asynchronous save is still running must not leak into it.
  expected = _take(original, 3)
  manager.wait_until_finished()
  manager.close()

  resumed = pipeline.make_train_iterator(data, global_batch_size=32, seed=0)
  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("state", "data_iter"))
  assert manager.latest_step() == 4
  restored = manager.restore(4, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(state), data_iter=pipeline.iterator_restore_args()))
  manager.close()
  pipeline.set_iterator_position(resumed, restored["data_iter"])
  np.testing.assert_array_equal(restored["state"]["w"], state["w"])
  _assert_same_batches(expected, _take(resumed, 3))


# -----------------------------------------------------------------------------
# Validation and errors.


def _good_record():
  return {"image": np.zeros((8, 8, 1), np.uint8), "label": 3, "index": 7}


@pytest.mark.parametrize("change, field, message", [
    (dict(image=np.zeros((8, 8, 1), np.float32)), "image", "uint8"),
    (dict(image=np.zeros((8, 8), np.uint8)), "image", "shape"),
    (dict(image=np.zeros((8, 8, 2), np.uint8)), "image", "shape"),
    (dict(image=np.zeros((9, 8, 1), np.uint8)), "image", "declares"),
    (dict(label=10), "label", "outside"),
    (dict(label=-1), "label", "outside"),
    (dict(label=np.array([1, 2])), "label", "integer"),
    (dict(label=None), "label", "missing"),
])
def test_bad_records_name_the_record_and_field(change, field, message):
  record = _good_record()
  record.update(change)
  record = {k: v for k, v in record.items() if v is not None}
  decode = pipeline.RecordDecoder(image_size=8, channels=1, num_classes=10,
                                  declared_shape=(8, 8, 1))
  with pytest.raises(ValueError, match=message) as error:
    decode(record, position=3)
  assert "index=7" in str(error.value) and f"'{field}'" in str(error.value)


def test_bad_record_fails_the_training_iterator_naming_its_position():
  source = _toy_source(8)
  source[5] = {"image": np.zeros((2, 2, 1), np.uint8), "label": 42}
  ds = pipeline.train_dataset(source, _toy_data(), global_batch_size=8, seed=0)
  with pytest.raises(ValueError, match=r"position 5 .*'label' is 42"):
    next(iter(ds.to_iter_dataset()))


@pytest.fixture
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("name", ["cifar10", "no_such_dataset"])
def test_unprepared_dataset_gives_instructions_and_never_downloads(name, tmp_path, no_network):
  with pytest.raises(FileNotFoundError,
                     match=f"tfds build {name} --file_format=array_record --data_dir="):
    pipeline.prepare(name, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="never downloads"):
    pipeline.load_split(_digits_data(str(tmp_path), name=name), "test")
  assert not any(tmp_path.iterdir())


def test_default_data_dir(monkeypatch):
  assert pipeline.default_data_dir("/x") == "/x"
  monkeypatch.setenv("ARJAX_DATA_DIR", "/from/env")
  assert pipeline.default_data_dir(None) == "/from/env"
  monkeypatch.delenv("ARJAX_DATA_DIR")
  assert pipeline.default_data_dir(None) == os.path.expanduser("~/.cache/arjax/tensorflow_datasets")
