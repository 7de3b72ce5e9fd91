"""Images for fine-tuning: the shared sources + host-side preprocessing, seeded batches.

Each split is read once through ``clip_transfer.data.sources`` and prepared to uint8 at
the model's resolution with ``clip_transfer.data.preprocess.prepare`` (the code the
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

from clip_transfer.data import preprocess
from clip_transfer.protocol import validation
from clip_transfer.errors import UserError
from clip_transfer.data.sources import Source

log = logging.getLogger(__name__)

# Above this many bytes a split is prepared into a memory-mapped .npy file in the
# scratch directory instead of RAM (a 224x224 ImageNet-size split does not fit in RAM).
MEMMAP_BYTES = 2 << 30


@dataclasses.dataclass
class Split:
  """A prepared split: uint8 NHWC images and int32 labels."""

  name: str
  images: np.ndarray  # (N, H, W, 3) uint8
  labels: np.ndarray  # (N,) int32
  ids: list  # the source's example ids (the validation split is drawn by id)
  skipped: int = 0  # examples that failed to decode/preprocess

  def __len__(self) -> int:
    return len(self.labels)

  def subset(self, idx: np.ndarray, name: str) -> 'Split':
    """The examples at ``idx`` (in that order)."""
    idx = np.asarray(idx)
    return Split(name, self.images[idx], self.labels[idx], [self.ids[i] for i in idx])

  def sorted_by_id(self) -> 'Split':
    """Eval order: every stage's predictions line up example for example."""
    return self.subset(validation.eval_order(self.ids), self.name)


def _hide_gpus_from_tensorflow():
  # TFDS pulls in TensorFlow; left alone it may reserve GPU memory that JAX needs.
  tf = sys.modules.get('tensorflow')
  if tf is not None:
    try:
      tf.config.set_visible_devices([], 'GPU')
    except Exception:  # already initialised: nothing to hide any more
      pass


def load_split(source: Source, split: str, cfg: preprocess.PreprocessConfig,
               limit: Optional[int] = None, scratch_dir: Optional[str] = None,
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
  if scratch_dir and np.prod(shape) > memmap_bytes:
    path = os.path.join(scratch_dir, f'{split}.npy')
    images = np.lib.format.open_memmap(path, mode='w+', dtype=np.uint8, shape=shape)
  else:
    images = np.empty(shape, np.uint8)
  labels = np.empty((n,), np.int32)
  ids = []
  i = skipped = 0
  bar = tqdm.tqdm(total=n, desc=f'prepare {split}', unit='img', file=sys.stderr,
                  disable=not progress, leave=False)
  try:
    for ex in it:
      if i >= n:
        break
      bar.update(1)
      try:
        images[i] = preprocess.prepare(ex.image, cfg)
      except Exception as e:  # ImageError, and anything else PIL raises on odd inputs
        skipped += 1
        log.warning('skipping %s: %s: %s', ex.id, type(e).__name__, e)
        continue
      labels[i] = ex.label
      ids.append(ex.id)
      i += 1
  except OSError as e:  # the source could not read a file (permissions, vanished, network)
    raise UserError(f'split {split!r}: cannot read an input ({type(e).__name__}: '
                    f'{str(e).splitlines()[0] if str(e) else ""}); fix or remove it') from None
  finally:
    bar.close()
  problems = source.problems(split) if limit is None else []
  for ex_id, reason in problems[:5]:  # found but unusable: counted, never silently dropped
    log.warning('skipping %s: %s', ex_id, reason)
  skipped += len(problems)
  if skipped:
    log.warning('%s: skipped %d unusable input(s) of %d', split, skipped, i + skipped)
  if i == 0:
    raise UserError(f'split {split!r} of {source.name} has no usable images')
  return Split(split, images[:i], labels[:i], ids, skipped)


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
