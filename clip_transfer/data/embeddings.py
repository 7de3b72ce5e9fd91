"""The embedding dataset: the contract between the embed, probe and fine-tune stages.

A TFDS-format directory that ``tfds.builder_from_directory(DIR).as_data_source()``
opens: ArrayRecord shards per split plus ``features.json``, ``metadata.json``
and ``dataset_info.json``. Features: ``embedding`` Tensor((D,), float32),
``label`` ClassLabel, ``id`` Text, optionally ``projected`` Tensor((P,), float32).

Every byte goes through Beam's ``FileSystems``, so ``gs://`` outputs work on
Dataflow. ``dataset_info.json`` is written last: a directory without it is an
incomplete run that TFDS (and ``read_split``) refuses to read.

The Beam sink (``pipelines.embed``) and ``write_dataset`` share ``Encoder``,
``group_by_shard`` (``shard_index``), ``write_shard`` and ``finalize``: same
inputs, same bytes. ``pipelines.predict`` shards its rows with ``group_by_shard`` too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from clip_transfer import errors
from clip_transfer import outputs
from clip_transfer.errors import UserError

DATASET_NAME = 'clip_embeddings'
VERSION = '1.0.0'
FILE_FORMAT = 'array_record'
INFO_FILE = 'dataset_info.json'  # written last: its presence marks a complete run
METADATA_FILE = 'metadata.json'
# What the embed run cost (wall time, runner). Kept out of metadata.json so the
# dataset's files stay byte-identical across runs; written after the dataset.
RUN_FILE = 'run.json'
# Written instead of dataset_info.json when the books do not balance (one line).
FAILURE_FILE = 'failure.json'
EXAMPLES_PER_SHARD = 10_000  # ~30 MB of 768-d float32 per shard
# Same options as TFDS' own ArrayRecord writer: group_size:1 for fast random access.
ARRAY_RECORD_OPTIONS = 'group_size:1'
REQUIRED_FEATURES = ('embedding', 'label', 'id')


def _fs():
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  return FileSystems


def features(dim: int, class_names: Sequence[str], projected_dim: Optional[int] = None):
  """The tfds FeaturesDict of an embedding dataset."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  f = {
      'embedding': tfds.features.Tensor(shape=(dim,), dtype=np.float32),
      'label': tfds.features.ClassLabel(names=list(class_names)),
      'id': tfds.features.Text(),
  }
  if projected_dim:
    f['projected'] = tfds.features.Tensor(shape=(projected_dim,), dtype=np.float32)
  return tfds.features.FeaturesDict(f)


def _varint(n: int) -> bytes:
  """A protobuf base-128 varint (n >= 0)."""
  if n < 0x80:
    return bytes((n,))
  out = bytearray()
  while n > 0x7F:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
  """A length-delimited protobuf field: tag, length, payload."""
  return tag + _varint(len(payload)) + payload


# tf.train.Example: features (1) → map<string, Feature> feature (1), whose entries are
# key (1) and value (2); a Feature is bytes_list (1) | float_list (2) | int64_list (3),
# each holding its values in field 1 (packed for numbers). Deterministic
# serialisation writes the map's entries in key order.
_BYTES, _FLOATS, _INT64S = b'\x0a', b'\x12', b'\x1a'


def _entry(key: str, kind: bytes, values: bytes) -> bytes:
  """One map entry: key → Feature(kind=[values])."""
  return _field(b'\x0a', _field(b'\x0a', key.encode())
                + _field(b'\x12', _field(kind, _field(b'\x0a', values))))


class Encoder:
  """(id, embedding, label[, projected]) → serialized tf.train.Example bytes.

  The bytes are built here, field by field, rather than through TFDS'
  ``encode_example`` + ``ExampleSerializer`` (130 µs an example at 64-d, 700 µs
  at 768 + 512-d on one core: the embed pipeline's largest per-image cost on its
  main thread). They equal what TFDS writes for ``features`` with
  ``SerializeToString(deterministic=True)`` (tests/test_embeddings.py compares
  them), and the same values are refused: a wrong shape, a label outside
  ``-1 <= label < num_classes``, an id that is not valid UTF-8.
  """

  def __init__(self, dim: int, class_names: Sequence[str], projected_dim: Optional[int] = None):
    self.features = features(dim, class_names, projected_dim)
    self.dim, self.projected_dim = dim, projected_dim
    # The float features have fixed lengths: everything before their values is constant.
    self._embedding_head = self._float_head('embedding', dim)
    self._projected_head = self._float_head('projected', projected_dim) if projected_dim else None
    # Every label entry, whole (-1 means no label, as tfds.features.ClassLabel allows);
    # protobuf writes a negative int64 as its 64-bit two's complement varint.
    self._labels = [_entry('label', _INT64S, _varint(label & 0xFFFFFFFFFFFFFFFF))
                    for label in range(-1, len(class_names))]

  @staticmethod
  def _float_head(key: str, size: int) -> bytes:
    whole = _entry(key, _FLOATS, bytes(4 * size))
    return whole[:-4 * size]

  def _label(self, label) -> bytes:
    label = int(label)
    if not -1 <= label < len(self._labels) - 1:  # as tfds.features.ClassLabel
      raise ValueError(f'label {label} is outside [-1, {len(self._labels) - 1}) '
                       '(the number of class names)')
    return self._labels[label + 1]

  def _example(self, ex_id: str, embedding: bytes, label, projected: Optional[bytes]) -> bytes:
    # Strict UTF-8, as TFDS' Text feature encodes (an unpaired surrogate raises).
    parts = [self._embedding_head, embedding, _entry('id', _BYTES, ex_id.encode()),
             self._label(label)]
    if projected is not None:
      parts += [self._projected_head, projected]
    return _field(b'\x0a', b''.join(parts))

  def encode(self, ex_id: str, embedding, label: int, projected=None) -> bytes:
    emb = self._rows('embedding', np.asarray(embedding)[None], 1, self.dim)[0]
    pro = (self._rows('projected', np.asarray(projected)[None], 1, self.projected_dim)[0]
           if self.projected_dim else None)
    return self._example(ex_id, emb, label, pro)

  def encode_batch(self, ids: Sequence[str], embeddings, labels: Sequence[int],
                   projected=None) -> list[bytes]:
    """``encode`` over the rows of (n, D) [and (n, P)] arrays: one cast and copy per batch."""
    n = len(ids)
    emb = self._rows('embedding', embeddings, n, self.dim)
    pro = self._rows('projected', projected, n, self.projected_dim) if self.projected_dim else None
    return [self._example(ex_id, emb[i], label, None if pro is None else pro[i])
            for i, (ex_id, label) in enumerate(zip(ids, labels))]

  @staticmethod
  def _rows(name: str, values, n: int, size: int) -> list[bytes]:
    """The float32 little-endian bytes of each of n rows of ``size`` values."""
    values = np.asarray(values, np.float32)
    if values.shape != (n, size):
      if values.ndim and len(values) != n:
        raise ValueError(f'{len(values)} rows of {name} for {n} ids')
      raise ValueError(f'{name} has shape {values.shape[1:]}, the dataset holds ({size},)')
    data, width = values.astype('<f4', copy=False).tobytes(), 4 * size
    return [data[i * width:(i + 1) * width] for i in range(n)]


def shard_index(ex_id: str, num_shards: int) -> int:
  """Stable shard of an id (sha256, not Python's salted hash)."""
  return int.from_bytes(hashlib.sha256(ex_id.encode()).digest()[:8], 'big') % num_shards


def group_by_shard(items: Iterable[Any], id_of: Callable[[Any], str],
                   num_shards: int) -> list[tuple[int, list]]:
  """[(shard index, [items whose id hashes there, in input order])], by shard index.

  Only the shards the items touch; a sink grouping a batch's rows per output shard
  (embed's ``Encode``, predict's ``ToRow``) moves one list per shard, not one row.
  """
  by_shard: dict[int, list] = {}
  for item in items:
    by_shard.setdefault(shard_index(id_of(item), num_shards), []).append(item)
  return sorted(by_shard.items())


def num_shards_for(num_examples: Optional[int], per_shard: int = EXAMPLES_PER_SHARD) -> int:
  return max(1, math.ceil((num_examples or 0) / per_shard))


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f'{DATASET_NAME}-{split}.{FILE_FORMAT}-{index:05d}-of-{num_shards:05d}'


def _copy_to(local: str, dest: str) -> None:
  with open(local, 'rb') as src, outputs.create_file(dest) as dst:
    shutil.copyfileobj(src, dst, 1 << 20)


def write_shard(out_dir: str, split: str, index: int, num_shards: int,
                records: Iterable[tuple[str, bytes]]) -> tuple[int, int]:
  """Sorts (id, bytes) by id and writes one shard; returns (count, num_bytes).

  array_record writes local files only, so the shard is built in a local temp
  file and copied to ``out_dir`` through FileSystems (gs://, …).
  """
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

  records = sorted(records, key=lambda r: r[0])
  for a, b in zip(records, records[1:]):
    if a[0] == b[0]:
      raise ValueError(f'duplicate id {a[0]!r} in split {split!r}')
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, 'shard')
    writer = ArrayRecordWriter(local, ARRAY_RECORD_OPTIONS)
    for _, data in records:
      writer.write(data)
    writer.close()
    _copy_to(local, _fs().join(out_dir, shard_name(split, index, num_shards)))
    return len(records), os.path.getsize(local)


def finalize(out_dir: str, shards: dict[str, dict[int, tuple[int, int]]],
             num_shards: dict[str, int], dim: int, class_names: Sequence[str],
             metadata: dict[str, Any], projected_dim: Optional[int] = None) -> None:
  """Writes missing (empty) shards, then the TFDS metadata; dataset_info.json last."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import naming  # pylint: disable=g-import-not-at-top

  # TFDS builds its metadata with epath, which knows local paths (and gs://
  # through TF) but not every Beam filesystem: build it in a local temp dir
  # (TFDS stores no absolute path in it) and copy the files with FileSystems.
  with tempfile.TemporaryDirectory() as tmp:
    split_infos = []
    for split, n in sorted(num_shards.items()):
      written = dict(shards.get(split, {}))
      for i in range(n):
        if i not in written:  # a shard no id hashed to: TFDS still expects the file
          written[i] = write_shard(out_dir, split, i, n, [])
      template = naming.ShardedFileTemplate(
          data_dir=tmp, dataset_name=DATASET_NAME, split=split, filetype_suffix=FILE_FORMAT)
      split_infos.append(tfds.core.SplitInfo(
          name=split, shard_lengths=[written[i][0] for i in range(n)],
          num_bytes=sum(written[i][1] for i in range(n)), filename_template=template))
    identity = tfds.core.dataset_info.DatasetIdentity(
        name=DATASET_NAME, version=tfds.core.Version(VERSION), data_dir=tmp, module_name='')
    info = tfds.core.DatasetInfo(
        builder=identity, features=features(dim, class_names, projected_dim),
        supervised_keys=('embedding', 'label'),
        description='CLIP image embeddings written by clip-transfer (pipelines.embed).',
        metadata=tfds.core.MetadataDict(metadata))
    info.set_file_format(tfds.core.FileFormat.ARRAY_RECORD)
    info.set_splits(tfds.core.SplitDict(split_infos))
    info.write_to_directory(tmp)
    # dataset_info.json last: its presence is what makes the directory complete.
    errors.check_interrupted()
    names = sorted(os.listdir(tmp), key=lambda n: (n == INFO_FILE, n))
    for name in names:
      _copy_to(os.path.join(tmp, name), _fs().join(out_dir, name))


def is_complete(out_dir: str) -> bool:
  return _fs().exists(_fs().join(out_dir, INFO_FILE))


# Every file the embed stage writes into its output directory (fnmatch
# patterns): --overwrite removes these and nothing else.
OWNED_FILES = (f'{DATASET_NAME}-*.{FILE_FORMAT}-*', INFO_FILE, METADATA_FILE, 'features.json',
               '*.labels.txt', RUN_FILE, FAILURE_FILE, 'dead_letters.*.jsonl')


def prepare_output(out_dir: str, overwrite: bool, clear: bool = True) -> None:
  """Claims ``out_dir`` (see ``clip_transfer.outputs``); ``overwrite`` clears a previous dataset."""
  outputs.prepare_output_dir(out_dir, overwrite, 'embedding dataset', OWNED_FILES,
                             complete=INFO_FILE, clear=clear)


def check_counts(out_dir: str, counts: dict[str, dict[str, int]]) -> Optional[str]:
  """One line when the books of a split do not balance or it holds nothing; else None."""
  for split, c in sorted(counts.items()):
    found, written, dead = c['read'], c['written'], c['dead_lettered']
    if found != written + dead:
      return (f'split {split!r}: found {found} inputs but wrote {written} and dead-lettered '
              f'{dead} ({found - written - dead:+d} unaccounted for); the dataset was not '
              'completed')
    if not written:
      if dead:
        letters = _fs().join(out_dir, f'dead_letters.{split}.jsonl')
        return (f'split {split!r}: every input failed ({dead} dead-lettered, reasons in '
                f'{letters}); nothing to embed')
      return f'split {split!r} holds no inputs; nothing to embed'
  return None


def write_failure(out_dir: str, message: str) -> None:
  """Marks a run that must not be read, with its one-line reason (instead of the metadata)."""
  with outputs.create_file(_fs().join(out_dir, FAILURE_FILE)) as fh:
    fh.write(json.dumps({'error': message}).encode() + b'\n')


def read_failure(out_dir: str) -> Optional[str]:
  """The reason a run failed after its pipeline ran, or None."""
  path = _fs().join(out_dir, FAILURE_FILE)
  if not _fs().exists(path):
    return None
  with _fs().open(path) as fh:
    return json.loads(fh.read().decode())['error']


def write_dataset(out_dir: str, splits: dict[str, Iterable[tuple]], class_names: Sequence[str],
                  metadata: dict[str, Any], overwrite: bool = False,
                  examples_per_shard: int = EXAMPLES_PER_SHARD) -> None:
  """Non-Beam writer for small jobs and tests: same encoding and sharding as the sink.

  ``splits``: {split: iterable of (id, embedding, label) or (id, embedding,
  label, projected)}. Holds one split in memory.
  """
  prepare_output(out_dir, overwrite)
  encoder, dim, projected_dim = None, None, None
  shards, num_shards, counts = {}, {}, {}
  for split, rows in splits.items():
    rows = list(rows)
    if not rows:
      raise UserError(f'split {split!r} is empty')
    if encoder is None:
      dim = int(np.asarray(rows[0][1]).shape[-1])
      projected_dim = int(np.asarray(rows[0][3]).shape[-1]) if len(rows[0]) > 3 else None
      encoder = Encoder(dim, class_names, projected_dim)
    n = num_shards_for(len(rows), examples_per_shard)
    encoded = [(row[0], encoder.encode(*row)) for row in rows]
    # Shards no id hashes to are written (empty) by finalize.
    shards[split] = {i: write_shard(out_dir, split, i, n, g)
                     for i, g in group_by_shard(encoded, lambda r: r[0], n)}
    num_shards[split] = n
    counts[split] = len(rows)
  meta = {'counts': {s: {'written': c, 'dead_lettered': 0} for s, c in counts.items()},
          **metadata}
  finalize(out_dir, shards, num_shards, dim, class_names, meta, projected_dim)


def _require_complete(out_dir: str) -> None:
  if not is_complete(out_dir):
    raise UserError(f'{out_dir} is not an embedding dataset (no {INFO_FILE}: wrong path, or an '
                    'incomplete embed run; re-run pipelines.embed with --overwrite)')


def _open(out_dir: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  _require_complete(out_dir)
  try:
    builder = tfds.builder_from_directory(out_dir)
  except Exception as e:  # corrupt or foreign metadata
    raise UserError(f'{out_dir}: cannot open as a TFDS dataset: {str(e).splitlines()[0]}') from None
  missing = [f for f in REQUIRED_FEATURES if f not in builder.info.features]
  if missing:
    raise UserError(f'{out_dir} is a TFDS dataset but not an embedding dataset '
                    f'(no {", ".join(missing)} feature)')
  return builder


def read_metadata(out_dir: str) -> dict[str, Any]:
  """The metadata recorded by the writer (model, preprocessing, source, counts, …)."""
  # FileSystems only (no TFDS): works on any Beam filesystem, gs:// included.
  _require_complete(out_dir)
  with _fs().open(_fs().join(out_dir, METADATA_FILE)) as fh:
    return json.loads(fh.read().decode())


def class_names(out_dir: str) -> list[str]:
  return list(_open(out_dir).info.features['label'].names)


def feature_names(out_dir: str) -> list[str]:
  """The dataset's features ('embedding', 'label', 'id'[, 'projected'])."""
  return sorted(_open(out_dir).info.features)


def read_split(out_dir: str, split: str, feature: str = 'embedding',
               part: Optional[tuple[int, int]] = None
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(``feature`` float32 (N, D), labels int64 (N,), ids) of one split, in one pass.

  ``part=(i, P)``: only the i-th of P contiguous, balanced row ranges
  (``clip_transfer.distributed.local_range``), so P processes each read and
  hold 1/P of the split.
  """
  builder = _open(out_dir)
  if feature not in builder.info.features:
    raise UserError(f'{out_dir} has no {feature!r} feature')
  if split not in builder.info.splits:
    raise UserError(f'{out_dir} has no split {split!r}; available: '
                    f'{", ".join(sorted(builder.info.splits))}')
  dim = builder.info.features[feature].shape[0]
  try:
    source = builder.as_data_source(split=split)
    rows_wanted = range(len(source))
    if part is not None:
      from clip_transfer import distributed  # pylint: disable=g-import-not-at-top
      rows_wanted = distributed.local_range(len(source), *part)
    n = len(rows_wanted)
    embeddings = np.empty((n, dim), np.float32)
    labels = np.empty((n,), np.int64)
    ids: list[str] = []
    step = 1024
    for start in range(0, n, step):
      rows = source.__getitems__(list(rows_wanted[start:min(n, start + step)]))
      for i, row in enumerate(rows, start):
        embeddings[i] = row[feature]
        labels[i] = row['label']
        ids.append(row['id'].decode() if isinstance(row['id'], bytes) else str(row['id']))
  except (RuntimeError, OSError, ValueError) as e:  # array_record: "Corrupted Riegeli/records file"
    shard = _unreadable_shard(out_dir, split, builder.info.splits[split].num_shards)
    what = f'shard {shard}' if shard else f'split {split!r} of {out_dir}'
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    raise UserError(f'cannot read {what}: it is truncated or damaged ({reason}); re-embed with '
                    'pipelines.embed --overwrite') from None
  return embeddings, labels, ids


def _unreadable_shard(out_dir: str, split: str, num_shards: int) -> Optional[str]:
  """The first shard file of ``split`` that array_record cannot read to its end, or None."""
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top

  if not outputs.is_local(out_dir):  # array_record reads local files only
    return None
  for i in range(num_shards):
    path = _fs().join(out_dir, shard_name(split, i, num_shards))
    try:
      reader = ArrayRecordReader(path, 'readahead_buffer_size:0')
      try:
        reader.read_all()
      finally:
        reader.close()
    except Exception:  # pylint: disable=broad-except  (whatever it raises, this is the file)
      return path
  return None


def write_run_info(out_dir: str, info: dict[str, Any]) -> None:
  """Records what producing the dataset cost (wall time, images/s, runner)."""
  with outputs.create_file(_fs().join(out_dir, RUN_FILE)) as fh:
    fh.write(json.dumps(info, indent=1, sort_keys=True).encode())


def read_run_info(out_dir: str) -> Optional[dict[str, Any]]:
  """The embed run's cost, or None when it was not recorded."""
  path = _fs().join(out_dir, RUN_FILE)
  if not _fs().exists(path):
    return None
  with _fs().open(path) as fh:
    return json.loads(fh.read().decode())
