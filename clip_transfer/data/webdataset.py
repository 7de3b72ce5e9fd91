"""``wds:PATTERN``: WebDataset tar shards (img2dataset's output, LAION-style).

Brace patterns (``shards/{00000..00099}.tar``), per split ``train=PATTERN;test=PATTERN``.
Members are grouped by key; image from .jpg/.jpeg/.png/.webp, label from .cls, a field of
.json (``label_field``) or .txt. A split's parts are its shards. Id: ``SHARD/KEY``.

A shard cut short loses what follows the cut: Python's tarfile reads a short header as the
end of the archive, so an uncompressed shard's size is checked against the end of its last
member and its end-of-archive blocks, and the loss is a ``Dead`` input with its reason.
A key seen twice in a shard is dead-lettered after its first group, like a repeated CSV row.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
import tarfile
from typing import Any, Iterator, Optional

from clip_transfer.data import labels, paths
from clip_transfer.data.base import Dead, Example, Input, Source
from clip_transfer.errors import UserError

PREFIX = 'wds:'
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
BLOCK = 512  # tar's block size; an archive ends with two zero blocks
ERROR = 'error'  # the member-group key under which tar_groups reports a shard's failure


def member_key(name: str) -> tuple[str, str]:
  """WebDataset: key = path up to the first dot of the basename; the rest is the extension."""
  folder, base = posixpath.split(name)
  stem, _, ext = base.partition('.')
  return posixpath.join(folder, stem), ext.lower()


def open_tar(path: str, stream: bool = True):
  fh = paths.open_binary(path)
  # Streaming ('r|*') reads each member once, in order, and gunzips .tar.gz.
  return fh, tarfile.open(fileobj=fh, mode='r|*' if stream else 'r:*')


def _cut_short(path: str, end: int) -> Optional[str]:
  """Why an uncompressed shard whose last member ends at byte ``end`` was cut short, or None."""
  if not path.endswith('.tar'):
    return None  # compressed: a cut stream fails to decompress, which tarfile reports
  size = paths.size_of(path)
  if size - end >= 2 * BLOCK:
    with paths.open_binary(path) as fh:
      fh.seek(end)
      if not fh.read(2 * BLOCK).strip(b'\0'):
        return None  # the end-of-archive blocks: complete
  return (f'shard cut short: {size - end} byte(s) after the last complete member at byte {end} '
          'are not the end-of-archive blocks (members after it are lost)')


def tar_groups(path: str, want=None) -> Iterator[tuple[str, dict[str, bytes]]]:
  """(key, {extension: bytes}) per member group (adjacent members sharing a key).

  ``want(ext)`` limits the members whose bytes are read (an uncompressed shard is then read
  by seeking past the others). A shard that cannot be read, or was cut short, yields
  ('', {ERROR: reason}) after the groups read before the failure.
  """
  key, members, end = None, {}, 0
  try:
    fh, tar = open_tar(path, stream=want is None or not path.endswith('.tar'))
    with fh, tar:
      for m in tar:
        end = m.offset_data + -(-m.size // BLOCK) * BLOCK
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
    problem = _cut_short(path, end)
  except Exception as e:  # truncated or not a tar: the pending group is lost with the shard
    if key is not None:
      yield key, {**members, ERROR: b''}
    problem = (f'missing shard: {path}' if key is None and not paths.exists(path) else
               f'cannot read shard: {type(e).__name__}: {e}')
  if problem:
    yield '', {ERROR: problem.encode()}


def label_of(members: dict[str, bytes], label_field: Optional[str]) -> tuple[Any, Optional[str]]:
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


@dataclasses.dataclass(frozen=True)
class ReadShard:
  """(path, shard id) → one Example or Dead input per member group."""

  label_field: Optional[str]
  class_names: tuple[str, ...]

  def __call__(self, part) -> Iterator[Input]:
    path, sid = part
    seen = set()
    for key, members in tar_groups(path):
      ex_id = f'{sid}/{key}' if key else sid
      if key and key in seen and ERROR not in members:
        yield Dead(ex_id, 'duplicate key: a second member group with this key in the shard')
        continue
      seen.add(key)
      yield self.group(ex_id, members)

  def group(self, ex_id: str, members: dict[str, bytes]) -> Input:
    if ERROR in members:
      return Dead(ex_id, members[ERROR].decode() or
                  'member group cut short by an unreadable shard')
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    if image is None:
      return Dead(ex_id, f'no image member (.jpg/.jpeg/.png/.webp); has '
                  f'{", ".join("." + e for e in sorted(members)) or "nothing"}')
    value, reason = label_of(members, self.label_field)
    if reason:
      return Dead(ex_id, reason)
    index = labels.label_index(value, list(self.class_names))
    if isinstance(index, str):
      return Dead(ex_id, index)
    return Example(ex_id, index, image)


def shard_id(base: str, path: str) -> str:
  rel = paths.relative_to(base, path)
  for ext in ('.tar.gz', '.tgz', '.tar'):
    if rel.endswith(ext):
      return rel[:-len(ext)]
  return rel


def count_groups(path: str) -> int:
  """Member groups in a shard, from the tar headers alone (+1 for an unreadable or cut shard)."""
  return sum(1 for _ in tar_groups(path, want=lambda ext: False))


class WdsSource(Source):
  """WebDataset tar shards (img2dataset's output, LAION-style)."""

  version = '0.0.0'

  def __init__(self, pattern: str, label_field: Optional[str] = None,
               class_names: Optional[str] = None, default_split: str = 'train',
               max_classes: int = labels.MAX_CLASSES):
    if not pattern:
      raise UserError('wds: needs a shard pattern, e.g. wds:shards/{00000..00009}.tar')
    self.pattern, self.label_field = pattern, label_field
    self.default_split = default_split or 'train'
    per_split = [re.fullmatch(r'(\w+)=(.+)', part) for part in pattern.split(';')]
    if all(per_split):  # train=PATTERN;test=PATTERN
      patterns = [m.groups() for m in per_split]
    elif ';' in pattern:
      raise UserError(f'wds:{pattern}: per-split patterns are SPLIT=PATTERN;SPLIT=PATTERN')
    else:
      patterns = [(None, pattern)]
    self._shards: dict[str, list[tuple[str, str]]] = {}  # split → [(path, shard id)]
    for split, pat in patterns:
      base = paths.glob_base(pat)  # ids are relative to their own pattern's folder
      for path in self._expand(pat):
        sid = shard_id(base, path)
        self._shards.setdefault(split or paths.split_of_path(sid, self.default_split),
                                []).append((path, sid))
    every = [path for shards in self._shards.values() for path, _ in shards]
    if not any(paths.exists(p) for p in every):
      raise UserError(f'wds:{pattern}: none of its {len(every)} shard(s) exists '
                      f'(first: {every[0]})')
    self.splits = sorted(self._shards)
    self.name = posixpath.basename(paths.glob_base(patterns[0][1])) or 'webdataset'
    self._counts: dict[str, int] = {}
    if class_names:
      self.class_names = labels.read_class_names(class_names)
    else:  # one pass over the shards reading only the label members
      values = []
      for split, shards in self._shards.items():
        n = 0
        for path, _ in shards:
          for _, members in tar_groups(path, want=lambda e: e in ('cls', 'txt', 'json')):
            n += 1
            value, reason = (label_of(members, label_field) if ERROR not in members
                             else (None, ERROR))
            if reason is None:
              values.append(value)
        self._counts[split] = n
      self.class_names = labels.names_from_labels(values, f'wds:{pattern}', max_classes)
    if not self.class_names:
      raise UserError(f'wds:{pattern}: no labels found; pass --class_names=FILE')

  @staticmethod
  def _expand(pattern: str) -> list[str]:
    out = []
    for p in paths.brace_expand(pattern):
      if any(c in p for c in '*?['):
        out += paths.match(p)
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

  def parts(self, split):
    return self.shards(split)

  def part_reader(self, split):
    return ReadShard(self.label_field, tuple(self.class_names))
