"""What every Beam reader shares: the ``Read`` result, the dead-letter tag, counted outputs.

The per-input work is the source's own (``Source.part_reader``, the function the
in-process driver ``Source.inputs`` calls too); these DoFns only count and route it.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

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


def counters(split: str):
  """(inputs read, inputs dead-lettered) of a split: what every reader counts, and embed's
  ``Preprocess`` where it reads chunks itself."""
  return (Metrics.counter(NAMESPACE, f'read_{split}'),
          Metrics.counter(NAMESPACE, f'dead_lettered_{split}'))


@dataclasses.dataclass(frozen=True)
class EachPart:
  """A reader of a chunk (a list of parts): the source's ``reader`` over each part in turn."""

  reader: Callable  # the source's part_reader

  def __call__(self, parts):
    for part in parts:
      yield from self.reader(part)


class CountedRead(beam.DoFn):
  """Base of the readers' DoFns: every input counted as read; a dead one counted and tagged."""

  def __init__(self, split: str):
    self._split = split
    self._read, self._dead = counters(split)

  def _emit(self, item):
    """An Example → (id, label, image); a Dead input → the DEAD output."""
    self._read.inc()
    if isinstance(item, Example):
      return item.id, item.label, item.image
    self._dead.inc()
    return beam.pvalue.TaggedOutput(DEAD, Dead(*item))


class ReadParts(CountedRead):
  """A part of a split (file, shard, record range, folder entry, CSV rows of one id) → inputs.

  ``threads`` != 1 (embed, for sources whose part is one input: a folder entry, a
  manifest id): parts are read on the process-wide preprocessing pool (0: one thread per
  core), up to ``window`` ahead, outputs in input order, so the thread that drives the
  bundle never waits on file reads. 1: read inline (every other source: a part can
  hold a whole shard, which must stream).
  """

  def __init__(self, reader, split: str, threads: int = 1, window: int = 1):
    super().__init__(split)
    self._reader = reader  # the source's part_reader: the same function fine-tune calls
    self._threads, self._window = threads, window

  def start_bundle(self):
    self._pool = None
    if self._threads != 1:
      from clip_transfer.data import preprocess  # pylint: disable=g-import-not-at-top
      threads = self._threads or preprocess.host_cores()
      self._pool = preprocess.shared_pool(threads) if threads > 1 else None
    self._pending: collections.deque = collections.deque()

  def process(self, part, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
    if self._pool is None:
      for item in self._reader(part):
        yield self._emit(item)
      return
    self._pending.append((timestamp, window, self._pool.submit(_read_all, self._reader, part)))
    while self._pending and (len(self._pending) > self._window or self._pending[0][2].done()):
      yield from self._emit_read()

  def finish_bundle(self):
    while self._pending:
      yield from self._emit_read()

  def _emit_read(self):
    from apache_beam.utils.windowed_value import WindowedValue  # pylint: disable=g-import-not-at-top

    timestamp, window, future = self._pending.popleft()
    for item in future.result():  # a reader that raises fails the bundle, as inline
      out = self._emit(item)
      if isinstance(out, beam.pvalue.TaggedOutput):
        yield beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, timestamp, [window]))
      else:
        yield WindowedValue(out, timestamp, [window])


def _read_all(reader, part) -> list:
  return list(reader(part))
