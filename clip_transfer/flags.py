"""Command-line flags derived from a config dataclass: each field is declared once, with its help.

    @dataclasses.dataclass
    class Config:
      lr: float = flags.field(1e-3, 'peak learning rate')
      modes: tuple[str, ...] = flags.field(('linear',), 'comma-separated modes', flag='mode')

    parser = argparse.ArgumentParser()
    flags.add_flags(parser, Config)
    config = flags.from_args(Config, parser.parse_args(argv))

Types come from the annotations: ``bool`` becomes ``--x`` / ``--no_x``, a tuple or
list a comma-separated value, ``Optional[T]`` a T that may be left out.
Every stage's CLI uses this, so a flag and its config field cannot drift.
"""

from __future__ import annotations

import argparse
import difflib
import dataclasses
import types
import typing
from typing import Any, Callable, Optional

from clip_transfer.errors import UserError

REQUIRED = dataclasses.MISSING


def field(default: Any = REQUIRED, help: str = '', *, flag: Optional[str] = None,  # pylint: disable=redefined-builtin
          choices=None):
  """A dataclass field that carries its flag's help text (``flag``: another flag name)."""
  meta = {'help': help, 'flag': flag, 'choices': choices}
  if isinstance(default, (list, dict, set)):
    raise TypeError('use a tuple for sequence defaults')
  return dataclasses.field(default=default, metadata=meta)


def _unwrap_optional(tp):
  args = typing.get_args(tp)
  if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
    rest = [a for a in args if a is not type(None)]
    return rest[0] if len(rest) == 1 else tp
  return tp


def _parser_for(tp, name: str) -> tuple[Callable[[str], Any], bool]:
  """(str → value, is_sequence) for an annotation."""
  tp = _unwrap_optional(tp)
  origin = typing.get_origin(tp)
  if origin in (tuple, list, typing.Sequence) or tp in (tuple, list):
    item = (typing.get_args(tp) or (str,))[0]
    one, _ = _parser_for(item, name)

    def many(text: str):
      try:
        return tuple(one(v.strip()) for v in text.split(',') if v.strip())
      except UserError:
        raise UserError(f'--{name}: expected comma-separated {getattr(item, "__name__", item)} '
                        f'values, got {text!r}') from None
    return many, True
  if tp in (int, float):
    def number(text: str):
      try:
        return tp(text)
      except ValueError:
        raise UserError(f'--{name}: expected {"an integer" if tp is int else "a number"}, '
                        f'got {text!r}') from None
    return number, False
  return str, False


def _flag_name(f: dataclasses.Field) -> str:
  return f.metadata.get('flag') or f.name


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
  """One ``--flag`` per field of ``cls``."""
  hints = typing.get_type_hints(cls)
  # A config's own fields first, shared keyword-only ones (e.g. source options) after them.
  for f in sorted(dataclasses.fields(cls), key=lambda f: bool(f.kw_only)):
    name = _flag_name(f)
    help_text = f.metadata.get('help', '')
    tp = hints[f.name]
    kw: dict[str, Any] = {'dest': f.name, 'help': help_text}
    if f.metadata.get('choices'):
      kw['choices'] = f.metadata['choices']
    if f.default is REQUIRED and f.default_factory is dataclasses.MISSING:
      kw['required'] = True
    else:
      default = f.default if f.default is not REQUIRED else f.default_factory()
      kw['default'] = default
      if default is not None and help_text:
        shown = ','.join(map(str, default)) if isinstance(default, tuple) else default
        kw['help'] = f'{help_text} (default: {shown})'
    if _unwrap_optional(tp) is bool:
      group = parser.add_mutually_exclusive_group()
      group.add_argument(f'--{name}', action='store_true', **kw)
      group.add_argument(f'--no_{name}', f'--no-{name}', action='store_false', dest=f.name,
                         help=argparse.SUPPRESS)
      continue
    kw['type'], _ = _parser_for(tp, name)
    parser.add_argument(f'--{name}', **kw)


def from_args(cls, args: argparse.Namespace, **overrides):
  """The config whose fields are the parsed flags (plus ``overrides``)."""
  kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
        if hasattr(args, f.name)}
  kw.update(overrides)
  return cls(**kw)


def refuse_near_misses(parser: argparse.ArgumentParser, rest: list[str],
                       passed_on: set[str]) -> None:
  """Refuses a flag in ``rest`` (what ``parse_known_args`` did not know) that looks like ours.

  ``passed_on``: flag names another parser takes (Beam's options), which pass
  unchanged. Without this a typo such as ``--bacth_size=8`` would only be a Beam
  warning, and the run would go ahead with the default.
  """
  ours = sorted({s[2:] for s in parser._option_string_actions if s.startswith('--')})  # pylint: disable=protected-access
  for arg in rest:
    if not arg.startswith('--') or arg == '--':
      continue
    name = arg[2:].split('=', 1)[0]
    if name.replace('-', '_') in passed_on:
      continue
    close = difflib.get_close_matches(name, ours, n=1, cutoff=0.75)
    if close:
      raise UserError(f'unknown flag --{name}; did you mean --{close[0]}?')
