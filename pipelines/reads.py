"""Reading a source's split inside a Beam pipeline: the Beam driver of the source contract.

``read_split(p, source, split, data_dir)`` returns a ``Read``: the examples
``(id, label, image)``, the ``Dead`` inputs found while reading, and ``found``, a count of
the split's inputs taken apart from the path the examples follow (so a loss between the
two shows up as a mismatch): record counts, folder entries as listed, manifest rows as
parsed, Parquet rows from the file footers, tar member groups from the tar headers.

Every input is turned into an example or a dead input by the source's own
``part_reader``, the function ``Source.inputs`` (fine-tune, in-process) calls too. Parts
are reshuffled so Dataflow spreads them over workers. A folder's files are listed in
chunks (``read_chunks``), which embed and predict read and prepare a chunk per pool task.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import apache_beam as beam

from pipelines.read_common import DEAD, EachPart, Read, ReadParts
from clip_transfer.data import catalog, folder, manifest, parquet, webdataset
from clip_transfer.data.base import Source


def _read(parts, reader: Callable, split: str, threads: int, label: str):
  """``parts`` through ``ReadParts(reader)``: the examples ('ok') and the DEAD output."""
  return parts | label >> beam.ParDo(
      ReadParts(reader, split, threads, READ_WINDOW if threads != 1 else 1)).with_outputs(
          DEAD, main='ok')


def _read_parts(parts, source: Source, split: str, threads: int = 1):
  spread = parts | f'SpreadParts[{split}]' >> beam.Reshuffle()
  return _read(spread, source.part_reader(split), split, threads, f'Read[{split}]')


# Parts read ahead on the pool when a part is small (a folder's chunk, a manifest id).
READ_WINDOW = 16


def read_parts(p, source: Source, split: str, count: Callable) -> Read:
  """Parts known at launch (files, shards, record ranges), read where they land."""
  parts = p | f'Parts[{split}]' >> beam.Create(source.parts(split))
  read = _read_parts(parts, source, split)
  return Read(read.ok, [read[DEAD]], parts | f'CountFound[{split}]' >> beam.Map(count))


# A folder's files are listed CHUNK to an element (fewer per chunk in small splits, so
# there are at least MIN_CHUNKS for the cores of every worker): the reshuffle, the found
# count and the read each pay Beam's per-element cost once per chunk, not once per file.
CHUNK = 16
MIN_CHUNKS = 64


def chunked(parts: list) -> list[list]:
  """``parts`` in order, in lists of up to ``CHUNK``."""
  size = min(CHUNK, max(1, len(parts) // MIN_CHUNKS))
  return [parts[i:i + size] for i in range(0, len(parts), size)]


@dataclasses.dataclass
class Chunks:
  """A split's parts still to be read, a list of them per element, reshuffled."""

  parts: beam.PCollection  # lists of parts
  reader: Callable  # a chunk → its inputs: EachPart(source.part_reader(split))
  found: beam.PCollection  # ints (each chunk's length); their sum is the split's inputs


class _ListFolder(beam.PTransform):
  """Lists the split on a worker (every file, at any depth) in chunks: {'parts', 'found'}."""

  def __init__(self, source: folder.FolderSource, split: str):
    super().__init__()
    self._root, self._optional, self._split = source.root, source.labels_optional, split

  def expand(self, pbegin):
    listed = (pbegin
              | 'Split' >> beam.Create([self._split])
              | 'List' >> beam.FlatMap(
                  lambda s, root=self._root, opt=self._optional:
                  chunked(folder.list_split(root, s, opt))))
    # The listing comes from one element: the reshuffle keeps the reads off one worker.
    return {'parts': listed | 'SpreadParts' >> beam.Reshuffle(),
            'found': listed | 'CountFound' >> beam.Map(len)}


def _list_folder(p, source: folder.FolderSource, split: str) -> Chunks:
  # 'Read[split]', as every source's read is labelled; the files themselves are read by
  # the consumer of the chunks (embed.Preprocess, or ReadParts in read_folder).
  listed = p | f'Read[{split}]' >> _ListFolder(source, split)
  return Chunks(listed['parts'], EachPart(source.part_reader(split)), listed['found'])


# Sources whose part is one small input (a folder's file): listed in chunks.
CHUNKED: dict[type, Callable[..., Chunks]] = {folder.FolderSource: _list_folder}


def _for_source(table: dict[type, Callable], source: Source) -> Optional[Callable]:
  """``table``'s entry for the source's class, looked up along its MRO (subclasses too)."""
  return next((table[cls] for cls in type(source).__mro__ if cls in table), None)


def read_chunks(p, source: Source, split: str) -> Optional[Chunks]:
  """The split in chunks of parts for a consumer that reads and prepares a chunk in one
  task (embed.Preprocess); None for sources whose parts already hold many inputs."""
  lister = _for_source(CHUNKED, source)
  return lister(p, source, split) if lister else None


def read_folder(p, source: folder.FolderSource, split: str, data_dir=None,
                threads: int = 1) -> Read:
  """The listed chunks read in parallel."""
  chunks = _list_folder(p, source, split)
  read = _read(chunks.parts, chunks.reader, split, threads, f'ReadChunks[{split}]')
  return Read(read.ok, [read[DEAD]], chunks.found)


def read_tfds(p, source: catalog.TfdsSource, split: str, data_dir=None, threads=1) -> Read:
  total = source.num_examples(split)
  if total:
    return read_parts(p, source, split, lambda bounds: bounds[1] - bounds[0])
  # Record count unknown (mock data): count what the range held.
  parts = p | f'Parts[{split}]' >> beam.Create(source.parts(split))
  read = _read_parts(parts, source, split)
  found = ((read.ok, read[DEAD]) | f'FlattenFound[{split}]' >> beam.Flatten()
           | f'CountFound[{split}]' >> beam.combiners.Count.Globally())
  return Read(read.ok, [read[DEAD]], found)


class _ParseCsvLine(beam.DoFn):
  """A manifest line → (id, row), when it belongs to ``split`` (blank lines are not inputs)."""

  def __init__(self, layout: dict, default_split: str, split: str):
    self._layout, self._default_split, self._split = layout, default_split, split

  def process(self, line: str):
    row = manifest.parse_csv_line(line, self._layout, self._default_split)
    if row is not None and row[0] == self._split:
      yield row[1], row


def read_csv(p, source: manifest.CsvSource, split: str, data_dir=None,
             threads: int = 1) -> Read:
  """The manifest through ReadFromText (read by many workers); rows grouped by id = parts."""
  rows = (p
          | f'ReadManifest[{split}]' >> beam.io.ReadFromText(
              source.path, skip_header_lines=source.skip_header_lines)
          | f'ParseRows[{split}]' >> beam.ParDo(
              _ParseCsvLine(source.layout, source.default_split, split)))
  parts = (rows
           # Grouping by id finds rows listed twice (a part is every row of one id).
           | f'GroupById[{split}]' >> beam.GroupByKey()
           | f'Rows[{split}]' >> beam.MapTuple(lambda _, group: sorted(group, key=repr)))
  read = _read_parts(parts, source, split, threads)
  found = rows | f'CountFound[{split}]' >> beam.combiners.Count.Globally()
  return Read(read.ok, [read[DEAD]], found)


def read_parquet(p, source: parquet.ParquetSource, split: str, data_dir=None,
                 threads=1) -> Read:
  return read_parts(p, source, split, lambda part: parquet.num_rows(part[0]))


def read_wds(p, source: webdataset.WdsSource, split: str, data_dir=None, threads=1) -> Read:
  return read_parts(p, source, split, lambda part: webdataset.count_groups(part[0]))


# The reader of each kind of source (looked up along the class's MRO).
READERS: dict[type, Callable[..., Read]] = {
    folder.FolderSource: read_folder,
    catalog.TfdsSource: read_tfds,
    manifest.CsvSource: read_csv,
    parquet.ParquetSource: read_parquet,
    webdataset.WdsSource: read_wds,
}


def read_split(p, source: Source, split: str, data_dir: Optional[str],
               threads: int = 1) -> Read:
  """``threads``: ``ReadParts``' pool for sources whose part is one input (others read inline)."""
  reader = _for_source(READERS, source)
  if reader is None:
    raise TypeError(f'no Beam reader for {type(source).__name__}')
  return reader(p, source, split, data_dir, threads=threads)
