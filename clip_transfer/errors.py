"""Errors a user can act on: entry points print them as one line, no traceback."""

import functools
import sys


class UserError(Exception):
  """Bad input or environment; the message says what to do."""


def cli_main(fn):
  """Wraps an entry point: a UserError becomes 'error: …' on stderr, exit 2."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except UserError as e:
      print(f'error: {e}', file=sys.stderr)
      raise SystemExit(2) from None

  return wrapper
