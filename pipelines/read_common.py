"""What every Beam reader shares: the ``Read`` result, the dead-letter tag, counted outputs.

The per-input work is the source's own (``Source.part_reader``, the function the
in-process driver ``Source.inputs`` calls too); these DoFns only count and route it.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
from apache_beam.metrics import Metrics

from clip_transfer.data.base import Dead, Example

NAMESPACE = 'embed'  # Beam metrics namespace of the embed stage
DEAD = 'dead'  # the tag of the output that carries Dead inputs


@dataclasses.dataclass
class Read:
  examples: beam.PCollection  # (id, label, image bytes or HWC uint8)
  dead: list  # PCollections of Dead inputs
  found: beam.PCollection  # ints; their sum is the number of inputs the split holds


class CountedRead(beam.DoFn):
  """Base of the readers' DoFns: every input counted as read; a dead one counted and tagged."""

  def __init__(self, split: str):
    self._split = split
    self._read = Metrics.counter(NAMESPACE, f'read_{split}')
    self._dead = Metrics.counter(NAMESPACE, f'dead_lettered_{split}')

  def _emit(self, item):
    """An Example → (id, label, image); a Dead input → the DEAD output."""
    self._read.inc()
    if isinstance(item, Example):
      return item.id, item.label, item.image
    self._dead.inc()
    return beam.pvalue.TaggedOutput(DEAD, Dead(*item))


class ReadParts(CountedRead):
  """A part of a split (file, shard, record range, folder entry, CSV rows of one id) → inputs."""

  def __init__(self, reader, split: str):
    super().__init__(split)
    self._reader = reader  # the source's part_reader: the same function fine-tune calls

  def process(self, part):
    for item in self._reader(part):
      yield self._emit(item)
