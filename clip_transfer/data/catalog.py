"""TFDS datasets: a catalog name (``mnist``, ``cifar10:3.0.2``) prepared in ``data_dir``, or ``digits``.

``digits`` is scikit-learn's bundled ``load_digits`` as a TFDS builder (no download). Never
downloads. A split's parts are ranges of record indices (``READ_CHUNK`` each); a record that
cannot be read is a ``Dead`` input whose id is its key (``<name>/<split>/<index>``: its own id
feature is inside the bytes that could not be read).
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from clip_transfer.data.base import Dead, Example, Input, Source, failure_reason
from clip_transfer.errors import UserError

READ_CHUNK = 1000  # records per part (the unit of parallel reading in Beam)


class TfdsSource(Source):
  """A prepared TFDS dataset; never downloads (digits is prepared from scikit-learn)."""

  def __init__(self, spec: str, data_dir: Optional[str] = None, builtin: bool = False):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    self.spec, self.data_dir, self.builtin = spec, data_dir, builtin
    if builtin:
      from clip_transfer.data import digits  # pylint: disable=g-import-not-at-top
      self._builder = digits.prepare(data_dir)
    else:
      try:
        self._builder = tfds.builder(spec, data_dir=data_dir)
      except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f'unknown dataset {spec!r}: not a TFDS catalog name; use digits, '
                        'folder:PATH or a name from `tfds.list_builders()`') from None
      except Exception as e:  # bad version, bad config: TFDS raises several types
        raise UserError(f'cannot open TFDS dataset {spec!r}: {str(e).splitlines()[0]}') from None
    info = self._builder.info
    self.name = self._builder.name
    self.version = str(self._builder.version)
    self._image_key, self._label_key = info.supervised_keys or ('image', 'label')
    features = info.features
    if self._image_key not in features or self._label_key not in features:
      raise UserError(f'{spec}: needs image and label features, has {sorted(features)}')
    label = features[self._label_key]
    if not isinstance(label, tfds.features.ClassLabel):
      raise UserError(f'{spec}: label feature {self._label_key!r} is not a ClassLabel')
    self.class_names = list(label.names)
    self.splits = sorted(info.splits)  # empty when not prepared (or under mock_data)
    self._has_id = 'id' in features

  def num_examples(self, split: str) -> Optional[int]:
    self.check_split(split)
    if split in self._builder.info.splits:
      return self._builder.info.splits[split].num_examples
    return None

  def parts(self, split):
    total = self.num_examples(split)
    if not total:  # count unknown (mock data): one part, read to the end
      return [(0, None)]
    return [(s, min(s + READ_CHUNK, total)) for s in range(0, total, READ_CHUNK)]

  def part_reader(self, split):
    return ReadRange(self.spec, self.data_dir, self.builtin, split, self)

  def inputs(self, split, start=0, stop=None):
    # In-process, one reader over the whole range (a TFRecord split is then one tf.data pass).
    return self.records(split, start, stop)

  def records(self, split: str, start: int = 0, stop: Optional[int] = None) -> Iterator[Input]:
    """Records ``start:stop`` of ``split``: an Example, or a Dead input for a corrupt record."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    self.check_split(split)
    n = self.num_examples(split)
    stop = n if stop is None else stop
    try:
      if self._builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        # Random access: a range costs only its own records, one at a time.
        data = self._builder.as_data_source(split=split)
        stop = len(data) if stop is None else stop
        for i in range(start, stop):
          try:
            ex = self._example(split, i, data[i])
          except Exception as e:  # a corrupt record: bad bytes, undecodable image
            yield Dead(self._key(split, i), failure_reason(e, 'corrupt record: '))
            continue
          yield ex
        return
      i = start
      while stop is None or i < stop:
        # A failed tf.data iterator cannot go on: restart after the bad record.
        sub = split if (i == 0 and stop == n) else f'{split}[{i}:{"" if stop is None else stop}]'
        rows = tfds.as_numpy(self._builder.as_dataset(split=sub, shuffle_files=False))
        try:
          for row in rows:
            ex = self._example(split, i, row)
            i += 1
            yield ex
          return
        except Exception as e:  # DataLossError, a bad image
          if isinstance(e, AssertionError):
            raise
          yield Dead(self._key(split, i), failure_reason(e, 'corrupt record: '))
          i += 1
    except AssertionError as e:  # TFDS: "could not find data in …"
      raise UserError(f'{self.spec} is not prepared in data_dir={self.data_dir or "default"}; '
                      f'prepare it first (tfds build {self.spec} --data_dir=…) '
                      f'({str(e).splitlines()[0]})') from None

  def _key(self, split: str, index: int) -> str:
    return f'{self.name}/{split}/{index}'

  def _example(self, split: str, index: int, row) -> Example:
    ex_id = _text(row['id']) if self._has_id else self._key(split, index)
    return Example(ex_id, int(row[self._label_key]), np.asarray(row[self._image_key]))


class ReadRange:
  """(start, stop) → the records of that range; pickled without its source (reopened once)."""

  def __init__(self, spec, data_dir, builtin, split, source=None):
    self._args, self._split, self._source = (spec, data_dir, builtin), split, source

  def __getstate__(self):
    return {'_args': self._args, '_split': self._split, '_source': None}

  def __call__(self, bounds):
    if self._source is None:
      self._source = TfdsSource(*self._args)
    return self._source.records(self._split, *bounds)


def _text(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)
