"""The built-in dataset: scikit-learn's bundled ``load_digits`` as a TFDS builder.

1,797 real 8x8 grayscale digits (values 0..16, scaled to uint8 0..255), 10
classes, a fixed seeded stratified train/test split. No download: the data
ships inside scikit-learn, so CI and tests prepare it in seconds.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

SEED = 0  # the train/test split never changes
TEST_FRACTION = 0.2


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's digits: 1,437 train / 360 test images, 8x8x1 uint8."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'scikit-learn load_digits, stratified 80/20 split (seed 0).'}
  # No download, so no checksums file to look up next to the code. Also keeps
  # TFDS from resolving the module path through `importlib_resources`, which
  # tensorflow-datasets uses without declaring it.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
            'id': tfds.features.Text(),  # 'digits/<index in load_digits>'
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top

    _, labels = _load()
    train, test = train_test_split(np.arange(len(labels)), test_size=TEST_FRACTION,
                                   random_state=SEED, stratify=labels)
    return {'train': self._generate_examples(sorted(train)),
            'test': self._generate_examples(sorted(test))}

  def _generate_examples(self, indices):
    images, labels = _load()
    for i in indices:
      yield int(i), {'image': images[i], 'label': int(labels[i]), 'id': f'digits/{i}'}


def _load() -> tuple[np.ndarray, np.ndarray]:
  """(N, 8, 8, 1) uint8 images scaled from 0..16 to 0..255, (N,) int labels."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  d = load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, d.target.astype(np.int64)


def default_data_dir() -> str:
  return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def prepare(data_dir: Optional[str] = None) -> Digits:
  """The digits builder, prepared in ``data_dir`` (array_record) if not yet there.

  Two processes preparing into the same empty ``data_dir`` would both write and
  then race to rename their result into place: a lock file makes the second
  wait and then find the dataset prepared.
  """
  data_dir = data_dir or default_data_dir()
  builder = Digits(data_dir=data_dir, file_format='array_record')
  if builder.is_prepared():
    return builder
  with _lock(data_dir):
    builder = Digits(data_dir=data_dir, file_format='array_record')
    if not builder.is_prepared():
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(
              try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


@contextlib.contextmanager
def _lock(data_dir: str):
  """An exclusive lock on ``data_dir/digits.lock`` (local dirs; others go unlocked)."""
  if '://' in data_dir:
    yield
    return
  import fcntl  # pylint: disable=g-import-not-at-top

  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, 'digits.lock'), 'a') as fh:
    fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
    yield
