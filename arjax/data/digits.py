"""TFDS builder `digits`: scikit-learn's bundled 8x8 handwritten digits.

The 1797 images ship inside scikit-learn (`sklearn.datasets.load_digits`), so
preparing this dataset reads no network. Pixel values 0..16 are stored as
uint8 `round(value * 255 / 16)`.

Features:
  image  uint8 [8, 8, 1]
  label  ClassLabel(num_classes=10), the digit
  index  int64, the image's position in scikit-learn's order, so any record
         can be traced back to its source (and named in error messages)

Fixed split, by position in scikit-learn's order:
  test   indices i with i % 4 == 0 (450 images)
  train  every other index (1347 images)

A deterministic split by index, not a random one, so the split never depends
on a seed or on scikit-learn's shuffling, and both splits keep all writers and
classes (the set is ordered by writer, then digit).

Importing this module registers the builder with TFDS, after which
`tfds.data_source('digits', data_dir=...)` reads a prepared copy.
"""
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

NUM_IMAGES = 1797
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
# Raw scikit-learn pixels are integers in [0, MAX_RAW_VALUE].
MAX_RAW_VALUE = 16
TEST_EVERY = 4


def split_indices(split: str) -> np.ndarray:
  """Positions in scikit-learn's order that make up `split` ('train' or 'test')."""
  indices = np.arange(NUM_IMAGES)
  if split == "test":
    return indices[indices % TEST_EVERY == 0]
  if split == "train":
    return indices[indices % TEST_EVERY != 0]
  raise ValueError(f"digits has splits 'train' and 'test', not {split!r}")


def load_raw() -> tuple[np.ndarray, np.ndarray]:
  """All 1797 images as uint8 [N, 8, 8, 1] in 0..255 and labels int64 [N], in sklearn order."""
  # Imported here so that registering the builder does not import scikit-learn.
  from sklearn.datasets import load_digits

  data = load_digits()
  images = np.round(data.images * 255.0 / MAX_RAW_VALUE).astype(np.uint8)[..., None]
  return images, data.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits with a fixed index-based train/test split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: test = indices i % 4 == 0, train = the rest."}
  # TFDS 4.9.10 derives this via `importlib_resources`, which it only declares as a dependency
  # for Python < 3.9, so the lookup fails on newer Pythons; the module file is all it needs.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=IMAGE_SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn.
    images, labels = load_raw()
    return {split: self._generate_examples(images, labels, split_indices(split))
            for split in ("train", "test")}

  def _generate_examples(self, images, labels, indices):
    # TFDS PNG-encodes numpy images with TensorFlow but PIL images with PIL; arjax runs without TF.
    from PIL import Image

    for i in indices:
      image = Image.fromarray(images[i][..., 0], mode="L")
      yield int(i), {"image": image, "label": int(labels[i]), "index": int(i)}
