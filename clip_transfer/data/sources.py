"""Labelled image sources shared by every stage: ``open_source(spec, data_dir, **options)``.

One module per kind of source, each on the contract of ``clip_transfer.data.base`` (what
it found per split, and per input an ``Example`` or a ``Dead`` input with its reason):

* ``digits`` and TFDS catalog names (``mnist``, ``cifar10:3.0.2``): ``catalog``
* ``folder:PATH`` (``PATH/<split>/<class>/<image>``): ``folder``
* ``csv:PATH`` (Vertex AI manifest or headed CSV/TSV): ``manifest``
* ``parquet:GLOB`` (Hugging Face datasets layout): ``parquet``
* ``wds:PATTERN`` (WebDataset shards): ``webdataset``

Inputs that name no split belong to ``default_split`` (``train`` unless set). Every source
yields ``Example(id, label, image)``; ``image`` is an HWC uint8 array or encoded bytes,
both accepted by ``clip_transfer.data.preprocess.prepare``.
"""

from __future__ import annotations

from typing import Optional

from clip_transfer.data import catalog, folder, manifest, parquet, webdataset
from clip_transfer.data.base import (SOURCE_OPTIONS, Dead, Example, Source, SourceOptions,  # pylint: disable=unused-import  (the public names)
                                     failure_reason, source_options)
from clip_transfer.errors import UserError

# Which options each kind takes (the rest of SOURCE_OPTIONS do not apply to it).
_OPTIONS = {
    manifest.PREFIX: ('image_column', 'label_column', 'class_names', 'default_split',
                      'max_classes'),
    parquet.PREFIX: ('image_column', 'label_column', 'class_names', 'default_split',
                     'max_classes'),
    webdataset.PREFIX: ('label_field', 'class_names', 'default_split', 'max_classes'),
}
_KINDS = {manifest.PREFIX: manifest.CsvSource, parquet.PREFIX: parquet.ParquetSource,
          webdataset.PREFIX: webdataset.WdsSource}


def open_source(spec: str, data_dir: Optional[str] = None, labels_optional: bool = False,
                **options) -> Source:
  """'digits', 'folder:PATH', 'csv:PATH', 'parquet:GLOB', 'wds:PATTERN' or a TFDS name.

  ``options`` (``SOURCE_OPTIONS``: class_names, image_column, label_column, label_field,
  default_split, max_classes) configure the csv/parquet/wds sources.
  ``labels_optional`` (predict): images directly in a folder's split folder and CSV rows
  with no label are examples with label -1 instead of dead letters.
  """
  unknown = set(options) - set(SOURCE_OPTIONS)
  if unknown:
    raise TypeError(f'unknown source options: {sorted(unknown)}')
  spec = spec.strip()
  if not spec:
    raise UserError('empty dataset spec; use digits, folder:PATH, csv:PATH, parquet:GLOB, '
                    'wds:PATTERN or a TFDS name')
  for prefix, cls in _KINDS.items():
    if spec.startswith(prefix):
      kw = {k: v for k, v in options.items() if v is not None and k in _OPTIONS[prefix]}
      if prefix == manifest.PREFIX:
        kw['labels_optional'] = labels_optional
      return cls(spec[len(prefix):], **kw)
  if spec.startswith(folder.PREFIX):
    return folder.FolderSource(spec[len(folder.PREFIX):], labels_optional)
  if spec == 'digits' or spec.startswith('digits:'):
    return catalog.TfdsSource(spec, data_dir, builtin=True)
  return catalog.TfdsSource(spec, data_dir)
