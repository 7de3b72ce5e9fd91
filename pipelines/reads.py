"""Reading a source's split inside a Beam pipeline: one reader per kind of source.

``read_split(p, source, split, data_dir)`` returns a ``Read``: the examples
``(id, label, image)``, the dead letters ``(id, reason)`` found while reading,
and ``found``, a count of the split's inputs taken apart from the path the
examples follow (so a loss between the two shows up as a mismatch).
"""

from __future__ import annotations

from typing import Callable, Optional

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes

from pipelines import reads_files
from pipelines.read_common import DEAD, CountedRead, Read
from clip_transfer.data import sources as sources_lib

READ_CHUNK = 1000  # examples per read task for TFDS sources (the unit of parallel reading)


class ReadRange(CountedRead):
  """(start, stop) of a split of a TFDS source → (id, label, image); corrupt records are dead."""

  def __init__(self, spec: str, data_dir: Optional[str], split: str):
    super().__init__(split)
    self._spec, self._data_dir = spec, data_dir

  def setup(self):
    self._source = sources_lib.open_source(self._spec, self._data_dir)

  def process(self, bounds):
    for ex in self._source.iter_records(self._split, *bounds):
      if isinstance(ex, sources_lib.DeadRecord):
        yield self._dead_letter(ex.id, ex.reason)
      else:
        yield self._example(ex.id, ex.label, ex.image)


class LoadFile(CountedRead):
  """A listed ``FolderEntry`` → (id, label, bytes); unreadable or stray files are dead letters."""

  def __init__(self, class_names: list[str], split: str):
    super().__init__(split)
    self._class_names = class_names

  def process(self, entry: sources_lib.FolderEntry):
    from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top

    if entry.problem:
      return [self._dead_letter(entry.id, entry.problem)]
    if entry.cls is None:  # an unlabelled image (only listed so with labels_optional)
      label = -1
    elif entry.cls not in self._class_names:  # a class folder that appeared after the listing
      return [self._dead_letter(entry.id, f'class folder {entry.cls!r} is not one of the '
                                'classes listed when the run started')]
    else:
      label = self._class_names.index(entry.cls)
    try:
      # UNCOMPRESSED: AUTO would gunzip a file that happens to end in .gz.
      with FileSystems.open(entry.path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        data = fh.read()
    except Exception as e:  # permissions, vanished file, network
      return [self._dead_letter(entry.id, sources_lib.failure_reason(e, 'cannot read: '))]
    return [self._example(entry.id, label, data)]


def read_folder(p, source: sources_lib.FolderSource, split: str, data_dir=None) -> Read:
  """Lists the split on a worker (every file, at any depth), then reads them in parallel."""
  listed = (p
            | f'Split[{split}]' >> beam.Create([split])
            | f'List[{split}]' >> beam.FlatMap(
                lambda s, root=source.root, opt=source.labels_optional:
                sources_lib.list_folder_split(root, s, opt)))
  loaded = (listed
            # The listing comes from one element: without this the reads fuse
            # onto one Dataflow worker.
            | f'SpreadFiles[{split}]' >> beam.Reshuffle()
            | f'Load[{split}]' >> beam.ParDo(
                LoadFile(source.class_names, split)).with_outputs(DEAD, main='ok'))
  found = listed | f'CountFound[{split}]' >> beam.combiners.Count.Globally()
  return Read(loaded.ok, [loaded[DEAD]], found)


def read_tfds(p, source: sources_lib.TfdsSource, split: str, data_dir=None) -> Read:
  """Ranges of record indices, read where they land (random access for array_record)."""
  total = source.num_examples(split)
  bounds = ([(s, min(s + READ_CHUNK, total)) for s in range(0, total, READ_CHUNK)]
            if total else [(0, None)])
  read = (p
          | f'Ranges[{split}]' >> beam.Create(bounds)
          # Spreads read tasks over workers (tiny elements: cheap to shuffle).
          | f'SpreadRanges[{split}]' >> beam.Reshuffle()
          | f'Read[{split}]' >> beam.ParDo(
              ReadRange(source.spec, data_dir, split)).with_outputs(DEAD, main='ok'))
  if total is None:  # record count unknown (mock data): count what the ranges held
    found = ((read.ok, read[DEAD]) | f'FlattenFound[{split}]' >> beam.Flatten()
             | f'Found[{split}]' >> beam.combiners.Count.Globally())
  else:
    found = p | f'Found[{split}]' >> beam.Create([total])
  return Read(read.ok, [read[DEAD]], found)


# The reader of each kind of source (looked up along the class's MRO).
READERS: dict[type, Callable[..., Read]] = {
    sources_lib.FolderSource: read_folder,
    sources_lib.TfdsSource: read_tfds,
}
READERS.update(reads_files.READERS)  # csv:, parquet:, wds:


def read_split(p, source: sources_lib.Source, split: str, data_dir: Optional[str]) -> Read:
  for cls in type(source).__mro__:
    if cls in READERS:
      return READERS[cls](p, source, split, data_dir)
  raise TypeError(f'no Beam reader for {type(source).__name__}')
