"""``folder:PATH``: ``PATH/<split>/<class>/<image>`` on any Beam filesystem (local, gs:// …).

Class names are the sorted class folder names. A split's parts are its listed files (at
any depth); a file outside the layout, a broken link, a symlink loop or a folder that
cannot be listed is a ``Dead`` input, never silently dropped. Id: the path below the root
('train/cat/001.jpg').
"""

from __future__ import annotations

import dataclasses
import functools
import os
import posixpath
from typing import Optional, Union

from clip_transfer.data import paths
from clip_transfer.data.base import Dead, Example, Source, failure_reason
from clip_transfer.errors import UserError

PREFIX = 'folder:'
LAYOUT = '<split>/<class>/<image>'


@dataclasses.dataclass(frozen=True)
class FolderEntry:
  """One image file found in the layout below ``ROOT/<split>/<class>/``."""

  id: str  # the path below the root ('train/cat/001.jpg'): the example's id
  path: str  # what to open
  cls: Optional[str]  # the class folder; None for an unlabelled image (labels_optional)


def _hidden(name: str) -> bool:
  return name.startswith('.')


def _entry(root: str, path: str, exists: bool = True, regular: bool = True,
           labels_optional: bool = False) -> Union[FolderEntry, Dead]:
  """Classifies one listed file by where it sits below ``root``."""
  rel = paths.relative_to(root, path)
  parts = rel.split('/')
  if not exists:
    return Dead(rel, f'broken symlink: {path}')
  if not regular:
    return Dead(rel, f'not a regular file: {path}')
  if len(parts) == 2 and labels_optional:  # <split>/<image>: an image with no label
    return FolderEntry(rel, path, None)
  if len(parts) == 2:
    return Dead(rel, f'directly in the split folder, not in a class folder (expected {LAYOUT})')
  if len(parts) > 3:
    return Dead(rel, f'in a nested folder {"/".join(parts[1:-1])} (expected {LAYOUT})')
  return FolderEntry(rel, path, parts[1])


def list_split(root: str, split: str,
               labels_optional: bool = False) -> list[Union[FolderEntry, Dead]]:
  """Every non-hidden file below ``root/split`` (at any depth), sorted by id.

  Hidden files and folders (a name starting with '.') are skipped and not counted.
  Local folders are walked following symlinks.
  """
  root = root.rstrip('/')
  if paths.is_local(root):
    return _list_local(root, split, labels_optional)
  entries = [_entry(root, p, labels_optional=labels_optional)
             for p in paths.match(paths.join(root, split, '**'))]
  return sorted((e for e in entries if not any(_hidden(p) for p in e.id.split('/'))),
                key=lambda e: e.id)


def _list_local(root: str, split: str,
                labels_optional: bool = False) -> list[Union[FolderEntry, Dead]]:
  base = os.path.join(root, split)
  entries: list[Union[FolderEntry, Dead]] = []

  def unlistable(e: OSError):
    path = e.filename or base
    entries.append(Dead(paths.relative_to(root, path) + '/',
                        f'cannot list folder: {failure_reason(e)}'))

  chains: dict[str, tuple[str, ...]] = {}  # folder → real paths of it and its ancestors
  for dirpath, dirnames, filenames in os.walk(base, onerror=unlistable, followlinks=True):
    real = os.path.realpath(dirpath)
    above = chains.get(os.path.dirname(dirpath), ())
    if real in above:  # a symlink back up the tree
      entries.append(Dead(paths.relative_to(root, dirpath) + '/',
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
  if paths.is_local(root):
    try:
      return sorted(d for d in os.listdir(root)
                    if not _hidden(d) and os.path.isdir(os.path.join(root, d)))
    except OSError as e:
      if not os.path.exists(root):
        return []
      raise UserError(f'cannot list {root}: {failure_reason(e)}') from None
  found = (paths.relative_to(root, p).split('/') for p in paths.match(paths.join(root, '**')))
  return sorted({p[0] for p in found if len(p) > 1 and not _hidden(p[0])})


@dataclasses.dataclass(frozen=True)
class ReadEntry:
  """A listed entry → an Example (the file's bytes) or a Dead input."""

  class_names: tuple[str, ...]

  def __call__(self, entry: Union[FolderEntry, Dead]):
    if isinstance(entry, Dead):
      yield entry
      return
    if entry.cls is not None and entry.cls not in self.class_names:  # appeared after listing
      yield Dead(entry.id, f'class folder {entry.cls!r} is not one of the classes listed when '
                 'the run started')
      return
    data = paths.read_input(entry.path, entry.id)
    label = -1 if entry.cls is None else self.class_names.index(entry.cls)
    yield data if isinstance(data, Dead) else Example(entry.id, label, data)


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
                               if isinstance(e, FolderEntry) and e.cls})

  @functools.cached_property
  def _entries(self) -> dict[str, list[Union[FolderEntry, Dead]]]:
    """{split: every entry found below it} (splits with nothing in them left out)."""
    out = {}
    for split in _list_splits(self.root):
      entries = list_split(self.root, split, self.labels_optional)
      if entries:
        out[split] = entries
    return out

  def parts(self, split):
    """Everything found below ``split``, dead entries included (one input each)."""
    self.check_split(split)
    return self._entries[split]

  def num_examples(self, split):
    return len(self.parts(split))

  def part_reader(self, split):
    return ReadEntry(tuple(self.class_names))
