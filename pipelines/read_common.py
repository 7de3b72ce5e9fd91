"""What every Beam reader shares: the ``Read`` contract, the dead-letter tag, counted outputs.

Kept apart from ``pipelines.reads`` (which registers every reader) so reader
modules import it at their top, with no import cycle when a worker unpickles
one of their DoFns first.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
from apache_beam.metrics import Metrics

NAMESPACE = 'embed'  # Beam metrics namespace of the embed stage
DEAD = 'dead'  # the tag of dead-letter outputs: (id, reason)


@dataclasses.dataclass
class Read:
  examples: beam.PCollection  # (id, label, image bytes or HWC uint8)
  dead: list  # PCollections of (id, reason)
  found: beam.PCollection  # ints; their sum is the number of inputs the split holds


class CountedRead(beam.DoFn):
  """Base of the readers' DoFns: every input counted as read; a dead one counted and tagged."""

  def __init__(self, split: str):
    self._split = split
    self._read = Metrics.counter(NAMESPACE, f'read_{split}')
    self._dead = Metrics.counter(NAMESPACE, f'dead_lettered_{split}')

  def _example(self, ex_id: str, label: int, image):
    self._read.inc()
    return ex_id, label, image

  def _dead_letter(self, ex_id: str, reason: str):
    self._read.inc()
    self._dead.inc()
    return beam.pvalue.TaggedOutput(DEAD, (ex_id, reason))
