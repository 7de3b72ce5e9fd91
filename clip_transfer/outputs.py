"""Output directories: a run may only ever remove what a run of this tool wrote.

Every stage claims its output directory with ``prepare_output_dir`` before any
expensive work. Claiming writes a small marker file first (which also proves
the directory is writable: a read-only directory fails here, not after all the
inference), refuses a path that is a file, and refuses a directory holding any
file the stage does not write. ``overwrite`` then deletes only the stage's own
files, the completion file first, so an interrupted delete never looks complete.

A claim is exclusive for the life of the process (``claim_exclusive``): a second
run pointed at a directory another live run holds is refused in one line, even
when both start within the same second. The lock is the kernel's ``flock`` on
the directory itself, so it goes away with the process however it ends (even
SIGKILL) and never leaves a stale lock file behind.

Works on local paths and on any Beam filesystem (gs://, …); the exclusive
claim is local-only (object stores have no lock to take).
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import os
from typing import Optional, Sequence

from clip_transfer.errors import UserError

# Written first into every output directory the tool claims.
MARKER = '.clip-transfer-output'

# Directories this process holds: {normalised path: open fd carrying the flock}.
_HELD: dict[str, int] = {}


def claimed() -> list[str]:
  """The output directories this process claimed, in claim order (for error messages)."""
  return list(_HELD)


def claim_exclusive(path: str, flag: str = '--output_dir') -> None:
  """Holds ``path`` (created if missing) for this process; refuses one another run holds.

  Idempotent within a process. Non-local paths are not locked.

  Raises:
    UserError: the directory is in use by another run, or cannot be created.
  """
  if not is_local(path):
    return
  key = os.path.realpath(path)
  if _holds(key):
    return
  try:
    os.makedirs(path, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
  except OSError as e:
    raise UserError(f'cannot create {flag}={path}: {_one_line(e)}') from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
      raise UserError(f'{flag}={path} is in use by another run that is still going; wait for '
                      f'it to finish or choose another {flag}') from None
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
      raise UserError(f'cannot lock {flag}={path}: {_one_line(e)}') from None
    fd = -1  # a filesystem without locks (some network mounts): claim without one
  _HELD[key] = fd


def _holds(key: str) -> bool:
  """Whether this process's claim on ``key`` is still on that very directory."""
  if key not in _HELD:
    return False
  fd = _HELD[key]
  try:
    if fd < 0 or os.fstat(fd).st_ino == os.stat(key).st_ino:
      return True
  except OSError:
    pass
  release(key)  # the directory was removed (and maybe made again) since: claim it afresh
  return False


def release(path: str) -> None:
  """Gives up this process's claim on ``path``."""
  fd = _HELD.pop(os.path.realpath(path), -1)
  if fd >= 0:
    os.close(fd)


def release_all() -> None:
  """Gives up every claim (the CLI wrapper calls it when a stage returns or fails)."""
  for key in list(_HELD):
    release(key)


def _fs():
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  return FileSystems


def is_local(path: str) -> bool:
  return '://' not in path


def join(path: str, name: str) -> str:
  return os.path.join(path, name) if is_local(path) else _fs().join(path, name)


def create_file(path: str):
  """A new file at ``path`` (local or a Beam filesystem), open for writing bytes, uncompressed."""
  if is_local(path):
    # What Beam's local filesystem does, without importing Beam (seconds per process) in
    # stages that write nowhere else (fine-tune).
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    return open(path, 'wb')
  from apache_beam.io.filesystem import CompressionTypes  # pylint: disable=g-import-not-at-top
  return _fs().create(path, compression_type=CompressionTypes.UNCOMPRESSED)


def list_files(path: str) -> list[str]:
  """Every file below ``path`` (hidden ones included), as '/'-separated relative paths.

  Local directories are walked without following symlinks: a link is listed as
  a file (so it is foreign unless its name is one we write) and never entered.
  """
  if is_local(path):
    if not os.path.isdir(path):
      return []
    out = []
    for dirpath, dirnames, filenames in os.walk(path, onerror=_raise):
      rel = os.path.relpath(dirpath, path)
      for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
        out.append(name if rel == '.' else f'{rel}/{name}'.replace(os.sep, '/'))
      if not filenames and not dirnames and rel != '.':
        out.append(rel.replace(os.sep, '/') + '/')  # an empty folder is still something
    return sorted(out)
  fs = _fs()
  prefix = path.rstrip('/') + '/'
  metadata = fs.match([prefix + '**'])[0].metadata_list
  return sorted(m.path[len(prefix):] if m.path.startswith(prefix) else m.path for m in metadata)


def _raise(e):
  raise e


def _owned(rel: str, owned: Sequence[str]) -> bool:
  return rel == MARKER or any(fnmatch.fnmatchcase(rel, pat) for pat in owned)


def prepare_output_dir(path: str, overwrite: bool, kind: str, owned: Sequence[str],
                       complete: Optional[str] = None, flag: str = '--output_dir',
                       clear: bool = True) -> None:
  """Claims ``path`` for a stage's output; see the module docstring.

  Args:
    path: the output directory (local or any Beam filesystem).
    overwrite: delete the stage's own files from a previous run.
    kind: what the directory holds, for messages ('embedding dataset').
    owned: fnmatch patterns of the files the stage writes, relative to ``path``
      ('metadata.json', 'dead_letters.*.jsonl', 'checkpoints/*'). The marker is
      always owned. Anything else found there is foreign: the run is refused.
    complete: the file whose presence marks a finished run (deleted first).
    flag: the flag that names ``path``, for messages.
    clear: False checks and claims only (call it before loading a model, then
      again with True once nothing else can fail cheaply).

  Raises:
    UserError: one line, naming the path and what to do.
  """
  path = path.rstrip('/') or path
  if is_local(path) and os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f'{flag}={path} is a file, not a directory; choose another {flag}')
  # Exclusive before anything is read: a concurrent run's half-written files must
  # never be taken for a previous run's (and --overwrite must never delete them).
  claim_exclusive(path, flag)
  try:
    existing = list_files(path)
  except Exception as e:  # permissions, unknown scheme
    raise UserError(f'cannot list {flag}={path}: {_one_line(e)}') from None
  foreign = [f for f in existing if not _owned(f, owned)]
  if foreign:
    # Never suggest --overwrite here: it would not (and must not) remove these.
    more = f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''
    raise UserError(f'{flag}={path} holds files this tool did not write ({foreign[0]}{more}); '
                    f'choose an empty or new {flag}')
  ours = [f for f in existing if f != MARKER]
  if ours and not overwrite:
    done = complete is not None and complete in ours
    article = 'an' if kind[:1].lower() in 'aeiou' else 'a'
    what = (f'{article} {kind}' if done or complete is None
            else f'the files of an incomplete run (no {complete})')
    raise UserError(f'{flag}={path} already holds {what}; pass --overwrite to replace it, '
                    f'or choose another {flag}')
  _claim(path, kind)
  if ours and clear:
    fs = _fs()
    # The completion file first, so an interrupted delete is never "complete".
    ours.sort(key=lambda f: f != complete)
    try:
      fs.delete([fs.join(path, *f.rstrip('/').split('/')) for f in ours])
    except Exception as e:
      raise UserError(f'cannot remove the previous {kind} in {path}: {_one_line(e)}') from None
    if is_local(path):  # folders left empty by the delete
      for dirpath, _, _ in sorted(os.walk(path), reverse=True):
        if dirpath != path and not os.listdir(dirpath):
          os.rmdir(dirpath)


def claim_files(path: str, names: Sequence[str], kind: str, flag: str = '--output_dir',
                adopt: bool = False) -> None:
  """Claims the files ``names`` in a local directory other outputs may share (a run directory).

  The directory's marker lists the files this tool wrote there; one of
  ``names`` that exists but is not listed is the user's, and is refused in one
  line (never replaced). ``adopt``: the existing ones are ours after all (a
  file an older version wrote before the marker listed it).
  """
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f'{flag}={path} is a file, not a directory; choose another {flag}')
  marker = os.path.join(path, MARKER)
  try:
    with open(marker) as fh:
      record = json.load(fh)
    if not isinstance(record, dict):
      raise ValueError('not an object')
  except FileNotFoundError:
    record = {'written_by': 'clip-transfer', 'kind': kind}
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {marker}: {_one_line(e)}') from None
  listed = set(record.get('files') or ())
  if not adopt:
    for name in names:
      if os.path.lexists(os.path.join(path, name)) and name not in listed:
        raise UserError(f'{os.path.join(path, name)} was not written by {kind}; move it or pass '
                        f'another {flag}')
  record['files'] = sorted(listed | set(names))
  try:
    os.makedirs(path, exist_ok=True)
    with open(marker + '.tmp', 'w') as fh:  # then renamed: the marker is never half written
      fh.write(json.dumps(record) + '\n')
    os.replace(marker + '.tmp', marker)
  except OSError as e:  # read-only, no permission
    raise UserError(f'cannot write to {flag}={path}: {_one_line(e)}') from None


def _claim(path: str, kind: str) -> None:
  """Writes the marker (proves the directory is ours and writable)."""
  try:
    with create_file(join(path, MARKER)) as fh:
      fh.write(json.dumps({'written_by': 'clip-transfer', 'kind': kind}).encode() + b'\n')
  except Exception as e:  # read-only, no permission, a file in the way
    raise UserError(f'cannot write to {path}: {_one_line(e)}') from None


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0][:200] if text else ""}'.rstrip(': ')
