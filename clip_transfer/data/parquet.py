"""``parquet:GLOB``: Parquet files of (image, label) rows, e.g. a Hugging Face dataset's.

The image column holds ``{bytes, path}`` structs (``datasets``' Image feature) or raw
binary (or a path string); the label column ints or strings. Split from the Hub's file
names (``train-00000-of-00004.parquet``) or a ``split=NAME`` / ``NAME`` directory. Class
names from ``datasets``' ``ClassLabel`` metadata when the file carries it. A split's parts
are its files. Id: ``FILE/ROW`` (FILE relative to the glob's base).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import posixpath
from typing import Any, Iterator, Optional

from clip_transfer.data import labels, paths
from clip_transfer.data.base import Dead, Example, Input, Source
from clip_transfer.errors import UserError

log = logging.getLogger(__name__)

PREFIX = 'parquet:'


@contextlib.contextmanager
def parquet_file(path: str):
  """A ``pyarrow.parquet.ParquetFile`` read through Beam's FileSystems (closed on exit)."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  with paths.open_binary(path) as fh:
    yield pq.ParquetFile(fh)


def num_rows(path: str) -> int:
  """Rows of a Parquet file, from its footer."""
  with parquet_file(path) as pf:
    return pf.metadata.num_rows


def rows(path: str, image_column: str, label_column: str) -> Iterator[tuple[Any, Any]]:
  """(image value, label value) of every row, in order, a batch at a time."""
  with parquet_file(path) as pf:
    for batch in pf.iter_batches(batch_size=64, columns=[image_column, label_column]):
      yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())


def hf_class_names(schema, path: str, label_column: str) -> Optional[list[str]]:
  """``datasets``' ClassLabel names of the label column, when the file's metadata has them.

  Metadata that cannot be read (bad JSON, odd shapes) is ignored with a warning: the
  labels are then read from the column. Repeated names are refused: they cannot be a
  label order.
  """
  raw = (schema.metadata or {}).get(b'huggingface')
  if raw is None:
    return None
  try:
    hf = json.loads(raw)
    feature = hf['info']['features'][label_column] if 'info' in hf else None
  except (ValueError, KeyError, TypeError, IndexError) as e:
    if isinstance(e, KeyError):
      return None  # no metadata for this column
    log.warning('%s: ignoring its Hugging Face metadata (%s)', path,
                'not valid JSON' if isinstance(e, ValueError) else 'unexpected layout')
    return None
  if not isinstance(feature, dict) or feature.get('_type') != 'ClassLabel':
    return None
  names = feature.get('names')
  if not isinstance(names, list) or not names:
    log.warning('%s: ignoring its ClassLabel metadata (names is not a list)', path)
    return None
  names = [str(n) for n in names]
  labels.check_unique(names, f'{path}: the ClassLabel names of {label_column!r}')
  return names


@dataclasses.dataclass(frozen=True)
class ReadFile:
  """(path, id prefix) → one Example or Dead input per row of the file."""

  image_column: str
  label_column: str
  class_names: tuple[str, ...]

  def __call__(self, part) -> Iterator[Input]:
    path, rel = part
    file_dir = posixpath.dirname(path)
    for i, (image, label) in enumerate(rows(path, self.image_column, self.label_column)):
      yield self.row(f'{rel}/{i}', image, label, file_dir)

  def row(self, ex_id: str, image: Any, label: Any, file_dir: str) -> Input:
    index = labels.label_index(label, list(self.class_names))
    if isinstance(index, str):
      return Dead(ex_id, index)
    if isinstance(image, dict):  # datasets' Image feature: {bytes, path}
      data, path = image.get('bytes'), image.get('path')
      if data is None:
        if not path:
          return Dead(ex_id, 'no image (bytes and path are empty)')
        data = paths.read_input(paths.resolve(file_dir, path), ex_id)
    elif isinstance(image, (bytes, bytearray)):
      data = bytes(image)
    elif isinstance(image, str) and image:
      data = paths.read_input(paths.resolve(file_dir, image), ex_id)
    else:
      return Dead(ex_id, 'no image')
    return data if isinstance(data, Dead) else Example(ex_id, index, data)


class ParquetSource(Source):
  """Parquet files of (image, label) rows, e.g. a Hugging Face dataset's."""

  version = '0.0.0'

  def __init__(self, pattern: str, image_column: str = 'image', label_column: str = 'label',
               class_names: Optional[str] = None, default_split: str = 'train',
               max_classes: int = labels.MAX_CLASSES):
    if not pattern:
      raise UserError('parquet: needs a glob, e.g. parquet:data/*.parquet')
    self.pattern, self.image_column, self.label_column = pattern, image_column, label_column
    self.default_split = default_split or 'train'
    self.base = paths.glob_base(pattern)
    files = paths.match(pattern)
    if not files:
      raise UserError(f'no Parquet files match {pattern}')
    self.name = posixpath.basename(self.base) or 'parquet'
    self._files: dict[str, list[tuple[str, str, int]]] = {}  # split → [(path, rel, rows)]
    first = None  # (path, schema) of the first file: every other must match its columns
    for path in files:
      rel = paths.relative_to(self.base, path)
      try:
        with parquet_file(path) as pf:
          schema, n = pf.schema_arrow, pf.metadata.num_rows
      except Exception as e:
        raise UserError(f'cannot read Parquet {path}: {str(e).splitlines()[0][:200]}') from None
      self._check_schema(path, schema, first)
      first = first or (path, schema)
      self._files.setdefault(paths.split_of_path(rel, self.default_split), []).append(
          (path, rel, n))
    self.splits = sorted(self._files)
    names = hf_class_names(first[1], first[0], label_column)
    if class_names:
      self.class_names = labels.read_class_names(class_names)
    elif names:
      self.class_names = names
    else:  # read the label column only
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
      values = []
      for path, _, _ in (f for fs in self._files.values() for f in fs):
        with paths.filesystems().open(path) as fh:
          values += pq.read_table(fh, columns=[label_column]).column(0).to_pylist()
      self.class_names = labels.names_from_labels(values, pattern, max_classes)
    if not self.class_names:
      raise UserError(f'{pattern}: column {label_column!r} holds no labels')

  def _check_schema(self, path: str, schema, first) -> None:
    """Every file has the image and label columns, of the first file's types."""
    for col, flag in ((self.image_column, 'image_column'), (self.label_column, 'label_column')):
      if col not in schema.names:
        raise UserError(f'{path} has no column {col!r} (columns: {", ".join(schema.names)}); '
                        f'name it with --{flag}')
      if first is not None:
        want, got = first[1].field(col).type, schema.field(col).type
        if want != got:
          raise UserError(f'{path}: column {col!r} is {got}, but {want} in {first[0]}; '
                          'files of one dataset need one schema')

  def files(self, split: str) -> list[tuple[str, str, int]]:
    """[(path, id prefix, number of rows)] of ``split``."""
    self.check_split(split)
    return self._files[split]

  def num_examples(self, split):
    return sum(n for _, _, n in self.files(split))

  def parts(self, split):
    return [(path, rel) for path, rel, _ in self.files(split)]

  def part_reader(self, split):
    return ReadFile(self.image_column, self.label_column, tuple(self.class_names))
