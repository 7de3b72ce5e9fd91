"""Sources for images where users keep them: CSV manifests, Parquet files, WebDataset shards.

* ``csv:PATH``: a Vertex AI import manifest (``[training|validation|test,]IMAGE,LABEL``, no
  header) or a headed CSV/TSV with ``image``, ``label`` and optional ``split`` columns.
  Relative image paths resolve against the manifest's folder. Id: the image path as written.
* ``parquet:GLOB``: an image column of ``{bytes, path}`` structs (Hugging Face ``datasets``'
  Image feature) or raw binary, a label column of ints or strings. Split from the Hub's file
  names (``train-00000-of-00004.parquet``) or a ``split=NAME`` / ``NAME`` directory.
  Id: ``FILE/ROW`` (FILE relative to the glob's base).
* ``wds:PATTERN`` (brace patterns, ``shards/{00000..00099}.tar``; per split
  ``train=PATTERN;test=PATTERN``): members grouped by key, image from .jpg/.jpeg/.png/.webp,
  label from .cls, a field of .json (``label_field``) or .txt. Id: ``SHARD/KEY``.

Inputs that name no split belong to ``default_split`` (``train`` unless set). Class names are
the sorted distinct labels (ints: ``0..max``), Parquet ``ClassLabel`` names when the file
carries ``datasets``' metadata, or the lines of ``class_names`` (a file) to fix the order.

Every input is turned into an ``Example`` or a dead letter ``(id, reason)`` by one function per
source, used both by ``iter_examples`` (the fine-tune stage skips dead rows with a warning)
and by the Beam readers in ``pipelines.reads_files``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import dataclasses
import logging
import posixpath
import re
import tarfile
from typing import Any, Iterable, Iterator, Optional, Union

from clip_transfer import flags
from clip_transfer.errors import UserError
from clip_transfer.data.sources import Example, Source

log = logging.getLogger(__name__)

CSV_PREFIX, PARQUET_PREFIX, WDS_PREFIX = 'csv:', 'parquet:', 'wds:'


@dataclasses.dataclass(kw_only=True)
class SourceOptions:
  """The options of the csv:/parquet:/wds: sources; the embed and fine-tune configs inherit
  them, so each is one flag with one help text in both stages (clip_transfer.flags)."""

  class_names: Optional[str] = flags.field(
      None, 'file with one class name per line: fixes the label order of csv:/parquet:/wds: '
      '(a label not in it is dead-lettered); default: the sorted distinct labels')
  image_column: str = flags.field('image', 'image column of a headed CSV or of Parquet')
  label_column: str = flags.field('label', 'label column of a headed CSV or of Parquet')
  label_field: Optional[str] = flags.field(
      None, 'wds: take the label from this field of each .json member (default: .cls, then .txt)')
  default_split: str = flags.field(
      'train', 'split of csv rows, Parquet files and WebDataset shards that name none')


# The options these sources take (open_source(spec, data_dir, **options)).
SOURCE_OPTIONS = tuple(f.name for f in dataclasses.fields(SourceOptions))
VERTEX_SPLITS = {'training': 'train', 'train': 'train', 'validation': 'validation',
                 'test': 'test', 'unassigned': None}
NAMED_SPLITS = ('train', 'validation', 'test')
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')

Dead = tuple[str, str]  # (id, reason)


def source_options(config: Any) -> dict[str, Any]:
  """The source options a config (EmbedConfig, finetune Config) carries, for open_source."""
  return {k: getattr(config, k) for k in SOURCE_OPTIONS if hasattr(config, k)}


# --------------------------------------------------------------------------
# Shared helpers (paths through Beam's FileSystems, labels)
# --------------------------------------------------------------------------


def _fs():
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  return FileSystems


def read_bytes(path: str) -> bytes:
  from apache_beam.io.filesystem import CompressionTypes  # pylint: disable=g-import-not-at-top
  # UNCOMPRESSED: AUTO would gunzip a file that happens to end in .gz.
  with _fs().open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
    return fh.read()


def load_image(path: str, ex_id: str) -> Union[bytes, Dead]:
  """The file's bytes, or a dead letter naming why not (missing file, unreadable)."""
  try:
    return read_bytes(path)
  except Exception as e:  # not found, permissions, network: Beam wraps them in BeamIOError
    if not _exists(path):
      return ex_id, f'missing file: {path}'
    return ex_id, f'cannot read {path}: {type(e).__name__}'


def _exists(path: str) -> bool:
  try:
    return _fs().exists(path)
  except Exception:  # pylint: disable=broad-except
    return True  # cannot tell: report the read error itself


def resolve(base_dir: str, path: str) -> str:
  """``path`` as written, or below ``base_dir`` when relative (any Beam filesystem)."""
  if '://' in path or path.startswith('/') or not base_dir:
    return path
  return _fs().join(base_dir, path)


def match(pattern: str) -> list[str]:
  try:
    return sorted(m.path for m in _fs().match([pattern])[0].metadata_list)
  except Exception as e:  # no such directory, unknown scheme, permissions
    raise UserError(f'cannot list {pattern}: {str(e).splitlines()[0][:200]}') from None


def glob_base(pattern: str) -> str:
  """The folder part of ``pattern`` before its first wildcard (ids are relative to it)."""
  cut = min([i for i in (pattern.find(c) for c in '*?[{') if i >= 0] or [len(pattern)])
  return pattern[:cut].rsplit('/', 1)[0] if '/' in pattern[:cut] else ''


def relative_to(base: str, path: str) -> str:
  if base and path.startswith(base.rstrip('/') + '/'):
    return path[len(base.rstrip('/')) + 1:]
  return path.split('://', 1)[-1].lstrip('/')


def brace_expand(pattern: str) -> list[str]:
  """``a{00..02}b{x,y}`` → ``a00bx a00by a01bx …`` (WebDataset / bash brace patterns)."""
  m = re.search(r'\{([^{}]*)\}', pattern)
  if not m:
    return [pattern]
  body = m.group(1)
  rng = re.fullmatch(r'(\d+)\.\.(\d+)', body)
  if rng:
    lo, hi = rng.group(1), rng.group(2)
    width = len(lo) if lo.startswith('0') else 0
    items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
  elif ',' in body:
    items = body.split(',')
  else:  # not a brace pattern: keep it literally
    return [pattern[:m.end()] + rest for rest in brace_expand(pattern[m.end():])]
  return [out for item in items
          for out in brace_expand(pattern[:m.start()] + item + pattern[m.end():])]


def split_of_path(rel: str, default: str) -> str:
  """The split a file names: ``train-00000-of-00004.parquet``, ``split=test/``, ``validation/``."""
  parts = rel.split('/')
  m = re.match(r'(train|validation|test)(?=[-_.])', parts[-1])
  if m:
    return m.group(1)
  for d in reversed(parts[:-1]):
    d = d[len('partial-'):] if d.startswith('partial-') else d  # the Hub's partial conversions
    if d.startswith('split='):
      return d[len('split='):]
    if d in NAMED_SPLITS:
      return d
  return default


def read_class_names(path: str) -> list[str]:
  """One class name per line (blank lines ignored); the line order is the label order."""
  try:
    names = [l.strip() for l in read_bytes(path).decode('utf-8').splitlines() if l.strip()]
  except Exception as e:
    raise UserError(f'cannot read --class_names {path}: {str(e).splitlines()[0][:200]}') from None
  if not names:
    raise UserError(f'--class_names {path} is empty')
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise UserError(f'--class_names {path} repeats {", ".join(dup)}')
  return names


def names_from_labels(values: Iterable[Any], what: str) -> list[str]:
  """Class names from the labels seen: ints → '0'..'max' (label = value), strings → sorted."""
  values = {v for v in values if v is not None and v != '' and v != -1}
  ints = {v for v in values if isinstance(v, int) and not isinstance(v, bool)}
  if ints and len(ints) != len(values):
    raise UserError(f'{what}: labels mix integers and strings; pass --class_names=FILE')
  if ints:
    if min(ints) < 0:
      raise UserError(f'{what}: negative label {min(ints)}')
    return [str(i) for i in range(max(ints) + 1)]
  return sorted(str(v).strip() for v in values if str(v).strip())


def label_index(value: Any, class_names: list[str]) -> Union[int, str]:
  """The label's index, or the reason it has none (a string)."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return 'empty label'
  if isinstance(value, bytes):
    value = value.decode('utf-8', 'replace')
  if isinstance(value, int) and not isinstance(value, bool):
    if value == -1:
      return 'no label (-1)'
    if 0 <= value < len(class_names):
      return value
    return f'label {value} out of range for {len(class_names)} classes'
  name = str(value).strip()
  try:
    return class_names.index(name)
  except ValueError:
    return f'unknown label {name!r}'


class FileSource(Source):
  """What the three sources share: options, class names, iter_examples over inputs."""

  version = '0.0.0'

  def __init__(self, class_names: Optional[str] = None, default_split: str = 'train'):
    self.class_names_file = class_names
    self.default_split = default_split or 'train'

  def inputs(self, split: str) -> Iterator[Union[Example, Dead]]:
    """Every input of ``split`` in a fixed order: an Example or a dead letter."""
    raise NotImplementedError

  def iter_examples(self, split, start=0, stop=None):
    """Examples of inputs ``start:stop`` (dead inputs skipped with a warning)."""
    self.check_split(split)
    for item in itertools.islice(self.inputs(split), start, stop):
      if isinstance(item, Example):
        yield item
      else:
        log.warning('skipping %s: %s', *item)


# --------------------------------------------------------------------------
# CSV manifests
# --------------------------------------------------------------------------


def sniff_csv(first_line: str, path: str, image_column: str, label_column: str,
              labels_optional: bool = False) -> dict:
  """How to read the manifest: delimiter, header or Vertex layout, column positions.

  ``labels_optional``: a header naming the image column alone is a header too.
  """
  delimiter = '\t' if (path.endswith('.tsv') or '\t' in first_line) else ','
  fields = [f.strip().lower() for f in next(csv.reader([first_line], delimiter=delimiter))]
  has_label = label_column.lower() in fields
  if image_column.lower() in fields and (has_label or labels_optional):
    return {'delimiter': delimiter, 'header': True, 'image': fields.index(image_column.lower()),
            'label': fields.index(label_column.lower()) if has_label else None,
            'split': fields.index('split') if 'split' in fields else None}
  return {'delimiter': delimiter, 'header': False}


def parse_csv_line(line: str, layout: dict, default_split: str):
  """A manifest line → (split, id, image path as written, label) or (split, id, None, reason).

  Blank lines are not inputs (None).
  """
  line = line.rstrip('\r\n').lstrip('\ufeff')  # ReadFromText keeps a byte-order mark
  if not line.strip():
    return None
  fields = [f.strip() for f in next(csv.reader([line], delimiter=layout['delimiter']))]
  if layout['header']:
    cols = [layout['image']] + [layout[k] for k in ('label', 'split') if layout[k] is not None]
    if len(fields) <= max(cols):
      return default_split, line, None, f'{len(fields)} columns, expected {max(cols) + 1}'
    split = fields[layout['split']] if layout['split'] is not None else ''
    split = VERTEX_SPLITS.get(split.lower(), split) if split else None
    image = fields[layout['image']]
    label = fields[layout['label']] if layout['label'] is not None else ''
  else:  # Vertex AI: [ML_USE,]GCS_FILE_PATH[,LABEL]
    split = None
    if len(fields) >= 2 and fields[0].lower() in VERTEX_SPLITS:
      split, fields = VERTEX_SPLITS[fields[0].lower()], fields[1:]
    if len(fields) > 2:
      return (split or default_split), line, None, (
          f'{len(fields)} columns after the split, expected IMAGE,LABEL')
    image, label = fields[0], (fields[1] if len(fields) > 1 else '')
  split = split or default_split
  if not image:
    return split, line, None, 'empty image path'
  return split, image, image, label


def dedupe_rows(rows: list) -> list:
  """Rows of one split sharing an id: one kept when they agree, all dead when labels differ.

  Copies are identical, so which one is kept does not change the output.
  """
  if len(rows) == 1 or rows[0][2] is None:  # unique, or a repeated unparsable line
    return rows
  n, labels = len(rows), sorted({r[3] for r in rows})
  if len(labels) > 1:
    reason = f'listed {n} times with different labels: {", ".join(map(repr, labels))}'
    return [(r[0], r[1], None, reason) for r in rows]
  return rows[:1] + [(r[0], r[1], None, f'duplicate row (listed {n} times)') for r in rows[1:]]


def load_csv_row(row, base_dir: str, class_names: list[str],
                 labels_optional: bool = False) -> Union[Example, Dead]:
  _, ex_id, image, label = row
  if image is None:
    return ex_id, label  # the parse error's reason
  index = -1 if labels_optional and not label else label_index(label, class_names)
  if isinstance(index, str):
    return ex_id, index
  data = load_image(resolve(base_dir, image), ex_id)
  if isinstance(data, tuple):
    return data
  return Example(ex_id, index, data)


class CsvSource(FileSource):
  """A manifest of image paths and labels (Vertex AI layout or headed CSV/TSV)."""

  def __init__(self, path: str, image_column: str = 'image', label_column: str = 'label',
               labels_optional: bool = False, **kw):
    super().__init__(**kw)
    self.labels_optional = labels_optional
    if not path:
      raise UserError('csv: needs a manifest path, e.g. csv:gs://bucket/manifest.csv')
    self.path = path
    self.name = posixpath.basename(path).split('.')[0] or path
    self.base_dir = posixpath.dirname(path)
    try:
      with _fs().open(path) as fh:  # AUTO: manifest.csv.gz works too
        lines = io.TextIOWrapper(fh, encoding='utf-8-sig').read().splitlines()
    except Exception as e:
      raise UserError(f'cannot read manifest {path}: {str(e).splitlines()[0][:200]}') from None
    first = next((l for l in lines if l.strip()), None)
    if first is None:
      raise UserError(f'manifest {path} is empty')
    self.layout = sniff_csv(first, path, image_column, label_column, labels_optional)
    if self.layout['header']:
      if lines[0] != first:
        raise UserError(f'manifest {path}: the header must be the first line')
      lines = lines[1:]
    self.skip_header_lines = 1 if self.layout['header'] else 0
    rows = [r for r in (parse_csv_line(l, self.layout, self.default_split) for l in lines) if r]
    self._rows: dict[str, list] = {}
    for r in rows:
      self._rows.setdefault(r[0], []).append(r)
    self.splits = sorted(self._rows)
    if self.class_names_file:
      self.class_names = read_class_names(self.class_names_file)
    else:
      self.class_names = names_from_labels((r[3] for r in rows if r[2] is not None), path)
    if not self.class_names and not labels_optional:
      raise UserError(f'manifest {path} has no labels')

  def num_examples(self, split):
    self.check_split(split)
    return len(self._rows[split])

  def inputs(self, split):
    by_id: dict[str, list] = {}  # first-listed order
    for row in self._rows.get(split, []):
      by_id.setdefault(row[1], []).append(row)
    for rows in by_id.values():
      for row in dedupe_rows(rows):
        yield load_csv_row(row, self.base_dir, self.class_names, self.labels_optional)


# --------------------------------------------------------------------------
# Parquet (Hugging Face datasets layout)
# --------------------------------------------------------------------------


@contextlib.contextmanager
def parquet_file(path: str):
  """A ``pyarrow.parquet.ParquetFile`` read through Beam's FileSystems (closed on exit)."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  from apache_beam.io.filesystem import CompressionTypes  # pylint: disable=g-import-not-at-top
  with _fs().open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
    yield pq.ParquetFile(fh)


def parquet_num_rows(path: str) -> int:
  """Rows of a Parquet file, from its footer."""
  with parquet_file(path) as pf:
    return pf.metadata.num_rows


def parquet_rows(path: str, image_column: str, label_column: str) -> Iterator[tuple[Any, Any]]:
  """(image value, label value) of every row, in order, a batch at a time."""
  with parquet_file(path) as pf:
    for batch in pf.iter_batches(batch_size=64, columns=[image_column, label_column]):
      yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())


def parquet_example(ex_id: str, image: Any, label: Any, file_dir: str,
                    class_names: list[str]) -> Union[Example, Dead]:
  index = label_index(label, class_names)
  if isinstance(index, str):
    return ex_id, index
  if isinstance(image, dict):  # datasets' Image feature: {bytes, path}
    data, path = image.get('bytes'), image.get('path')
    if data is None:
      if not path:
        return ex_id, 'no image (bytes and path are empty)'
      data = load_image(resolve(file_dir, path), ex_id)
      if isinstance(data, tuple):
        return data
  elif isinstance(image, (bytes, bytearray)):
    data = bytes(image)
  elif isinstance(image, str) and image:
    data = load_image(resolve(file_dir, image), ex_id)
    if isinstance(data, tuple):
      return data
  else:
    return ex_id, 'no image'
  return Example(ex_id, index, data)


def parquet_file_inputs(path: str, rel: str, image_column: str, label_column: str,
                        class_names: list[str]) -> Iterator[Union[Example, Dead]]:
  file_dir = posixpath.dirname(path)
  for i, (image, label) in enumerate(parquet_rows(path, image_column, label_column)):
    yield parquet_example(f'{rel}/{i}', image, label, file_dir, class_names)


class ParquetSource(FileSource):
  """Parquet files of (image, label) rows, e.g. a Hugging Face dataset's."""

  def __init__(self, pattern: str, image_column: str = 'image', label_column: str = 'label',
               **kw):
    super().__init__(**kw)
    if not pattern:
      raise UserError('parquet: needs a glob, e.g. parquet:data/*.parquet')
    self.pattern, self.image_column, self.label_column = pattern, image_column, label_column
    self.base = glob_base(pattern)
    files = match(pattern)
    if not files:
      raise UserError(f'no Parquet files match {pattern}')
    self.name = posixpath.basename(self.base) or 'parquet'
    self._files: dict[str, list[tuple[str, str, int]]] = {}  # split → [(path, rel, rows)]
    schema = None
    for path in files:
      rel = relative_to(self.base, path)
      try:
        with parquet_file(path) as pf:
          schema, num_rows = schema or pf.schema_arrow, pf.metadata.num_rows
      except Exception as e:
        raise UserError(f'cannot read Parquet {path}: {str(e).splitlines()[0][:200]}') from None
      self._files.setdefault(split_of_path(rel, self.default_split), []).append(
          (path, rel, num_rows))
    self.splits = sorted(self._files)
    for col, flag in ((image_column, 'image_column'), (label_column, 'label_column')):
      if col not in schema.names:
        raise UserError(f'{files[0]} has no column {col!r} (columns: {", ".join(schema.names)}); '
                        f'name it with --{flag}')
    hf = json.loads((schema.metadata or {}).get(b'huggingface', b'{}'))
    feature = hf.get('info', {}).get('features', {}).get(label_column, {})
    if self.class_names_file:
      self.class_names = read_class_names(self.class_names_file)
    elif feature.get('_type') == 'ClassLabel' and feature.get('names'):
      self.class_names = [str(n) for n in feature['names']]
    else:  # read the label column only
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
      labels = []
      for path, _, _ in (f for fs in self._files.values() for f in fs):
        with _fs().open(path) as fh:
          labels += pq.read_table(fh, columns=[label_column]).column(0).to_pylist()
      self.class_names = names_from_labels(labels, pattern)
    if not self.class_names:
      raise UserError(f'{pattern}: column {label_column!r} holds no labels')

  def files(self, split: str) -> list[tuple[str, str, int]]:
    """[(path, id prefix, number of rows)] of ``split``."""
    self.check_split(split)
    return self._files[split]

  def num_examples(self, split):
    return sum(n for _, _, n in self.files(split))

  def inputs(self, split):
    for path, rel, _ in self.files(split):
      yield from parquet_file_inputs(path, rel, self.image_column, self.label_column,
                                     self.class_names)


# --------------------------------------------------------------------------
# WebDataset tar shards
# --------------------------------------------------------------------------


def member_key(name: str) -> tuple[str, str]:
  """WebDataset: key = path up to the first dot of the basename; the rest is the extension."""
  folder, base = posixpath.split(name)
  stem, _, ext = base.partition('.')
  return posixpath.join(folder, stem), ext.lower()


def open_tar(path: str, stream: bool = True):
  from apache_beam.io.filesystem import CompressionTypes  # pylint: disable=g-import-not-at-top
  fh = _fs().open(path, compression_type=CompressionTypes.UNCOMPRESSED)
  # Streaming ('r|*') reads each member once, in order, and gunzips .tar.gz.
  return fh, tarfile.open(fileobj=fh, mode='r|*' if stream else 'r:*')


def tar_groups(path: str, want=None) -> Iterator[tuple[str, dict[str, bytes]]]:
  """(key, {extension: bytes}) per member group (adjacent members sharing a key).

  ``want(ext)`` limits the members whose bytes are read (an uncompressed shard is then read
  by seeking past the others). A shard that cannot be read yields ('', {'error': reason})
  after the groups read before the failure.
  """
  key, members = None, {}
  try:
    fh, tar = open_tar(path, stream=want is None or not path.endswith('.tar'))
    with fh, tar:
      for m in tar:
        if not m.isfile():
          continue
        k, ext = member_key(m.name)
        if k != key:
          if key is not None:
            yield key, members
          key, members = k, {}
        if want is None or want(ext):
          members[ext] = tar.extractfile(m).read()
        else:
          members.setdefault(ext, b'')
    if key is not None:
      yield key, members
  except Exception as e:  # truncated or not a tar: the pending group is lost with the shard
    if key is not None:
      yield key, {**members, 'error': b''}
    reason = (f'missing shard: {path}' if key is None and not _exists(path) else
              f'cannot read shard: {type(e).__name__}: {e}')
    yield '', {'error': reason.encode()}


def wds_label(members: dict[str, bytes], label_field: Optional[str]) -> tuple[Any, Optional[str]]:
  """(label value, None) or (None, reason)."""
  if label_field:
    if 'json' not in members:
      return None, f'no label: no .json member (--label_field={label_field})'
    try:
      doc = json.loads(members['json'])
    except ValueError:
      return None, 'no label: .json is not valid JSON'
    if not isinstance(doc, dict) or label_field not in doc:
      return None, f'no label: .json has no field {label_field!r}'
    return doc[label_field], None
  if 'cls' in members:
    text = members['cls'].decode('utf-8', 'replace').strip()
    try:
      return int(text), None
    except ValueError:
      return None, f'.cls is not an integer: {text[:40]!r}'
  if 'txt' in members:
    return members['txt'].decode('utf-8', 'replace').strip(), None
  return None, 'no label member (.cls, .txt, or .json with --label_field)'


def wds_example(shard_id: str, key: str, members: dict[str, bytes], label_field: Optional[str],
                class_names: list[str]) -> Union[Example, Dead]:
  ex_id = f'{shard_id}/{key}' if key else shard_id
  if 'error' in members:
    return ex_id, (members['error'].decode() or 'member group cut short by an unreadable shard')
  image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
  if image is None:
    return ex_id, (f'no image member (.jpg/.jpeg/.png/.webp); has '
                   f'{", ".join("." + e for e in sorted(members)) or "nothing"}')
  value, reason = wds_label(members, label_field)
  if reason:
    return ex_id, reason
  index = label_index(value, class_names)
  if isinstance(index, str):
    return ex_id, index
  return Example(ex_id, index, image)


def shard_id(base: str, path: str) -> str:
  rel = relative_to(base, path)
  for ext in ('.tar.gz', '.tgz', '.tar'):
    if rel.endswith(ext):
      return rel[:-len(ext)]
  return rel


def count_groups(path: str) -> int:
  """The number of member groups in a shard, from the tar headers alone (+1 if unreadable)."""
  n, last = 0, None
  try:
    fh, tar = open_tar(path, stream=not path.endswith('.tar'))
    with fh, tar:
      for m in tar:  # seeking mode: member data is skipped, not read
        if m.isfile():
          k, _ = member_key(m.name)
          if k != last:
            n, last = n + 1, k
  except Exception:  # pylint: disable=broad-except
    n += 1  # the shard's own dead letter
  return n


class WdsSource(FileSource):
  """WebDataset tar shards (img2dataset's output, LAION-style)."""

  def __init__(self, pattern: str, label_field: Optional[str] = None, **kw):
    super().__init__(**kw)
    if not pattern:
      raise UserError('wds: needs a shard pattern, e.g. wds:shards/{00000..00009}.tar')
    self.pattern, self.label_field = pattern, label_field
    per_split = [re.fullmatch(r'(\w+)=(.+)', part) for part in pattern.split(';')]
    if all(per_split):  # train=PATTERN;test=PATTERN
      patterns = [m.groups() for m in per_split]
    elif ';' in pattern:
      raise UserError(f'wds:{pattern}: per-split patterns are SPLIT=PATTERN;SPLIT=PATTERN')
    else:
      patterns = [(None, pattern)]
    self._shards: dict[str, list[tuple[str, str]]] = {}  # split → [(path, shard id)]
    for split, pat in patterns:
      base = glob_base(pat)  # ids are relative to their own pattern's folder
      for path in self._expand(pat):
        sid = shard_id(base, path)
        self._shards.setdefault(split or split_of_path(sid, self.default_split), []).append(
            (path, sid))
    self.splits = sorted(self._shards)
    self.name = posixpath.basename(glob_base(patterns[0][1])) or 'webdataset'
    self._counts: dict[str, int] = {}
    if self.class_names_file:
      self.class_names = read_class_names(self.class_names_file)
    else:  # one pass over the shards reading only the label members
      labels = []
      for split, shards in self._shards.items():
        n = 0
        for path, _ in shards:
          for key, members in tar_groups(path, want=lambda e: e in ('cls', 'txt', 'json')):
            n += 1
            value, reason = wds_label(members, label_field) if 'error' not in members else (
                None, 'error')
            if reason is None:
              labels.append(value)
        self._counts[split] = n
      self.class_names = names_from_labels(labels, f'wds:{pattern}')
    if not self.class_names:
      raise UserError(f'wds:{pattern}: no labels found; pass --class_names=FILE')

  @staticmethod
  def _expand(pattern: str) -> list[str]:
    out = []
    for p in brace_expand(pattern):
      if any(c in p for c in '*?['):
        out += match(p)
      else:
        out.append(p)
    out = list(dict.fromkeys(out))  # nested braces may name a shard twice
    if not out:
      raise UserError(f'no shards match {pattern}')
    return out

  def shards(self, split: str) -> list[tuple[str, str]]:
    """[(path, shard id)] of ``split``."""
    self.check_split(split)
    return self._shards[split]

  def num_examples(self, split):
    self.check_split(split)
    return self._counts.get(split)  # known when class names came from a scan

  def num_parts(self, split):
    return len(self.shards(split))

  def inputs(self, split):
    for path, sid in self.shards(split):
      for key, members in tar_groups(path):
        yield wds_example(sid, key, members, self.label_field, self.class_names)
