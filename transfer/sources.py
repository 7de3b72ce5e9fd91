"""Labelled image sources shared by the embed and fine-tune stages.

``open_source(spec)`` understands these kinds of spec (``csv:``, ``parquet:`` and ``wds:``
live in ``transfer.file_sources``):

* ``digits``: scikit-learn's bundled ``load_digits`` as a TFDS builder (no download).
* ``folder:PATH``: ``PATH/<split>/<class>/<image>``; PATH is any Beam filesystem
  path (local, ``gs://`` …), class names are the sorted folder names.
* a TFDS catalog name (``mnist``, ``cifar10:3.0.2``) prepared in ``data_dir``.

Every source yields ``Example(id, label, image)``; ``image`` is an HWC uint8
array or encoded bytes, both accepted by ``transfer.preprocess.prepare``.
"""

from __future__ import annotations

import dataclasses
import functools
import posixpath
from typing import Iterator, Optional, Union

import numpy as np

from transfer.errors import UserError

FOLDER_PREFIX = 'folder:'


@dataclasses.dataclass(frozen=True)
class Example:
  id: str  # stable, unique per split
  label: int
  image: Union[np.ndarray, bytes]  # HWC uint8, or encoded image bytes


class Source:
  """A labelled image dataset with named splits."""

  name: str
  version: str
  class_names: list[str]
  splits: list[str]

  def num_examples(self, split: str) -> Optional[int]:
    raise NotImplementedError

  def iter_examples(self, split: str, start: int = 0,
                    stop: Optional[int] = None) -> Iterator[Example]:
    """Examples of ``split`` in a fixed order; ``start/stop`` select a range of it."""
    raise NotImplementedError

  def check_split(self, split: str) -> None:
    if self.splits and split not in self.splits:
      raise UserError(f'{self.name} has no split {split!r}; available: '
                      f'{", ".join(self.splits)}')


def open_source(spec: str, data_dir: Optional[str] = None, **options) -> Source:
  """'digits', 'folder:PATH', 'csv:PATH', 'parquet:GLOB', 'wds:PATTERN' or a TFDS name.

  ``options`` (``transfer.file_sources.SOURCE_OPTIONS``: class_names, image_column,
  label_column, label_field, default_split) configure the csv/parquet/wds sources.
  """
  from transfer import file_sources  # pylint: disable=g-import-not-at-top

  unknown = set(options) - set(file_sources.SOURCE_OPTIONS)
  if unknown:
    raise TypeError(f'unknown source options: {sorted(unknown)}')
  spec = spec.strip()
  if not spec:
    raise UserError('empty dataset spec; use digits, folder:PATH, csv:PATH, parquet:GLOB, '
                    'wds:PATTERN or a TFDS name')
  options = {k: v for k, v in options.items() if v is not None}
  if spec.startswith(file_sources.CSV_PREFIX):
    options.pop('label_field', None)
    return file_sources.CsvSource(spec[len(file_sources.CSV_PREFIX):], **options)
  if spec.startswith(file_sources.PARQUET_PREFIX):
    options.pop('label_field', None)
    return file_sources.ParquetSource(spec[len(file_sources.PARQUET_PREFIX):], **options)
  if spec.startswith(file_sources.WDS_PREFIX):
    options.pop('image_column', None), options.pop('label_column', None)
    return file_sources.WdsSource(spec[len(file_sources.WDS_PREFIX):], **options)
  if spec.startswith(FOLDER_PREFIX):
    return FolderSource(spec[len(FOLDER_PREFIX):])
  if spec == 'digits' or spec.startswith('digits:'):
    return TfdsSource(spec, data_dir, builtin=True)
  return TfdsSource(spec, data_dir)


# --------------------------------------------------------------------------
# TFDS (catalog datasets and the built-in digits)
# --------------------------------------------------------------------------


class TfdsSource(Source):
  """A prepared TFDS dataset; never downloads (digits is prepared from scikit-learn)."""

  def __init__(self, spec: str, data_dir: Optional[str] = None, builtin: bool = False):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    self.spec, self.data_dir = spec, data_dir
    if builtin:
      from transfer import digits  # pylint: disable=g-import-not-at-top
      self._builder = digits.prepare(data_dir)
    else:
      try:
        self._builder = tfds.builder(spec, data_dir=data_dir)
      except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f'unknown dataset {spec!r}: not a TFDS catalog name; use digits, '
                        'folder:PATH or a name from `tfds.list_builders()`') from None
      except Exception as e:  # bad version, bad config: TFDS raises several types
        raise UserError(f'cannot open TFDS dataset {spec!r}: {str(e).splitlines()[0]}') from None
    info = self._builder.info
    self.name = self._builder.name
    self.version = str(self._builder.version)
    self._image_key, self._label_key = info.supervised_keys or ('image', 'label')
    features = info.features
    if self._image_key not in features or self._label_key not in features:
      raise UserError(f'{spec}: needs image and label features, has {sorted(features)}')
    label = features[self._label_key]
    if not isinstance(label, tfds.features.ClassLabel):
      raise UserError(f'{spec}: label feature {self._label_key!r} is not a ClassLabel')
    self.class_names = list(label.names)
    self.splits = sorted(info.splits)  # empty when not prepared (or under mock_data)
    self._has_id = 'id' in features

  def num_examples(self, split: str) -> Optional[int]:
    self.check_split(split)
    if split in self._builder.info.splits:
      return self._builder.info.splits[split].num_examples
    return None

  def iter_examples(self, split, start=0, stop=None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    self.check_split(split)
    n = self.num_examples(split)
    stop = n if stop is None else stop
    try:
      if self._builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        # Random access: a range costs only its own records.
        data = self._builder.as_data_source(split=split)
        rows = (data[i] for i in range(start, len(data) if stop is None else stop))
      else:
        sub = split if (start == 0 and stop == n) else f'{split}[{start}:{stop}]'
        rows = tfds.as_numpy(self._builder.as_dataset(split=sub, shuffle_files=False))
    except AssertionError as e:  # TFDS: "could not find data in …"
      raise UserError(f'{self.spec} is not prepared in data_dir={self.data_dir or "default"}; '
                      f'prepare it first (tfds build {self.spec} --data_dir=…) '
                      f'({str(e).splitlines()[0]})') from None
    for i, ex in enumerate(rows, start):
      ex_id = _text(ex['id']) if self._has_id else f'{self.name}/{split}/{i}'
      yield Example(ex_id, int(ex[self._label_key]), np.asarray(ex[self._image_key]))


def _text(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


# --------------------------------------------------------------------------
# Image folders (any Beam filesystem)
# --------------------------------------------------------------------------


def relative_path(root: str, path: str) -> str:
  """``path`` below ``root``, '/'-separated: a folder example's id ('train/cat/001.jpg')."""
  rel = path[len(root):] if path.startswith(root) else path
  return rel.replace('\\', '/').lstrip('/')


class FolderSource(Source):
  """``PATH/<split>/<class>/<image>``; files listed with Beam's FileSystems."""

  def __init__(self, path: str):
    if not path:
      raise UserError('folder: needs a path, e.g. folder:/data/flowers or folder:gs://b/flowers')
    self.root = path.rstrip('/')
    self.name = posixpath.basename(self.root) or self.root
    self.version = '0.0.0'
    by_split = self._files
    if not by_split:
      raise UserError(f'{self.root} holds no images: expected {self.root}/<split>/<class>/<image>')
    self.splits = sorted(by_split)
    self.class_names = sorted({c for files in by_split.values() for c, _ in files})

  @functools.cached_property
  def _files(self) -> dict[str, list[tuple[str, str]]]:
    return self._listing()

  def _listing(self) -> dict[str, list[tuple[str, str]]]:
    """{split: sorted [(class, path)]} (hidden files skipped)."""
    from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top

    pattern = FileSystems.join(self.root, '*', '*', '*')
    try:
      metadata = FileSystems.match([pattern])[0].metadata_list
    except Exception as e:  # no such directory, unknown scheme, permissions
      raise UserError(f'cannot list {pattern}: {str(e).splitlines()[0][:200]}') from None
    out: dict[str, list[tuple[str, str]]] = {}
    for m in metadata:
      split, cls, name = self.relative(m.path).split('/')[-3:]
      if name.startswith('.') or cls.startswith('.') or split.startswith('.'):
        continue
      out.setdefault(split, []).append((cls, m.path))
    return {s: sorted(v, key=lambda cp: cp[1]) for s, v in out.items()}

  def relative(self, path: str) -> str:
    """Path below the root, '/'-separated: the example id ('train/cat/001.jpg')."""
    return relative_path(self.root, path)

  def split_pattern(self, split: str) -> str:
    """The glob that matches one split's images (for Beam's MatchFiles)."""
    from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top

    self.check_split(split)
    return FileSystems.join(self.root, split, '*', '*')

  def num_examples(self, split):
    self.check_split(split)
    return len(self._files[split])

  def iter_examples(self, split, start=0, stop=None):
    from apache_beam.io.filesystem import CompressionTypes  # pylint: disable=g-import-not-at-top
    from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top

    self.check_split(split)
    for cls, path in self._files[split][start:stop]:
      # UNCOMPRESSED: AUTO would gunzip a file that happens to end in .gz.
      with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        data = fh.read()
      yield Example(self.relative(path), self.class_names.index(cls), data)
