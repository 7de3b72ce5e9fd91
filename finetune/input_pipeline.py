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

from clip_transfer import distributed
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
  """A prepared split: uint8 NHWC images and int32 labels.

  In a multi-process run a Split holds this process's rows only; ``all_labels``
  and ``all_ids`` are then the whole split's (every process's rows, in the
  split's order) and ``order`` puts rows gathered in process order into it
  (None: process order is the split's order). One process: all None, the rows
  are the whole split.
  """

  name: str
  images: np.ndarray  # (N, H, W, 3) uint8
  labels: np.ndarray  # (N,) int32
  ids: list  # the source's example ids (the validation split is drawn by id)
  dead: list = dataclasses.field(default_factory=list)  # Dead inputs, as embed dead-letters
  index: Optional[np.ndarray] = None  # each row's place among the split's inputs (dead counted)
  num_inputs: Optional[int] = None  # the split's inputs, every process's
  all_labels: Optional[np.ndarray] = None
  all_ids: Optional[list] = None
  order: Optional[np.ndarray] = None
  shards: Optional['Shards'] = None  # training: which rows each local device draws from

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def whole_labels(self) -> np.ndarray:
    """The labels of every process's rows, in the split's order."""
    return self.labels if self.all_labels is None else self.all_labels

  @property
  def whole_ids(self) -> list:
    return self.ids if self.all_ids is None else self.all_ids

  @property
  def num_whole(self) -> int:
    return len(self.whole_labels)

  def gather(self, local: np.ndarray) -> np.ndarray:
    """Values of this process's rows (e.g. logits) → the whole split's, in its order, everywhere."""
    if self.all_labels is None:
      return local
    got = distributed.gather_rows(local)
    return got if self.order is None else got[self.order]

  def subset(self, idx: np.ndarray, name: str) -> 'Split':
    """The examples at ``idx`` (in that order)."""
    idx = np.asarray(idx)
    index = None if self.index is None else self.index[idx]
    return Split(name, self.images[idx], self.labels[idx], [self.ids[i] for i in idx],
                 index=index, num_inputs=self.num_inputs)

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
               threads: int = 0, part: Optional[tuple[int, int]] = None) -> Split:
  """Reads and prepares the first ``limit`` inputs of ``split`` (all by default).

  ``threads``: preparation threads (0: one per core; 1: inline). Dead inputs are kept
  in ``Split.dead``, never raised. ``part=(i, P)``: process i of P reads and prepares
  only its contiguous share of the inputs (``distributed.local_range``); an empty
  share is no error there (the caller checks the whole split).
  """
  source.check_split(split)
  n = source.num_examples(split)  # inputs, dead ones included: an upper bound on examples
  if limit is not None:
    n = limit if n is None else min(n, limit)
  if n is None:  # a source that cannot count: read it all into RAM (decoded below: our share)
    inputs = list(source.inputs(split, 0, limit))
    n = len(inputs)
    rows = range(n) if part is None else distributed.local_range(n, *part)
    inputs = inputs[rows.start:rows.stop]
  elif part is None:
    rows, inputs = range(n), source.inputs(split, 0, limit)
  else:
    rows = distributed.local_range(n, *part)
    inputs = source.inputs(split, rows.start, rows.stop)
  _hide_gpus_from_tensorflow()
  shape = (len(rows), *cfg.output_shape)
  if scratch_dir and np.prod(shape) > memmap_bytes:
    path = os.path.join(scratch_dir, f'{split}.npy')
    images = np.lib.format.open_memmap(path, mode='w+', dtype=np.uint8, shape=shape)
  else:
    images = np.empty(shape, np.uint8)
  labels = np.empty((len(rows),), np.int32)
  index = np.empty((len(rows),), np.int64)
  ids: list[str] = []
  dead: list[Dead] = []
  bar = tqdm.tqdm(total=len(rows), desc=f'prepare {split}', unit='img', file=sys.stderr,
                  disable=not progress, leave=False)

  def take(results):
    for (ex_id, label, position), result in results:
      bar.update(1)
      if isinstance(result, Exception):  # ImageError, anything else PIL raises on odd inputs
        dead.append(Dead(ex_id, failure_reason(result)))
        continue
      i = len(ids)
      images[i], labels[i], index[i] = result, label, position
      ids.append(ex_id)

  pool = preprocess.ParallelPrepare(cfg, threads, PREPARE_WINDOW)
  try:
    for position, item in enumerate(inputs, rows.start):
      if isinstance(item, Example):
        take(pool.put((item.id, item.label, position), item.image))
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
  if not ids and part is None:
    raise UserError(f'split {split!r} of {source.name} has no usable images')
  return Split(split, images[:len(ids)], labels[:len(ids)], ids, dead, index=index[:len(ids)],
               num_inputs=n)


def check_labels(split: Split, num_classes: int) -> None:
  labels = split.whole_labels  # every process's: the same refusal in each
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    raise UserError(f'split {split.name!r} has label {int(labels[bad][0])} but the '
                    f'head has {num_classes} classes')


def steps_per_epoch(n: int, batch_size: int) -> int:
  if n < batch_size:
    raise UserError(f'batch size {batch_size} is larger than the {n} training examples; '
                    'lower --batch_size')
  return n // batch_size  # fixed shapes: the remainder waits for the next epoch's shuffle


@dataclasses.dataclass(frozen=True)
class Shards:
  """Where each device's part of every training batch comes from: its own block of the split.

  With D devices the split's inputs are cut into D contiguous blocks
  (``distributed.local_range`` over the mesh's devices); each device's
  ``batch_size / D`` rows of a step are drawn from its block alone, shuffled per
  epoch of that block. Process i of P prepared exactly the blocks of its
  devices (the mesh keeps them side by side), so every process assembles its
  part of the global batch from its own rows, and the global batch is the same
  row for row whether the D devices sit in one process or in several.
  """

  rows: tuple  # per local device, in mesh order: indices into the (local) split
  num_devices: int  # D, in the whole run
  first: int  # the mesh position of this process's first device
  smallest: int  # the fewest rows any device's block holds (every process's)


def device_shards(split: Split, num_devices: int,
                  part: Optional[tuple[int, int]] = None) -> Shards:
  """The blocks of this process's devices (``num_devices`` in the whole run, equal per process).

  ``part``: (i, P), process i of P (default: this process of the run).
  """
  index_, count = part or (distributed.process_index(), distributed.process_count())
  local = num_devices // count
  first = index_ * local
  if num_devices == 1:
    rows = (np.arange(len(split)),)
  else:
    index = np.arange(len(split)) if split.index is None else split.index
    num_inputs = len(split) if split.num_inputs is None else split.num_inputs
    rows = []
    for d in range(first, first + local):
      block = distributed.local_range(num_inputs, d, num_devices)
      rows.append(np.flatnonzero((index >= block.start) & (index < block.stop)))
    rows = tuple(rows)
  smallest = min(map(len, rows))
  if distributed.process_count() > 1:
    smallest = int(distributed.allgather(np.int64(smallest)).min())
  return Shards(rows, num_devices, first, smallest)


def train_batch(split: Split, batch_size: int, step: int, seed: int,
                augment: bool = False, shards: Optional[Shards] = None) -> dict[str, np.ndarray]:
  """The batch for global step ``step``: a seeded per-epoch permutation, drop-remainder.

  With ``shards`` over several devices: this process's part of it, each local
  device's rows drawn from its own block (``Shards``).
  """
  if shards is not None and shards.num_devices > 1:
    return _sharded_batch(split, batch_size, step, seed, augment, shards)
  per_epoch = steps_per_epoch(len(split), batch_size)
  epoch, k = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(len(split))
  idx = np.sort(perm[k * batch_size:(k + 1) * batch_size])  # sorted: faster memmap reads
  images = split.images[idx]
  if augment:
    images = random_shift(images, np.random.default_rng([seed, epoch, k, 1]))
  return {'image': images, 'label': split.labels[idx]}


def _sharded_batch(split: Split, batch_size: int, step: int, seed: int, augment: bool,
                   shards: Shards) -> dict[str, np.ndarray]:
  per_device = batch_size // shards.num_devices
  images, labels = [], []
  for k, rows in enumerate(shards.rows):
    device = shards.first + k
    if len(rows) < per_device:
      raise UserError(f'batch size {batch_size} over {shards.num_devices} devices takes '
                      f'{per_device} examples per device from its share of the data, which '
                      f'holds {len(rows)}; lower --batch_size')
    epoch, j = divmod(step, len(rows) // per_device)  # each block: its own epochs, drop-remainder
    perm = np.random.default_rng([seed, epoch, device]).permutation(len(rows))
    idx = rows[np.sort(perm[j * per_device:(j + 1) * per_device])]  # sorted: faster memmap reads
    part = split.images[idx]
    if augment:
      part = random_shift(part, np.random.default_rng([seed, epoch, j, 1, device]))
    images.append(part)
    labels.append(split.labels[idx])
  return {'image': np.concatenate(images), 'label': np.concatenate(labels)}


def random_shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Light augmentation: translate each image by up to 1/8 of its size (edge padded)."""
  _, h, w, _ = images.shape
  ph, pw = max(1, h // 8), max(1, w // 8)
  padded = np.pad(images, ((0, 0), (ph, ph), (pw, pw), (0, 0)), mode='edge')
  dy = rng.integers(0, 2 * ph + 1, len(images))
  dx = rng.integers(0, 2 * pw + 1, len(images))
  return np.stack([p[y:y + h, x:x + w] for p, y, x in zip(padded, dy, dx)])


def eval_batches(split: Split, batch_size: int,
                 num_batches: Optional[int] = None) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-size batches in order; the last is padded, ``mask`` marks real examples.

  ``num_batches``: that many, the ones past the end all padding (every process
  must bring a part to each global batch, however few rows it holds).
  """
  n = len(split)
  if num_batches is None:
    num_batches = -(-n // batch_size)
  for start in range(0, num_batches * batch_size, batch_size):
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
               depth: int = 2, shards: Optional[Shards] = None):
    self._steps = range(start, end)
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._thread = threading.Thread(
        target=self._fill, args=(split, batch_size, seed, augment, place, shards), daemon=True,
        name='prefetch')
    self._thread.start()

  def _fill(self, split, batch_size, seed, augment, place, shards):
    try:
      for step in self._steps:
        item = (place(train_batch(split, batch_size, step, seed, augment, shards)), None)
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
