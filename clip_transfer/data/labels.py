"""Class names and labels of the csv:/parquet:/wds: sources: one set of rules for all three."""

from __future__ import annotations

from typing import Any, Iterable, Union

from clip_transfer.data import paths
from clip_transfer.data.base import MAX_CLASSES
from clip_transfer.errors import UserError


def read_class_names(path: str) -> list[str]:
  """One class name per line (blank lines ignored); the line order is the label order."""
  try:
    names = [l.strip() for l in paths.read_bytes(path).decode('utf-8').splitlines() if l.strip()]
  except Exception as e:
    raise UserError(f'cannot read --class_names {path}: {str(e).splitlines()[0][:200]}') from None
  if not names:
    raise UserError(f'--class_names {path} is empty')
  check_unique(names, f'--class_names {path}')
  return names


def check_unique(names: list[str], what: str) -> None:
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise UserError(f'{what} repeats {", ".join(dup)}')


def names_from_labels(values: Iterable[Any], what: str,
                      max_classes: int = MAX_CLASSES) -> list[str]:
  """Class names from the labels seen: ints → '0'..'max' (label = value), strings → sorted."""
  values = {v for v in values if v is not None and v != '' and v != -1}
  ints = {v for v in values if isinstance(v, int) and not isinstance(v, bool)}
  if ints and len(ints) != len(values):
    raise UserError(f'{what}: labels mix integers and strings; pass --class_names=FILE')
  if ints:
    if min(ints) < 0:
      raise UserError(f'{what}: negative label {min(ints)}')
    if max(ints) >= max_classes:
      raise UserError(f'{what}: integer label {max(ints)} would make {max(ints) + 1} classes '
                      f'(limit {max_classes}); fix the label, raise --max_classes or pass '
                      '--class_names=FILE')
    return [str(i) for i in range(max(ints) + 1)]
  names = sorted(str(v).strip() for v in values if str(v).strip())
  if len(names) > max_classes:
    raise UserError(f'{what}: {len(names)} distinct labels (limit {max_classes}); raise '
                    '--max_classes or pass --class_names=FILE')
  return names


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
