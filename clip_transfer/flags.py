"""Command-line flags derived from a config dataclass: each field is declared once, with its help.

    @dataclasses.dataclass
    class Config:
      lr: float = flags.field(1e-3, 'peak learning rate')
      modes: tuple[str, ...] = flags.field(('linear',), 'comma-separated modes', flag='mode')

    parser = Parser()  # clip_transfer.errors.Parser
    flags.add_flags(parser, Config)
    config = flags.from_args(Config, parser.parse_args(argv))

Types come from the annotations: ``bool`` becomes ``--x`` / ``--no_x``, a tuple or
list a comma-separated value, ``Optional[T]`` a T that may be left out.
Every stage's CLI uses this, so a flag and its config field cannot drift. The
flags several stages share (``--dataset``, ``--data_dir``, ``--model``,
``--dtype``, ``--val_fraction``) are declared here once, with one check each
(``check_shared``), so their help and their messages are the same everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Optional

from clip_transfer import models
from clip_transfer.errors import UserError, closest_flag, flag_name
from clip_transfer.protocol import validation

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
  for arg in rest:
    name = flag_name(arg)
    if name is None or name.replace('-', '_') in passed_on:
      continue
    close = closest_flag(parser, arg, cutoff=0.75)
    if close:
      raise UserError(f'unknown flag --{name}; did you mean --{close}?')


# --------------------------------------------------------------------------
# The flags several stages share: one declaration, one help, one check each
# --------------------------------------------------------------------------


def dataset(default: Any = REQUIRED):
  """``--dataset``: the source spec embed and fine-tune (and predict) read."""
  return field(default, "'digits', 'folder:PATH' (PATH/<split>/<class>/<image>), 'csv:PATH' "
               "(Vertex AI manifest or headed CSV/TSV), 'parquet:GLOB', 'wds:PATTERN' "
               '(WebDataset shards) or a TFDS name')


def data_dir():
  """``--data_dir``: where TFDS datasets (and the built-in digits) are prepared."""
  return field(None, 'TFDS data_dir for catalog datasets / digits')


def model():
  """``--model``: the backbone, as clip_transfer.models.load takes it."""
  return field(models.DEFAULT_MODEL,
               'hub id, save_pretrained directory, or random:tiny / random:vit-b32')


def dtype():
  """``--dtype``: the backbone's compute dtype."""
  return field('float32', f'compute dtype ({" or ".join(models.DTYPES)}; parameters stay '
               'float32)')


def val_fraction(chooses: str):
  """``--val_fraction``: the validation split carved from train; ``chooses`` says what it picks."""
  return field(validation.DEFAULT_FRACTION, f'fraction of each train class held out to choose '
               f'{chooses} (the same examples in every stage)')


def check_shared(config) -> None:
  """The one check of each shared flag ``config`` carries (call it from ``__post_init__``)."""
  if hasattr(config, 'dtype') and config.dtype not in models.DTYPES:
    raise UserError(f'--dtype must be one of {", ".join(models.DTYPES)}, got {config.dtype!r}')
  if hasattr(config, 'val_fraction'):
    validation.check_fraction(config.val_fraction)
