"""Files where users keep them, through Beam's FileSystems (local, gs:// …): the one accessor.

Listing ("list or raise one line"), path arithmetic for ids and splits, and reading an
input file's bytes (only regular files, at most ``MAX_FILE_BYTES``: a FIFO would block
and ``/dev/zero`` never ends) live here once for every source kind.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Union

from clip_transfer.data.base import Dead, failure_reason
from clip_transfer.errors import UserError

# An input file larger than this is dead-lettered, never read (no image format needs it:
# preprocess.MAX_PIXELS of RGBA is ~360 MB uncompressed, encoded files are far smaller).
MAX_FILE_BYTES = 256 << 20
NAMED_SPLITS = ('train', 'validation', 'test')


def filesystems():
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  return FileSystems


def is_local(path: str) -> bool:
  return '://' not in path


def open_binary(path: str):
  """``path`` opened for reading as stored (AUTO would gunzip a file that ends in .gz)."""
  from apache_beam.io.filesystem import CompressionTypes  # pylint: disable=g-import-not-at-top
  return filesystems().open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_bytes(path: str) -> bytes:
  with open_binary(path) as fh:
    return fh.read()


def exists(path: str) -> bool:
  try:
    return filesystems().exists(path)
  except Exception:  # pylint: disable=broad-except
    return True  # cannot tell: report the read error itself


def size_of(path: str) -> int:
  """The file's size in bytes (any Beam filesystem)."""
  if is_local(path):
    return os.stat(path).st_size
  return filesystems().match([path])[0].metadata_list[0].size_in_bytes


def read_input(path: str, ex_id: str) -> Union[bytes, Dead]:
  """An input file's bytes, or the ``Dead`` input saying why not.

  Missing, not a regular file (FIFO, device, directory), larger than ``MAX_FILE_BYTES``
  or unreadable: every stage dead-letters it with the same reason.
  """
  limit = MAX_FILE_BYTES + 1  # bounded even where the size was not known
  if is_local(path):
    try:
      st = os.stat(path)  # follows symlinks: a link to a regular file is fine
    except FileNotFoundError:
      return Dead(ex_id, f'missing file: {path}')
    except OSError as e:
      return Dead(ex_id, failure_reason(e, f'cannot read {path}: '))
    if not stat.S_ISREG(st.st_mode):
      return Dead(ex_id, f'not a regular file: {path}')
    if st.st_size > MAX_FILE_BYTES:
      return Dead(ex_id, f'file too large: {st.st_size} bytes (limit {MAX_FILE_BYTES})')
    # read(n) allocates n bytes up front: 256 MB per file costs more than the read.
    limit = st.st_size + 1
  try:
    with open_binary(path) as fh:
      data = fh.read(limit)
      if len(data) == limit and limit <= MAX_FILE_BYTES:  # grew since the stat: read on
        data += fh.read(MAX_FILE_BYTES + 1 - len(data))
  except Exception as e:  # not found, permissions, network: Beam wraps them in BeamIOError
    if not exists(path):
      return Dead(ex_id, f'missing file: {path}')
    return Dead(ex_id, f'cannot read {path}: {type(e).__name__}')
  if len(data) > MAX_FILE_BYTES:
    return Dead(ex_id, f'file too large: over {MAX_FILE_BYTES} bytes')
  return data


def match(pattern: str) -> list[str]:
  """The sorted paths matching ``pattern``; a listing failure is one line."""
  try:
    return sorted(m.path for m in filesystems().match([pattern])[0].metadata_list)
  except Exception as e:  # no such directory, unknown scheme, permissions
    raise UserError(f'cannot list {pattern}: {str(e).splitlines()[0][:200]}') from None


def join(*parts: str) -> str:
  return filesystems().join(*parts)


def resolve(base_dir: str, path: str) -> str:
  """``path`` as written, or below ``base_dir`` when relative (any Beam filesystem)."""
  if '://' in path or path.startswith('/') or not base_dir:
    return path
  return join(base_dir, path)


def glob_base(pattern: str) -> str:
  """The folder part of ``pattern`` before its first wildcard (ids are relative to it)."""
  cut = min([i for i in (pattern.find(c) for c in '*?[{') if i >= 0] or [len(pattern)])
  return pattern[:cut].rsplit('/', 1)[0] if '/' in pattern[:cut] else ''


def relative_to(base: str, path: str) -> str:
  """``path`` below ``base``, '/'-separated (ids: 'train/cat/001.jpg', 'data/train-0.parquet')."""
  base = base.rstrip('/')
  if base and path.startswith(base + '/'):
    return path[len(base) + 1:].replace('\\', '/')
  if base and path.startswith(base):
    return path[len(base):].replace('\\', '/').lstrip('/')
  return path.split('://', 1)[-1].replace('\\', '/').lstrip('/')


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
