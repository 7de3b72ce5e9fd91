"""``csv:PATH``: a manifest of image paths and labels.

A Vertex AI import manifest (``[training|validation|test,]IMAGE,LABEL``, no header) or a
headed CSV/TSV with ``image``, ``label`` and optional ``split`` columns (other names through
``--image_column`` / ``--label_column``). Relative image paths resolve against the
manifest's folder. Id: the image path as written. A split's parts are its rows grouped by
id: rows listed twice are kept once when they agree, all dead when their labels differ.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import posixpath
import re
from typing import Optional

from clip_transfer.data import labels, paths
from clip_transfer.data.base import Dead, Example, Source
from clip_transfer.errors import UserError

PREFIX = 'csv:'
VERTEX_SPLITS = {'training': 'train', 'train': 'train', 'validation': 'validation',
                 'test': 'test', 'unassigned': None,
                 # Names people write for a validation split; Vertex AI's own is 'validation'.
                 'val': 'validation', 'valid': 'validation', 'dev': 'validation'}
_WORD = re.compile(r'[A-Za-z_][\w .-]*')


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


def _looks_like_header(first_line: str, layout: dict, base_dir: str) -> bool:
  """A first line of plain words whose 'image' is no file: a header we cannot map."""
  fields = [f.strip() for f in next(csv.reader([first_line], delimiter=layout['delimiter']))]
  if len(fields) < 2 or not all(_WORD.fullmatch(f) for f in fields):
    return False
  image = fields[1] if fields[0].lower() in VERTEX_SPLITS and len(fields) > 2 else fields[0]
  return '.' not in image and not paths.exists(paths.resolve(base_dir, image))


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
    elif len(fields) == 3 and _WORD.fullmatch(fields[0]) and '.' not in fields[0]:
      return default_split, line, None, (
          f'unknown split {fields[0]!r} in the first column (expected training, validation, '
          'test or unassigned)')
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
  n, names = len(rows), sorted({r[3] for r in rows})
  if len(names) > 1:
    reason = f'listed {n} times with different labels: {", ".join(map(repr, names))}'
    return [(r[0], r[1], None, reason) for r in rows]
  return rows[:1] + [(r[0], r[1], None, f'duplicate row (listed {n} times)') for r in rows[1:]]


@dataclasses.dataclass(frozen=True)
class ReadRows:
  """The rows of one id (a part) → one Example or Dead input per row."""

  base_dir: str
  class_names: tuple[str, ...]
  labels_optional: bool = False  # a row with no label is an example with label -1

  def __call__(self, rows: list):
    for _, ex_id, image, label in dedupe_rows(rows):
      if image is None:
        yield Dead(ex_id, label)  # the parse error's reason
        continue
      index = (-1 if self.labels_optional and not label else
               labels.label_index(label, list(self.class_names)))
      if isinstance(index, str):
        yield Dead(ex_id, index)
        continue
      data = paths.read_input(paths.resolve(self.base_dir, image), ex_id)
      yield data if isinstance(data, Dead) else Example(ex_id, index, data)


class CsvSource(Source):
  """A manifest of image paths and labels (Vertex AI layout or headed CSV/TSV)."""

  version = '0.0.0'

  def __init__(self, path: str, image_column: str = 'image', label_column: str = 'label',
               class_names: Optional[str] = None, default_split: str = 'train',
               max_classes: int = labels.MAX_CLASSES, labels_optional: bool = False):
    self.labels_optional = labels_optional
    if not path:
      raise UserError('csv: needs a manifest path, e.g. csv:gs://bucket/manifest.csv')
    self.path, self.default_split = path, default_split or 'train'
    self.name = posixpath.basename(path).split('.')[0] or path
    self.base_dir = posixpath.dirname(path)
    try:
      with paths.filesystems().open(path) as fh:  # AUTO: manifest.csv.gz works too
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
    elif not labels_optional and _looks_like_header(first, self.layout, self.base_dir):
      raise UserError(f'manifest {path}: the first line {first.strip()!r} looks like a header '
                      f'without {image_column!r} and {label_column!r} columns; name its '
                      'columns with --image_column=… --label_column=…')
    self.skip_header_lines = 1 if self.layout['header'] else 0
    rows = [r for r in (parse_csv_line(l, self.layout, self.default_split) for l in lines) if r]
    self._rows: dict[str, dict[str, list]] = {}  # split → id → rows, first-listed order
    for r in rows:
      self._rows.setdefault(r[0], {}).setdefault(r[1], []).append(r)
    self.splits = sorted(self._rows)
    if class_names:
      self.class_names = labels.read_class_names(class_names)
    else:
      self.class_names = labels.names_from_labels((r[3] for r in rows if r[2] is not None), path,
                                                  max_classes)
    if not self.class_names and not labels_optional:
      raise UserError(f'manifest {path} has no labels')

  def num_examples(self, split):
    self.check_split(split)
    return sum(len(rows) for rows in self._rows[split].values())

  def parts(self, split):
    self.check_split(split)
    return list(self._rows[split].values())

  def part_reader(self, split):
    return ReadRows(self.base_dir, tuple(self.class_names), self.labels_optional)

  def shared_inputs(self, splits) -> int:
    """How many images are listed in more than one of ``splits`` (the same path)."""
    seen: dict[str, int] = {}
    for split in splits:
      for rows in self._rows.get(split, {}).values():
        if rows[0][2] is not None:
          seen[rows[0][2]] = seen.get(rows[0][2], 0) + 1
    return sum(1 for n in seen.values() if n > 1)
