"""The data-source contract every source kind implements, and its two drivers' shared parts.

A source lists what it found per split (its parts: files, shards, record ranges, folder
entries) and turns each input into an ``Example`` or a ``Dead`` input with its reason, in
one picklable function per kind (``Source.part_reader``). Two thin drivers call it: ``Source.inputs`` in-process (fine-tune, probe tools, benchmarks) and the
Beam readers of ``pipelines.reads`` (embed), so the same bad input is counted and skipped
the same way in every stage.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Union

import numpy as np

from clip_transfer import flags
from clip_transfer import outputs
from clip_transfer.errors import UserError


@dataclasses.dataclass(frozen=True)
class Example:
  id: str  # stable, unique per split
  label: int
  image: Union[np.ndarray, bytes]  # HWC uint8, or encoded image bytes


class Dead(NamedTuple):
  """An input that cannot be an example, and why: what every stage dead-letters.

  A tuple, so Beam sorts and pickles it as it does ``(id, reason)``.
  """
  id: str
  reason: str


Input = Union[Example, Dead]

# Parts of exception text that differ between runs of the same input: memory
# addresses in reprs, TF's numbered function names and op suffixes.
_VOLATILE = (re.compile(r' at 0x[0-9a-fA-F]+'), re.compile(r'\{\{function_node [^}]*\}\}\s*'),
             re.compile(r'\s*\[Op:\w+\].*$'))


def failure_reason(e: BaseException, prefix: str = '') -> str:
  """A dead letter's reason: one line, the same on every run (no memory addresses)."""
  text = ' '.join(str(e).split())
  for volatile in _VOLATILE:
    text = volatile.sub('', text)
  text = text[:500]
  return f'{prefix}{type(e).__name__}: {text}' if text else f'{prefix}{type(e).__name__}'


# Integer labels name classes 0..max: one stray huge label (a .cls holding 2000000000)
# would otherwise build billions of class names.
MAX_CLASSES = 100_000


@dataclasses.dataclass(kw_only=True)
class SourceOptions:
  """The options of the csv:/parquet:/wds: sources; the embed and fine-tune configs inherit
  them, so each is one flag with one help text in both stages (clip_transfer.flags)."""

  class_names: Optional[str] = flags.field(
      None, 'file with one class name per line: fixes the label order of csv:/parquet:/wds: '
      '(a label not in it is dead-lettered); default: the sorted distinct labels')
  image_column: str = flags.field('image', 'image column of a headed CSV or of Parquet')
  label_column: str = flags.field('label', 'label column of a headed CSV or of Parquet')
  label_field: Optional[str] = flags.field(
      None, 'wds: take the label from this field of each .json member (default: .cls, then .txt)')
  default_split: str = flags.field(
      'train', 'split of csv rows, Parquet files and WebDataset shards that name none')
  max_classes: int = flags.field(
      MAX_CLASSES, 'csv:/parquet:/wds: refuse labels that would make more classes than this')


# The options open_source(spec, data_dir, **options) takes.
SOURCE_OPTIONS = tuple(f.name for f in dataclasses.fields(SourceOptions))


def source_options(config: Any) -> dict[str, Any]:
  """The source options a config (EmbedConfig, finetune Config) carries, for open_source."""
  return {k: getattr(config, k) for k in SOURCE_OPTIONS if hasattr(config, k)}


class Source:
  """A labelled image dataset with named splits.

  A split is held in parts (files, shards, record ranges, listed folder entries): the
  unit a Beam worker reads. ``part_reader`` is the one function that turns a part into
  inputs; ``inputs`` (in-process) and ``pipelines.reads`` (Beam) both drive it.
  """

  name: str
  version: str
  class_names: list[str]
  splits: list[str]
  # Inputs without a label are examples with label -1 (predict), not dead letters.
  labels_optional: bool = False

  def num_examples(self, split: str) -> Optional[int]:
    """How many inputs ``split`` holds (examples and dead inputs), None when unknown."""
    raise NotImplementedError

  def parts(self, split: str) -> list:
    """The split's parts, in order; each is a small picklable value."""
    raise NotImplementedError

  def part_reader(self, split: str) -> Callable[[Any], Iterator[Input]]:
    """A picklable ``reader(part)``: every input of one part, in order, an Example or Dead."""
    raise NotImplementedError

  def num_parts(self, split: str) -> Optional[int]:
    """How many input files hold ``split`` (for sizing the output when the count is unknown)."""
    return None

  def shared_inputs(self, splits) -> int:
    """How many inputs are listed in more than one of ``splits`` (0 where a source cannot tell)."""
    return 0

  def inputs(self, split: str, start: int = 0, stop: Optional[int] = None) -> Iterator[Input]:
    """Every input of ``split`` in a fixed order (``start:stop`` of them): the in-process driver."""
    self.check_split(split)
    i, reader = 0, self.part_reader(split)
    for part in self.parts(split):
      for item in reader(part):
        if stop is not None and i >= stop:
          return
        if i >= start:
          yield item
        i += 1

  def iter_examples(self, split: str, start: int = 0,
                    stop: Optional[int] = None) -> Iterator[Example]:
    """The examples among inputs ``start:stop`` (dead inputs left out; see ``inputs``)."""
    for item in self.inputs(split, start, stop):
      if isinstance(item, Example):
        yield item

  def check_split(self, split: str) -> None:
    if self.splits and split not in self.splits:
      raise UserError(f'{self.name} has no split {split!r}; available: '
                      f'{", ".join(self.splits)}')


def dead_letter_lines(rows: Iterable[Dead]) -> list[bytes]:
  """The dead-letter file's lines (JSON: id, reason), sorted: the same bytes in every stage."""
  return [(json.dumps({'id': ex_id, 'reason': reason}) + '\n').encode()
          for ex_id, reason in sorted(r for r in rows if r is not None)]


def write_dead_letters(output_dir: str, split: str, rows: Iterable[Dead]) -> int:
  """``OUTPUT_DIR/dead_letters.<split>.jsonl`` (local or a Beam filesystem); returns the count."""
  lines = dead_letter_lines(rows)
  with outputs.create_file(outputs.join(output_dir, f'dead_letters.{split}.jsonl')) as fh:
    for line in lines:
      fh.write(line)
  return len(lines)
