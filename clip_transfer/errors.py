"""Errors a user can act on: entry points print them as one line, no traceback.

``cli_main`` wraps every stage's ``main``: a ``UserError`` is ``error: …`` and
exit 2; a full disk (ENOSPC, EDQUOT, or EFBIG from the file size limit) is one
line naming the filesystem and what is left on it, exit 2; Ctrl-C is one line,
exit 130. ``Parser`` is every CLI's argparse parser: no prefix matching, and an
unknown flag's error names the closest one. Importing this module also silences the
import-time log lines of our dependencies (Beam's "apitools not found", TFDS' "OpenCV
is not installed"), so that an error really is the only line a failed run prints.
"""

import argparse
import difflib
import errno
import functools
import logging
import os
import re
import signal
import sys
import threading
from typing import Optional


class UserError(Exception):
  """Bad input or environment; the message says what to do."""


INTERRUPTED_EXIT = 130  # 128 + SIGINT, what shells report for Ctrl-C
INTERRUPTED = ('interrupted (Ctrl-C); the run did not finish, and what it wrote is not a '
               'finished result')

# Lines our dependencies log when imported or on first use that say nothing about the run:
# (logger name, start of the message).
_NOISE = (
    ('root', 'apitools not found'),  # apache_beam.io.gcp.internal.clients.bigquery
    ('apache_beam.io.gcp.bigquery', 'No module named google.cloud.bigquery_storage_v1'),
    ('absl', 'OpenCV is not installed'),  # tensorflow_datasets' image decoding
)


class _DropNoise(logging.Filter):

  def __init__(self, prefixes):
    super().__init__()
    self._prefixes = tuple(prefixes)

  def filter(self, record):
    return not str(record.msg).startswith(self._prefixes)


def _silence_import_noise() -> None:
  """Filters the lines of ``_NOISE`` at the loggers that emit them (once per process)."""
  # TensorFlow's C++ INFO lines ("oneDNN custom operations are on"); a user's setting wins.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  try:  # absl's logger must be absl's own class: let absl create it before we touch it
    import absl.logging  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass
  by_logger: dict[str, list[str]] = {}
  for name, prefix in _NOISE:
    by_logger.setdefault(name, []).append(prefix)
  for name, prefixes in by_logger.items():
    logger = logging.getLogger(None if name == 'root' else name)
    if not any(isinstance(f, _DropNoise) for f in logger.filters):
      logger.addFilter(_DropNoise(prefixes))


_silence_import_noise()


class _DropReraised(logging.Filter):
  """Beam logs a DoFn's exception (with its traceback) and then re-raises it to the caller."""

  def filter(self, record):
    return not isinstance(record.msg, BaseException)


def _quiet_reraised_errors() -> None:
  # Only in the process that runs a stage's main, where the exception arrives next: a
  # known failure is then one line, a bug still its traceback. Workers (Dataflow, Beam's
  # multi-processing) never run main, so their logs keep what they report.
  logger = logging.getLogger('apache_beam.runners.common')
  if not any(isinstance(f, _DropReraised) for f in logger.filters):
    logger.addFilter(_DropReraised())

# errno values that mean "the disk cannot take more": no space, quota, file size limit.
_DISK_FULL = {errno.ENOSPC: 'no space left on device', errno.EDQUOT: 'disk quota exceeded',
              errno.EFBIG: 'file too large'}
# Beam's runners re-raise a worker's OSError as text ("[Errno 28] No space left on device").
_ERRNO_TEXT = re.compile(r'\[Errno (%s)\]' % '|'.join(str(n) for n in _DISK_FULL))


def _chain(e: BaseException):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def interrupted(e: BaseException) -> bool:
  """True for Ctrl-C, also when a library wrapped the KeyboardInterrupt in another error."""
  return _interrupted or any(isinstance(x, KeyboardInterrupt) for x in _chain(e))


def disk_full_errno(e: BaseException) -> Optional[int]:
  """ENOSPC, EDQUOT or EFBIG when ``e`` (or what caused it) is a full disk, else None."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno in _DISK_FULL:
      return x.errno
    m = _ERRNO_TEXT.search(str(x))
    if m:
      return int(m.group(1))
  return None


def _size(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if n < 1024 or unit == 'TiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n} B'


def _mount_point(path: str) -> str:
  path = os.path.realpath(path)
  while not os.path.ismount(path):
    path = os.path.dirname(path)
  return path


def disk_full_message(code: int, where: list[str]) -> str:
  """One line: what failed, the filesystem of ``where`` (written-to dirs) and what is left."""
  what = _DISK_FULL[code]
  local = [w for w in where if '://' not in w]
  if not local:
    return f'{what} while writing {where[0] if where else "the output"}; free some space'
  target = local[0]
  probe = target
  while probe and not os.path.exists(probe):
    probe = os.path.dirname(probe.rstrip('/'))
  probe = probe or '.'
  try:
    st = os.statvfs(probe)
    space = (f'filesystem {_mount_point(probe)} has {_size(st.f_bavail * st.f_frsize)} free of '
             f'{_size(st.f_blocks * st.f_frsize)}')
  except OSError:
    space = 'its filesystem could not be queried'
  if code == errno.EFBIG:
    import resource  # pylint: disable=g-import-not-at-top
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    shown = 'unlimited' if limit == resource.RLIM_INFINITY else _size(limit)
    return (f'{what} while writing {target}: a file reached the size limit ({shown}; see '
            f'ulimit -f) or the filesystem\'s largest file ({space}); nothing was finished')
  return (f'{what} while writing {target} ({space}); nothing was finished: free some space or '
          'choose another output directory, then run again')


def _written_dirs(e: BaseException) -> list[str]:
  """Where the failed write went: the file the error names, else the dirs this run claimed."""
  for x in _chain(e):
    name = getattr(x, 'filename', None)
    if isinstance(name, str) and name:
      return [os.path.dirname(os.path.abspath(name))]
  outputs = sys.modules.get('clip_transfer.outputs')  # loaded by whatever claimed a directory
  return outputs.claimed() if outputs else []


def _fail(message: str, code: int, process_exit: bool):
  """Prints the one line and exits with ``code``.

  ``process_exit`` (the stage runs as ``python -m …``): leave with ``os._exit``,
  skipping the interpreter's teardown. A failed or interrupted run can leave
  native threads working: an XLA compilation on jaxlib's thread pool
  (``PjRtCompiler::CompileAndLoad``, seen in a core dump after Ctrl-C during the
  handler's jit) keeps running while finalization destroys the PjRt client under
  it, which crashed the process after our line (SIGSEGV, or std::terminate's
  "terminate called without an active exception", rc 134), and asyncio loops of
  checkpoint libraries print "Event loop is closed" tracebacks from their
  finalizers. Python cannot join those threads; nothing at exit is needed
  after a failure (every output is written atomically or marked incomplete,
  and the directory lock goes with the process).
  """
  print(f'error: {message}', file=sys.stderr)
  if not process_exit:  # called as a function (tests, notebooks): an ordinary SystemExit
    raise SystemExit(code) from None
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except  (a closed pipe must not hide the code)
      pass
  os._exit(code)  # pylint: disable=protected-access


def _excepthook(tp, value, tb):
  """Ctrl-C before ``main`` runs (while the stage imports JAX, TF, Beam): the same one line."""
  if interrupted(value):
    print(f'error: {INTERRUPTED}', file=sys.stderr)
    sys.stderr.flush()
    # Half-imported native extensions can crash the interpreter's teardown; nothing
    # was started that needs it.
    os._exit(INTERRUPTED_EXIT)  # pylint: disable=protected-access
  _previous_excepthook(tp, value, tb)


_interrupted = False  # set by the first Ctrl-C, whatever a library then makes of the exception


def _on_sigint(signum, frame):
  # Some imports turn KeyboardInterrupt into ImportError, and some import guards then
  # swallow that and carry on: remember the Ctrl-C so the run still stops.
  global _interrupted
  _interrupted = True
  signal.default_int_handler(signum, frame)


def check_interrupted() -> None:
  """Raises KeyboardInterrupt if Ctrl-C was pressed during this run, even if a library swallowed it.

  Called just before a stage marks its output finished: a Ctrl-C that landed in an
  import guard (or any code that caught the exception and went on) must not leave a
  directory that reads as a finished result.
  """
  if _interrupted:
    raise KeyboardInterrupt


if (threading.current_thread() is threading.main_thread()
    and signal.getsignal(signal.SIGINT) is signal.default_int_handler):  # not when ignored (&)
  signal.signal(signal.SIGINT, _on_sigint)

_previous_excepthook = sys.excepthook
if sys.excepthook is sys.__excepthook__:  # not under IPython/pytest hooks of their own
  sys.excepthook = _excepthook


def cli_main(fn):
  """Wraps an entry point: one ``error: …`` line on stderr (see the module docstring)."""

  # `python -m stage`: main is defined in __main__, and this process is the run.
  process_exit = fn.__module__ == '__main__'

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      _quiet_reraised_errors()
      check_interrupted()  # Ctrl-C while the stage was importing, swallowed by an import guard
      return fn(*args, **kwargs)
    except UserError as e:
      _fail(str(e), 2, process_exit)
    except KeyboardInterrupt:
      _fail(INTERRUPTED, INTERRUPTED_EXIT, process_exit)
    except Exception as e:  # pylint: disable=broad-except
      if interrupted(e):  # Ctrl-C seen by a library that re-raised it as its own error
        _fail(INTERRUPTED, INTERRUPTED_EXIT, process_exit)
      code = disk_full_errno(e)
      if code is None:
        raise
      _fail(disk_full_message(code, _written_dirs(e)), 2, process_exit)
    finally:
      outputs = sys.modules.get('clip_transfer.outputs')
      if outputs:  # the run is over: its output directories are free for the next one
        outputs.release_all()

  return wrapper


class Parser(argparse.ArgumentParser):
  """Every CLI's parser: argparse without prefix matching, so a mistyped ``--output`` is
  refused instead of taken for ``--output_dir`` (and a Beam option such as ``--project``
  is not taken for embed's ``--projected``); an unknown flag's error names the closest
  one."""

  def __init__(self, **kwargs):
    super().__init__(allow_abbrev=False, **kwargs)

  def parse_args(self, args=None, namespace=None):  # pylint: disable=signature-differs
    known, rest = self.parse_known_args(args, namespace)
    if rest:
      self.error('unrecognized arguments: ' + ' '.join(
          f'{a} (did you mean --{c}?)' if (c := closest_flag(self, a)) else a for a in rest))
    return known


def _flag_names(parser: argparse.ArgumentParser) -> list[str]:
  return sorted({s[2:] for s in parser._option_string_actions if s.startswith('--')})  # pylint: disable=protected-access


def flag_name(arg: str) -> Optional[str]:
  """``name`` of a command-line word ``--name[=value]``; None for anything else."""
  if not arg.startswith('--') or arg == '--':
    return None
  return arg[2:].split('=', 1)[0]


def closest_flag(parser: argparse.ArgumentParser, arg: str, cutoff: float = 0.6) -> Optional[str]:
  """The parser's flag ``arg`` (``--name[=value]``) most likely meant, or None: one it
  abbreviates, else the closest spelling."""
  name = flag_name(arg)
  if name is None:
    return None
  ours = _flag_names(parser)
  longer = [f for f in ours if f.startswith(name)]
  if len(longer) == 1:
    return longer[0]
  close = difflib.get_close_matches(name, ours, n=1, cutoff=cutoff)
  return close[0] if close else None
