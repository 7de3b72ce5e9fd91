"""Images for fine-tuning: the shared sources + host-side preprocessing, seeded batches.

Each split is read once through ``transfer.sources`` and prepared to uint8 at
the model's resolution with ``transfer.preprocess.prepare`` (the code the
embed pipeline uses); normalisation happens on the device inside the jitted
step. The batch for training step ``s`` is a pure function of (seed, s), so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Iterator, Optional

import numpy as np
import tqdm

from transfer import preprocess
from transfer.errors import UserError
from transfer.sources import Source

log = logging.getLogger(__name__)

# Above this many bytes a split is prepared into a memory-mapped .npy file in the
# workdir instead of RAM (a 224x224 ImageNet-size split does not fit in RAM).
MEMMAP_BYTES = 2 << 30


@dataclasses.dataclass
class Split:
  """A prepared split: uint8 NHWC images and int32 labels."""

  name: str
  images: np.ndarray  # (N, H, W, 3) uint8
  labels: np.ndarray  # (N,) int32
  skipped: int = 0  # examples that failed to decode/preprocess

  def __len__(self) -> int:
    return len(self.labels)


def _hide_gpus_from_tensorflow():
  # TFDS pulls in TensorFlow; left alone it may reserve GPU memory that JAX needs.
  tf = sys.modules.get('tensorflow')
  if tf is not None:
    try:
      tf.config.set_visible_devices([], 'GPU')
    except Exception:  # already initialised: nothing to hide any more
      pass


def load_split(source: Source, split: str, cfg: preprocess.PreprocessConfig,
               limit: Optional[int] = None, cache_dir: Optional[str] = None,
               memmap_bytes: int = MEMMAP_BYTES, progress: bool = True) -> Split:
  """Reads and prepares ``split`` (at most ``limit`` examples); bad images are skipped."""
  source.check_split(split)
  n = source.num_examples(split)
  if limit is not None:
    n = limit if n is None else min(n, limit)
  if n is None:  # a source that cannot count: read it all into RAM
    examples = list(source.iter_examples(split))
    n = len(examples)
    it = iter(examples)
  else:
    it = source.iter_examples(split, 0, n)
  _hide_gpus_from_tensorflow()
  shape = (n, *cfg.output_shape)
  if cache_dir and np.prod(shape) > memmap_bytes:
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f'{split}.npy')
    images = np.lib.format.open_memmap(path, mode='w+', dtype=np.uint8, shape=shape)
  else:
    images = np.empty(shape, np.uint8)
  labels = np.empty((n,), np.int32)
  i = skipped = 0
  for ex in tqdm.tqdm(it, total=n, desc=f'prepare {split}', unit='img', file=sys.stderr,
                      disable=not progress, leave=False):
    if i >= n:
      break
    try:
      images[i] = preprocess.prepare(ex.image, cfg)
    except preprocess.ImageError as e:
      skipped += 1
      log.warning('skipping %s: %s', ex.id, e)
      continue
    labels[i] = ex.label
    i += 1
  if skipped:
    log.warning('%s: skipped %d unreadable image(s) of %d', split, skipped, i + skipped)
  if i == 0:
    raise UserError(f'split {split!r} of {source.name} has no usable images')
  return Split(split, images[:i], labels[:i], skipped)


def check_labels(split: Split, num_classes: int) -> None:
  bad = (split.labels < 0) | (split.labels >= num_classes)
  if bad.any():
    raise UserError(f'split {split.name!r} has label {int(split.labels[bad][0])} but the '
                    f'head has {num_classes} classes')


def steps_per_epoch(n: int, batch_size: int) -> int:
  if n < batch_size:
    raise UserError(f'batch size {batch_size} is larger than the {n} training examples; '
                    'lower --batch_size')
  return n // batch_size  # fixed shapes: the remainder waits for the next epoch's shuffle


def train_batch(split: Split, batch_size: int, step: int, seed: int,
                augment: bool = False) -> dict[str, np.ndarray]:
  """The batch for global step ``step``: a seeded per-epoch permutation, drop-remainder."""
  per_epoch = steps_per_epoch(len(split), batch_size)
  epoch, k = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(len(split))
  idx = np.sort(perm[k * batch_size:(k + 1) * batch_size])  # sorted: faster memmap reads
  images = split.images[idx]
  if augment:
    images = random_shift(images, np.random.default_rng([seed, epoch, k, 1]))
  return {'image': images, 'label': split.labels[idx]}


def random_shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Light augmentation: translate each image by up to 1/8 of its size (edge padded)."""
  _, h, w, _ = images.shape
  ph, pw = max(1, h // 8), max(1, w // 8)
  padded = np.pad(images, ((0, 0), (ph, ph), (pw, pw), (0, 0)), mode='edge')
  dy = rng.integers(0, 2 * ph + 1, len(images))
  dx = rng.integers(0, 2 * pw + 1, len(images))
  return np.stack([p[y:y + h, x:x + w] for p, y, x in zip(padded, dy, dx)])


def eval_batches(split: Split, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-size batches in order; the last is padded, ``mask`` marks real examples."""
  n = len(split)
  for start in range(0, n, batch_size):
    images = split.images[start:start + batch_size]
    labels = split.labels[start:start + batch_size]
    real = len(labels)
    if real < batch_size:  # pad: one compiled shape for every batch
      pad = batch_size - real
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
    mask = np.arange(batch_size) < real
    yield {'image': images, 'label': labels, 'mask': mask}
