"""Labelled image sources shared by the embed and fine-tune stages.

``open_source(spec)`` understands these kinds of spec (``csv:``, ``parquet:`` and ``wds:``
live in ``clip_transfer.data.files``):

* ``digits``: scikit-learn's bundled ``load_digits`` as a TFDS builder (no download).
* ``folder:PATH``: ``PATH/<split>/<class>/<image>``; PATH is any Beam filesystem
  path (local, ``gs://`` …), class names are the sorted folder names.
* a TFDS catalog name (``mnist``, ``cifar10:3.0.2``) prepared in ``data_dir``.

Every source yields ``Example(id, label, image)``; ``image`` is an HWC uint8
array or encoded bytes, both accepted by ``clip_transfer.data.preprocess.prepare``.
"""

from __future__ import annotations

import dataclasses
import functools
import posixpath
import re
from typing import Iterator, Optional, Union

import numpy as np

from clip_transfer.errors import UserError

FOLDER_PREFIX = 'folder:'


@dataclasses.dataclass(frozen=True)
class Example:
  id: str  # stable, unique per split
  label: int
  image: Union[np.ndarray, bytes]  # HWC uint8, or encoded image bytes


# Parts of exception text that differ between runs of the same input: memory
# addresses in reprs, TF's numbered function names and op suffixes.
_VOLATILE = (re.compile(r' at 0x[0-9a-fA-F]+'), re.compile(r'\{\{function_node [^}]*\}\}\s*'),
             re.compile(r'\s*\[Op:\w+\].*$'))


def failure_reason(e: BaseException, prefix: str = '') -> str:
  """A dead letter's reason: one line, the same on every run (no memory addresses)."""
  text = ' '.join(str(e).split())
  for volatile in _VOLATILE:
    text = volatile.sub('', text)
  text = text[:500]
  return f'{prefix}{type(e).__name__}: {text}' if text else f'{prefix}{type(e).__name__}'


class Source:
  """A labelled image dataset with named splits."""

  name: str
  version: str
  class_names: list[str]
  splits: list[str]
  # Inputs without a label are examples with label -1 (predict), not dead letters.
  labels_optional: bool = False

  def num_examples(self, split: str) -> Optional[int]:
    raise NotImplementedError

  def iter_examples(self, split: str, start: int = 0,
                    stop: Optional[int] = None) -> Iterator[Example]:
    """Examples of ``split`` in a fixed order; ``start/stop`` select a range of it."""
    raise NotImplementedError

  def problems(self, split: str) -> list[tuple[str, str]]:
    """(id, reason) of the inputs of ``split`` found but unusable (the embed stage dead-letters them)."""
    return []

  def num_parts(self, split: str) -> Optional[int]:
    """How many input files hold ``split`` (for sizing the output when the count is unknown)."""
    return None

  def check_split(self, split: str) -> None:
    if self.splits and split not in self.splits:
      raise UserError(f'{self.name} has no split {split!r}; available: '
                      f'{", ".join(self.splits)}')


def open_source(spec: str, data_dir: Optional[str] = None, labels_optional: bool = False,
                **options) -> Source:
  """'digits', 'folder:PATH', 'csv:PATH', 'parquet:GLOB', 'wds:PATTERN' or a TFDS name.

  ``options`` (``clip_transfer.data.files.SOURCE_OPTIONS``: class_names, image_column,
  label_column, label_field, default_split) configure the csv/parquet/wds sources.
  ``labels_optional`` (predict): images directly in a folder's split folder and CSV rows
  with no label are examples with label -1 instead of dead letters.
  """
  from clip_transfer.data import files as file_sources  # pylint: disable=g-import-not-at-top

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
    return file_sources.CsvSource(spec[len(file_sources.CSV_PREFIX):],
                                  labels_optional=labels_optional, **options)
  if spec.startswith(file_sources.PARQUET_PREFIX):
    options.pop('label_field', None)
    return file_sources.ParquetSource(spec[len(file_sources.PARQUET_PREFIX):], **options)
  if spec.startswith(file_sources.WDS_PREFIX):
    options.pop('image_column', None), options.pop('label_column', None)
    return file_sources.WdsSource(spec[len(file_sources.WDS_PREFIX):], **options)
  if spec.startswith(FOLDER_PREFIX):
    return FolderSource(spec[len(FOLDER_PREFIX):], labels_optional)
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
      from clip_transfer.data import digits  # pylint: disable=g-import-not-at-top
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
    for ex in self.iter_records(split, start, stop):
      if isinstance(ex, DeadRecord):
        raise UserError(f'{self.spec}: cannot read record {ex.id}: {ex.reason}')
      yield ex

  def iter_records(self, split: str, start: int = 0,
                   stop: Optional[int] = None) -> Iterator[Union[Example, 'DeadRecord']]:
    """Like ``iter_examples``, but a record that cannot be read is a ``DeadRecord``.

    A dead record's id is its key (``<name>/<split>/<index>``): its own id
    feature is inside the bytes that could not be read.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    self.check_split(split)
    n = self.num_examples(split)
    stop = n if stop is None else stop
    try:
      if self._builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        # Random access: a range costs only its own records, one at a time.
        data = self._builder.as_data_source(split=split)
        stop = len(data) if stop is None else stop
        for i in range(start, stop):
          try:
            ex = self._example(split, i, data[i])
          except Exception as e:  # a corrupt record: bad bytes, undecodable image
            yield DeadRecord(self._key(split, i), failure_reason(e, 'corrupt record: '))
            continue
          yield ex
        return
      i = start
      while stop is None or i < stop:
        # A failed tf.data iterator cannot go on: restart after the bad record.
        sub = split if (i == 0 and stop == n) else f'{split}[{i}:{"" if stop is None else stop}]'
        rows = tfds.as_numpy(self._builder.as_dataset(split=sub, shuffle_files=False))
        try:
          for row in rows:
            ex = self._example(split, i, row)
            i += 1
            yield ex
          return
        except Exception as e:  # DataLossError, a bad image
          if isinstance(e, AssertionError):
            raise
          yield DeadRecord(self._key(split, i), failure_reason(e, 'corrupt record: '))
          i += 1
    except AssertionError as e:  # TFDS: "could not find data in …"
      raise UserError(f'{self.spec} is not prepared in data_dir={self.data_dir or "default"}; '
                      f'prepare it first (tfds build {self.spec} --data_dir=…) '
                      f'({str(e).splitlines()[0]})') from None

  def _key(self, split: str, index: int) -> str:
    return f'{self.name}/{split}/{index}'

  def _example(self, split: str, index: int, row) -> Example:
    ex_id = _text(row['id']) if self._has_id else self._key(split, index)
    return Example(ex_id, int(row[self._label_key]), np.asarray(row[self._image_key]))


@dataclasses.dataclass(frozen=True)
class DeadRecord:
  """A record of a TFDS split that could not be read (dead-lettered by the embed stage)."""
  id: str
  reason: str


def _text(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


# --------------------------------------------------------------------------
# Image folders (any Beam filesystem)
# --------------------------------------------------------------------------


def relative_path(root: str, path: str) -> str:
  """``path`` below ``root``, '/'-separated: a folder example's id ('train/cat/001.jpg')."""
  rel = path[len(root):] if path.startswith(root) else path
  return rel.replace('\\', '/').lstrip('/')


@dataclasses.dataclass(frozen=True)
class FolderEntry:
  """One input found below ``ROOT/<split>/``: an image, or something that cannot be one."""

  id: str  # the path below the root ('train/cat/001.jpg'): the example's id
  path: str  # what to open
  cls: Optional[str]  # the class folder; None outside the <split>/<class>/ layout
  problem: Optional[str] = None  # why it cannot be an example (it is dead-lettered)


LAYOUT = '<split>/<class>/<image>'


def _hidden(name: str) -> bool:
  return name.startswith('.')


def _entry(root: str, path: str, exists: bool = True, regular: bool = True,
           labels_optional: bool = False) -> FolderEntry:
  """Classifies one listed file by where it sits below ``root``."""
  rel = relative_path(root, path)
  parts = rel.split('/')
  if not exists:
    return FolderEntry(rel, path, None, f'broken symlink: {path}')
  if not regular:
    return FolderEntry(rel, path, None, f'not a regular file: {path}')
  if len(parts) == 2 and labels_optional:  # <split>/<image>: an image with no label
    return FolderEntry(rel, path, None)
  if len(parts) == 2:
    return FolderEntry(rel, path, None, f'directly in the split folder, not in a class folder '
                       f'(expected {LAYOUT})')
  if len(parts) > 3:
    return FolderEntry(rel, path, None, f'in a nested folder {"/".join(parts[1:-1])} '
                       f'(expected {LAYOUT})')
  return FolderEntry(rel, path, parts[1])


def list_folder_split(root: str, split: str, labels_optional: bool = False) -> list[FolderEntry]:
  """Every non-hidden file below ``root/split`` (at any depth), sorted by id.

  Hidden files and folders (a name starting with '.') are skipped and not
  counted. Local folders are walked following symlinks; a folder that cannot
  be listed, a broken link, a symlink loop, or a file outside the layout is an
  entry with a ``problem`` (so it is dead-lettered, never silently dropped).
  """
  root = root.rstrip('/')
  if '://' not in root:
    return _list_local(root, split, labels_optional)
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top

  pattern = FileSystems.join(root, split, '**')
  try:
    metadata = FileSystems.match([pattern])[0].metadata_list
  except Exception as e:  # no such directory, unknown scheme, permissions
    raise UserError(f'cannot list {pattern}: {str(e).splitlines()[0][:200]}') from None
  entries = [_entry(root, m.path, labels_optional=labels_optional) for m in metadata]
  return sorted((e for e in entries if not any(_hidden(p) for p in e.id.split('/'))),
                key=lambda e: e.id)


def _list_local(root: str, split: str, labels_optional: bool = False) -> list[FolderEntry]:
  import os  # pylint: disable=g-import-not-at-top

  base = os.path.join(root, split)
  entries: list[FolderEntry] = []

  def unlistable(e: OSError):
    path = e.filename or base
    entries.append(FolderEntry(relative_path(root, path) + '/', path, None,
                               f'cannot list folder: {failure_reason(e)}'))

  chains: dict[str, tuple[str, ...]] = {}  # folder → real paths of it and its ancestors
  for dirpath, dirnames, filenames in os.walk(base, onerror=unlistable, followlinks=True):
    real = os.path.realpath(dirpath)
    above = chains.get(os.path.dirname(dirpath), ())
    if real in above:  # a symlink back up the tree
      entries.append(FolderEntry(relative_path(root, dirpath) + '/', dirpath, None,
                                 f'symlink loop: {dirpath} -> {real}'))
      dirnames[:] = []
      continue
    chains[dirpath] = above + (real,)
    dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
    for name in filenames:
      if _hidden(name):
        continue  # .DS_Store and friends: not inputs, not counted
      path = os.path.join(dirpath, name)
      entries.append(_entry(root, path, exists=os.path.exists(path),
                            regular=not os.path.exists(path) or os.path.isfile(path),
                            labels_optional=labels_optional))
  return sorted(entries, key=lambda e: e.id)


def _list_splits(root: str) -> list[str]:
  """The non-hidden folders directly below ``root`` (any Beam filesystem)."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top

  if '://' not in root:
    import os  # pylint: disable=g-import-not-at-top
    try:
      return sorted(d for d in os.listdir(root)
                    if not _hidden(d) and os.path.isdir(os.path.join(root, d)))
    except OSError as e:
      if not os.path.exists(root):
        return []
      raise UserError(f'cannot list {root}: {failure_reason(e)}') from None
  try:
    metadata = FileSystems.match([FileSystems.join(root, '**')])[0].metadata_list
  except Exception as e:  # no such directory, unknown scheme, permissions
    raise UserError(f'cannot list {root}: {str(e).splitlines()[0][:200]}') from None
  parts = (relative_path(root, m.path).split('/') for m in metadata)
  return sorted({p[0] for p in parts if len(p) > 1 and not _hidden(p[0])})


class FolderSource(Source):
  """``PATH/<split>/<class>/<image>``; files listed with Beam's FileSystems."""

  def __init__(self, path: str, labels_optional: bool = False):
    self.labels_optional = labels_optional
    if not path:
      raise UserError('folder: needs a path, e.g. folder:/data/flowers or folder:gs://b/flowers')
    self.root = path.rstrip('/')
    self.name = posixpath.basename(self.root) or self.root
    self.version = '0.0.0'
    by_split = self._entries
    if not by_split:
      raise UserError(f'{self.root} holds no images: expected {self.root}/{LAYOUT}')
    self.splits = sorted(by_split)
    self.class_names = sorted({e.cls for entries in by_split.values() for e in entries
                               if e.cls and not e.problem})

  @functools.cached_property
  def _entries(self) -> dict[str, list[FolderEntry]]:
    """{split: every entry found below it} (splits with nothing in them left out)."""
    out = {}
    for split in _list_splits(self.root):
      entries = list_folder_split(self.root, split, self.labels_optional)
      if entries:
        out[split] = entries
    return out

  def entries(self, split: str) -> list[FolderEntry]:
    """Everything found below ``split``, problems included (what the embed stage reads)."""
    self.check_split(split)
    return self._entries[split]

  def problems(self, split: str) -> list[tuple[str, str]]:
    return [(e.id, e.problem) for e in self.entries(split) if e.problem]

  def _examples(self, split: str) -> list[FolderEntry]:
    return [e for e in self.entries(split) if not e.problem]

  def relative(self, path: str) -> str:
    """Path below the root, '/'-separated: the example id ('train/cat/001.jpg')."""
    return relative_path(self.root, path)

  def num_examples(self, split):
    """Files in the layout (entries with a problem are not examples)."""
    return len(self._examples(split))

  def iter_examples(self, split, start=0, stop=None):
    from apache_beam.io.filesystem import CompressionTypes  # pylint: disable=g-import-not-at-top
    from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top

    for e in self._examples(split)[start:stop]:
      # UNCOMPRESSED: AUTO would gunzip a file that happens to end in .gz.
      with FileSystems.open(e.path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        data = fh.read()
      yield Example(e.id, -1 if e.cls is None else self.class_names.index(e.cls), data)
