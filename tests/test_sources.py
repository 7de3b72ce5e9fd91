"""clip_transfer.data.sources: digits (TFDS builder), image folders, TFDS catalog names."""

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clip_transfer.data import preprocess
from clip_transfer.errors import UserError
from clip_transfer.data.sources import Dead, failure_reason, open_source


def _png(color, size=(12, 10)) -> bytes:
  buf = io.BytesIO()
  Image.new('RGB', size, color).save(buf, format='PNG')
  return buf.getvalue()


def make_folder(root, layout):
  """layout: {split: {class: [bytes, …]}} → root/split/class/NN.png."""
  for split, classes in layout.items():
    for cls, images in classes.items():
      d = root / split / cls
      d.mkdir(parents=True, exist_ok=True)
      for i, data in enumerate(images):
        (d / f'{i:02d}.png').write_bytes(data)
  return root


def test_digits_is_a_prepared_tfds_dataset(digits_data_dir):
  src = open_source('digits', digits_data_dir)
  assert (src.name, src.version) == ('digits', '1.0.0')
  assert src.class_names == [str(d) for d in range(10)]
  assert src.splits == ['test', 'train']
  assert (src.num_examples('train'), src.num_examples('test')) == (1437, 360)
  train, test = list(src.iter_examples('train')), list(src.iter_examples('test'))
  assert len(train) == 1437 and len(test) == 360
  ids = [e.id for e in train + test]
  assert len(set(ids)) == 1797 and all(i.startswith('digits/') for i in ids)
  # Stratified: every class in both splits, in about the same proportion.
  assert np.bincount([e.label for e in test], minlength=10).min() >= 30
  image = test[0].image
  assert image.shape == (8, 8, 1) and image.dtype == np.uint8
  assert max(e.image.max() for e in test) == 255  # 0..16 scaled to 0..255
  assert preprocess.prepare(image, preprocess.PreprocessConfig.for_image_size(32)).shape == (
      32, 32, 3)
  # The builder is a real TFDS dataset: TFDS opens it on its own.
  builder = tfds.builder_from_directory(f'{digits_data_dir}/digits/1.0.0')
  assert builder.info.splits['train'].num_examples == 1437


def test_digits_split_is_fixed_and_ranges_match(digits_data_dir, tmp_path):
  a = open_source('digits', digits_data_dir)
  b = open_source('digits', str(tmp_path))  # prepared again from scratch
  ids_a = [e.id for e in a.iter_examples('test')]
  assert ids_a == [e.id for e in b.iter_examples('test')]
  assert [e.id for e in a.iter_examples('test', 10, 15)] == ids_a[10:15]


def test_unknown_split_and_dataset(digits_data_dir, tmp_path):
  src = open_source('digits', digits_data_dir)
  with pytest.raises(UserError, match="no split 'validation'; available: test, train"):
    list(src.iter_examples('validation'))
  with pytest.raises(UserError, match='unknown dataset'):
    open_source('no_such_dataset_xyz')
  with pytest.raises(UserError, match='not prepared'):
    list(open_source('mnist', str(tmp_path)).iter_examples('train'))


def test_folder_source(tmp_path):
  red, blue = _png((255, 0, 0)), _png((0, 0, 255))
  root = make_folder(tmp_path / 'imgs', {'train': {'cat': [red, red], 'dog': [blue]},
                                         'test': {'dog': [blue]}})
  (root / 'train' / 'cat' / '.DS_Store').write_bytes(b'junk')  # hidden: skipped
  src = open_source(f'folder:{root}')
  assert src.splits == ['test', 'train'] and src.class_names == ['cat', 'dog']
  assert src.num_examples('train') == 3
  exs = list(src.iter_examples('train'))
  assert [(e.id, e.label) for e in exs] == [
      ('train/cat/00.png', 0), ('train/cat/01.png', 0), ('train/dog/00.png', 1)]
  assert exs[2].image == blue
  assert preprocess.decode(exs[0].image)[0, 0].tolist() == [255, 0, 0]
  assert [e.label for e in src.iter_examples('test')] == [1]  # names shared across splits
  with pytest.raises(UserError, match="no split 'val'"):
    src.num_examples('val')


def test_empty_or_missing_folder(tmp_path):
  with pytest.raises(UserError, match='holds no images'):
    open_source(f'folder:{tmp_path}')
  with pytest.raises(UserError, match='holds no images'):
    open_source(f'folder:{tmp_path}/missing')


def test_tfds_catalog_name_with_mock_data():
  with tfds.testing.mock_data(num_examples=6):
    src = open_source('mnist')
    assert src.class_names == [str(d) for d in range(10)]
    exs = list(src.iter_examples('train'))
  assert [e.id for e in exs] == [f'mnist/train/{i}' for i in range(6)]
  assert exs[0].image.shape == (28, 28, 1) and exs[0].image.dtype == np.uint8
  assert all(0 <= e.label < 10 for e in exs)


def test_folder_listing_skips_hidden_alike_and_keeps_strays(tmp_path):
  root = make_folder(tmp_path / 'imgs', {'train': {'cat': [_png((1, 2, 3))]}})
  for rel in ('train/cat/.hidden.png', 'train/.hiddendir/x.png', 'train/cat/.cache/y.png',
              'train/s.png', 'train/cat/sub/z.png'):
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(b'x')
  src = open_source(f'folder:{root}')
  assert [(e.id, isinstance(e, Dead)) for e in src.inputs('train')] == [
      ('train/cat/00.png', False), ('train/cat/sub/z.png', True), ('train/s.png', True)]
  # Every input counts (the dead ones too, as embed's 'read' does); one is an example.
  assert src.num_examples('train') == 3 and len(list(src.iter_examples('train'))) == 1


def test_failure_reasons_hold_no_memory_address():
  with pytest.raises(Exception) as e:
    Image.open(io.BytesIO(b'not an image'))
  reason = failure_reason(e.value)
  assert reason == 'UnidentifiedImageError: cannot identify image file <_io.BytesIO object>'


def test_corrupt_tfrecord_record_is_a_dead_record(tmp_path):
  """Catalog datasets are mostly TFRecord: reading goes on after the bad record."""
  import struct

  from clip_transfer.data import digits
  from clip_transfer.data.catalog import TfdsSource

  digits.Digits(data_dir=str(tmp_path), file_format='tfrecord').download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  (path,) = (tmp_path / 'digits' / '1.0.0').glob('digits-test.tfrecord-*')
  data, offset = bytearray(path.read_bytes()), 0
  for k in range(6):  # TFRecord: length (8), its crc (4), data, data crc (4)
    (n,) = struct.unpack('<Q', data[offset:offset + 8])
    if k == 5:
      data[offset + 12 + n // 2] ^= 0xff  # the data crc no longer matches
    offset += 12 + n + 4
  path.write_bytes(bytes(data))
  records = list(TfdsSource('digits', str(tmp_path)).inputs('test'))
  dead = [r for r in records if isinstance(r, Dead)]
  assert len(records) == 360
  assert dead == [Dead('digits/test/5',
                       'corrupt record: DataLossError: corrupted record at 1005')]
  # In-process, the dead record is left out as embed leaves it out, never raised.
  assert len(list(TfdsSource('digits', str(tmp_path)).iter_examples('test'))) == 359
