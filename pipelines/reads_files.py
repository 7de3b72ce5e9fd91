"""Beam readers for CSV manifests, Parquet files and WebDataset shards (``clip_transfer.data.files``).

Each reads through Beam IO (``ReadFromText``; files and shards opened with ``FileSystems``
in a DoFn, one file or shard per element, reshuffled so Dataflow spreads them over
workers), turns every input into an example or a dead letter with the same function the
fine-tune stage uses, and counts the split's inputs apart from that path: manifest rows
as parsed, Parquet rows from the file footers, tar member groups from the tar headers.
"""

from __future__ import annotations

from typing import Optional

import apache_beam as beam

from pipelines.read_common import DEAD, CountedRead, Read
from clip_transfer.data import files as fs
from clip_transfer.data.sources import Example


class _ToOutputs(CountedRead):
  """An Example → (id, label, image); an (id, reason) → the DEAD output; both counted."""

  def _emit(self, item):
    if isinstance(item, Example):
      return self._example(item.id, item.label, item.image)
    return self._dead_letter(*item)


# --------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------


class ParseCsvLine(beam.DoFn):
  """A manifest line → its row, when it belongs to ``split`` (blank lines are not inputs)."""

  def __init__(self, layout: dict, default_split: str, split: str):
    self._layout, self._default_split, self._split = layout, default_split, split

  def process(self, line: str):
    row = fs.parse_csv_line(line, self._layout, self._default_split)
    if row is not None and row[0] == self._split:
      yield row


class LoadCsvRow(_ToOutputs):
  """A manifest row → (id, label, image bytes), or a dead letter (missing file, bad label)."""

  def __init__(self, base_dir: str, class_names: list[str], split: str,
               labels_optional: bool = False):
    super().__init__(split)
    self._base_dir, self._class_names = base_dir, class_names
    self._labels_optional = labels_optional

  def process(self, row):
    yield self._emit(fs.load_csv_row(row, self._base_dir, self._class_names,
                                     self._labels_optional))


def _key_by_id(row):
  return row[1], row


def _dedupe(_, rows):
  return fs.dedupe_rows(sorted(rows, key=repr))


def read_csv(p, source: fs.CsvSource, split: str, data_dir=None):
  rows = (p
          | f'ReadManifest[{split}]' >> beam.io.ReadFromText(
              source.path, skip_header_lines=source.skip_header_lines)
          | f'ParseRows[{split}]' >> beam.ParDo(
              ParseCsvLine(source.layout, source.default_split, split)))
  loaded = (rows
            # Grouping by id finds rows listed twice; the shuffle also spreads the image
            # reads over all workers (a manifest is read by few).
            | f'KeyById[{split}]' >> beam.Map(_key_by_id)
            | f'GroupById[{split}]' >> beam.GroupByKey()
            | f'Dedupe[{split}]' >> beam.FlatMapTuple(_dedupe)
            | f'Load[{split}]' >> beam.ParDo(
                LoadCsvRow(source.base_dir, source.class_names, split,
                           source.labels_optional)).with_outputs(
                    DEAD, main='ok'))
  found = rows | f'CountFound[{split}]' >> beam.combiners.Count.Globally()
  return Read(loaded.ok, [loaded[DEAD]], found)


# --------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------


class ReadParquetFile(_ToOutputs):
  """(path, id prefix) → every row of the file as (id, label, image bytes) or a dead letter."""

  def __init__(self, image_column: str, label_column: str, class_names: list[str], split: str):
    super().__init__(split)
    self._columns, self._class_names = (image_column, label_column), class_names

  def process(self, file):
    path, rel = file
    for item in fs.parquet_file_inputs(path, rel, *self._columns, self._class_names):
      yield self._emit(item)


def count_parquet_rows(file) -> int:
  """Rows of a Parquet file, from its footer."""
  return fs.parquet_num_rows(file[0])


def read_parquet(p, source: fs.ParquetSource, split: str, data_dir=None):
  files = p | f'Files[{split}]' >> beam.Create([(path, rel) for path, rel, _ in
                                                 source.files(split)])
  loaded = (files
            | f'SpreadFiles[{split}]' >> beam.Reshuffle()
            | f'ReadParquet[{split}]' >> beam.ParDo(ReadParquetFile(
                source.image_column, source.label_column, source.class_names,
                split)).with_outputs(DEAD, main='ok'))
  found = files | f'CountRows[{split}]' >> beam.Map(count_parquet_rows)
  return Read(loaded.ok, [loaded[DEAD]], found)


# --------------------------------------------------------------------------
# WebDataset
# --------------------------------------------------------------------------


class ReadShard(_ToOutputs):
  """(path, shard id) → one (id, label, image bytes) or dead letter per member group."""

  def __init__(self, label_field: Optional[str], class_names: list[str], split: str):
    super().__init__(split)
    self._label_field, self._class_names = label_field, class_names

  def process(self, shard):
    path, sid = shard
    for key, members in fs.tar_groups(path):
      yield self._emit(fs.wds_example(sid, key, members, self._label_field, self._class_names))


def count_shard_groups(shard) -> int:
  return fs.count_groups(shard[0])


def read_wds(p, source: fs.WdsSource, split: str, data_dir=None):
  shards = p | f'Shards[{split}]' >> beam.Create(source.shards(split))
  loaded = (shards
            # One shard per element: shards are read in parallel across workers.
            | f'SpreadShards[{split}]' >> beam.Reshuffle()
            | f'ReadShard[{split}]' >> beam.ParDo(
                ReadShard(source.label_field, source.class_names, split)).with_outputs(
                    DEAD, main='ok'))
  found = shards | f'CountGroups[{split}]' >> beam.Map(count_shard_groups)
  return Read(loaded.ok, [loaded[DEAD]], found)


READERS = {fs.CsvSource: read_csv, fs.ParquetSource: read_parquet, fs.WdsSource: read_wds}
