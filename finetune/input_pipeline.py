"""Images for fine-tuning: the shared sources + host-side preprocessing, seeded batches.

Each split is read once through the source contract (``Source.inputs``: an example or a
dead input, the function the embed stage's Beam reader calls too) and prepared to uint8
at the model's resolution on every core by ``clip_transfer.data.preprocess``'s
``ParallelPrepare`` (the embed stage's host preprocessing: one implementation). Inputs
that cannot be read, decoded or preprocessed are dead letters, counted and kept with the
split exactly as embed counts them; they never stop the run. Normalisation happens on
the device inside the jitted step. The batch for training step ``s`` is a pure function
of (seed, s), so a resumed run sees exactly the batches an uninterrupted one would;
``Prefetch`` assembles them ahead of the step on a background thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import sys
import threading
from typing import Callable, Iterator, Optional

import numpy as np
import tqdm

from clip_transfer.data import preprocess
from clip_transfer.data.base import Dead, Example, Source, failure_reason
from clip_transfer.protocol import validation
from clip_transfer.errors import UserError

log = logging.getLogger(__name__)

# Above this many bytes a split is prepared into a memory-mapped .npy file in the
# scratch directory instead of RAM (a 224x224 ImageNet-size split does not fit in RAM).
MEMMAP_BYTES = 2 << 30
# Images in flight in the preparation pool: enough to keep every core busy while the
# reader waits on a file, small enough to hold (256 x 224x224x3 uint8 ~ 38 MB).
PREPARE_WINDOW = 256


@dataclasses.dataclass
class Split:
  """A prepared split: uint8 NHWC images and int32 labels."""

  name: str
  images: np.ndarray  # (N, H, W, 3) uint8
  labels: np.ndarray  # (N,) int32
  ids: list  # the source's example ids (the validation split is drawn by id)
  dead: list = dataclasses.field(default_factory=list)  # Dead inputs, as embed dead-letters

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
               memmap_bytes: int = MEMMAP_BYTES, progress: bool = True,
               threads: int = 0) -> Split:
  """Reads and prepares the first ``limit`` inputs of ``split`` (all by default).

  ``threads``: preparation threads (0: one per core; 1: inline). Dead inputs are kept
  in ``Split.dead``, never raised.
  """
  source.check_split(split)
  n = source.num_examples(split)  # inputs, dead ones included: an upper bound on examples
  if limit is not None:
    n = limit if n is None else min(n, limit)
  inputs = source.inputs(split, 0, limit)
  if n is None:  # a source that cannot count: read it all into RAM
    inputs = list(inputs)
    n = len(inputs)
  _hide_gpus_from_tensorflow()
  shape = (n, *cfg.output_shape)
  if scratch_dir and np.prod(shape) > memmap_bytes:
    path = os.path.join(scratch_dir, f'{split}.npy')
    images = np.lib.format.open_memmap(path, mode='w+', dtype=np.uint8, shape=shape)
  else:
    images = np.empty(shape, np.uint8)
  labels = np.empty((n,), np.int32)
  ids: list[str] = []
  dead: list[Dead] = []
  bar = tqdm.tqdm(total=n, desc=f'prepare {split}', unit='img', file=sys.stderr,
                  disable=not progress, leave=False)

  def take(results):
    for (ex_id, label), result in results:
      bar.update(1)
      if isinstance(result, Exception):  # ImageError, anything else PIL raises on odd inputs
        dead.append(Dead(ex_id, failure_reason(result)))
        continue
      i = len(ids)
      images[i], labels[i] = result, label
      ids.append(ex_id)

  pool = preprocess.ParallelPrepare(cfg, threads, PREPARE_WINDOW)
  try:
    for item in inputs:
      if isinstance(item, Example):
        take(pool.put((item.id, item.label), item.image))
      else:
        dead.append(item)
        bar.update(1)
    take(pool.drain())
  finally:
    bar.close()
  for ex_id, reason in dead[:5]:
    log.warning('dead letter %s: %s', ex_id, reason)
  if dead:
    log.warning('%s: %d unusable input(s) of %d dead-lettered', split, len(dead),
                len(ids) + len(dead))
  if not ids:
    raise UserError(f'split {split!r} of {source.name} has no usable images')
  return Split(split, images[:len(ids)], labels[:len(ids)], ids, dead)


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


class Prefetch:
  """The training batches of steps ``start..end-1``, assembled ahead of the step.

  A background thread builds each batch (``train_batch``: the same pure function of
  (seed, step), so resume stays exact) and hands it to ``place`` — e.g. ``jax.device_put``
  with the batch sharding, which copies asynchronously — keeping up to ``depth`` batches
  ready: the step never waits on the host gathering images. Use it as a context manager
  so the thread stops when the loop ends early.
  """

  def __init__(self, split: Split, batch_size: int, start: int, end: int, seed: int,
               augment: bool = False, place: Callable[[dict], dict] = lambda b: b,
               depth: int = 2):
    self._steps = range(start, end)
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._thread = threading.Thread(
        target=self._fill, args=(split, batch_size, seed, augment, place), daemon=True,
        name='prefetch')
    self._thread.start()

  def _fill(self, split, batch_size, seed, augment, place):
    try:
      for step in self._steps:
        item = (place(train_batch(split, batch_size, step, seed, augment)), None)
        if not self._put(item):
          return
    except Exception as e:  # pylint: disable=broad-except  (raised in the consumer)
      self._put((None, e))

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self) -> Iterator[dict]:
    for _ in self._steps:
      batch, error = self._queue.get()
      if error is not None:
        raise error
      yield batch

  def close(self) -> None:
    self._stop.set()
    self._thread.join()

  def __enter__(self) -> 'Prefetch':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
