"""clip_transfer.data.embeddings: the embedding dataset written, read back, refused when incomplete."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from clip_transfer.data import embeddings
from clip_transfer.errors import UserError

NAMES = ['a', 'b', 'c']


def _rows(n, prefix, dim=8, seed=0, projected=None):
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    row = (f'{prefix}/{i}', rng.normal(size=dim).astype(np.float32), i % 3)
    rows.append(row + (rng.normal(size=projected).astype(np.float32),) if projected else row)
  return rows


def _shard_bytes(path):
  return {f: open(os.path.join(path, f), 'rb').read()
          for f in sorted(os.listdir(path)) if '.array_record-' in f}


def test_round_trip_through_tfds(tmp_path):
  out = str(tmp_path / 'emb')
  train, test = _rows(50, 'tr'), _rows(7, 'te', seed=1)
  embeddings.write_dataset(out, {'train': train, 'test': test}, NAMES,
                           {'model': {'name': 'x'}}, examples_per_shard=20)
  builder = tfds.builder_from_directory(out)
  assert builder.info.splits['train'].num_shards == 3
  f = builder.info.features
  assert f['embedding'].shape == (8,) and f['embedding'].dtype == np.float32
  assert f['label'].names == NAMES and 'projected' not in f
  sources = builder.as_data_source()
  assert (len(sources['train']), len(sources['test'])) == (50, 7)
  x, y, ids = embeddings.read_split(out, 'train')
  assert x.shape == (50, 8) and x.dtype == np.float32 and y.dtype == np.int64
  want = {i: (e, l) for i, e, l in train}
  assert sorted(ids) == sorted(want)
  for k, i in enumerate(ids):
    np.testing.assert_array_equal(x[k], want[i][0])
    assert y[k] == want[i][1]
  meta = embeddings.read_metadata(out)
  assert meta['model'] == {'name': 'x'}
  assert meta['counts']['test'] == {'written': 7, 'dead_lettered': 0}


def test_projected_feature_and_empty_shards(tmp_path):
  out = str(tmp_path / 'emb')
  rows = _rows(3, 'p', projected=4)
  # 3 rows over 3 shards: these ids hash to shards [1, 0, 1], so shard 2 is empty.
  assert [embeddings.shard_index(r[0], 3) for r in rows] == [1, 0, 1]
  embeddings.write_dataset(out, {'train': rows}, NAMES, {}, examples_per_shard=1)
  builder = tfds.builder_from_directory(out)
  assert builder.info.splits['train'].shard_lengths == [1, 2, 0]
  source = builder.as_data_source('train')
  got = {source[i]['id'].decode(): source[i]['projected'] for i in range(len(source))}
  for i, _, _, p in rows:
    np.testing.assert_array_equal(got[i], p)


def test_same_rows_same_bytes_in_any_order(tmp_path):
  rows = _rows(40, 'd')
  embeddings.write_dataset(str(tmp_path / 'a'), {'train': rows}, NAMES, {}, examples_per_shard=15)
  embeddings.write_dataset(str(tmp_path / 'b'), {'train': rows[::-1]}, NAMES, {},
                           examples_per_shard=15)
  a, b = _shard_bytes(tmp_path / 'a'), _shard_bytes(tmp_path / 'b')
  assert len(a) == 3 and a == {k: b[k] for k in a}


def test_errors_name_the_problem(tmp_path):
  out = str(tmp_path / 'emb')
  embeddings.write_dataset(out, {'train': _rows(5, 'e')}, NAMES, {})
  with pytest.raises(UserError, match="no split 'test'; available: train"):
    embeddings.read_split(out, 'test')
  with pytest.raises(UserError, match='already holds an embedding dataset; pass --overwrite'):
    embeddings.write_dataset(out, {'train': _rows(5, 'e')}, NAMES, {})
  embeddings.write_dataset(out, {'train': _rows(6, 'e')}, NAMES, {}, overwrite=True)
  assert len(embeddings.read_split(out, 'train')[2]) == 6
  with pytest.raises(UserError, match='not an embedding dataset'):
    embeddings.read_split(str(tmp_path), 'train')
  with pytest.raises(UserError, match="split 'train' is empty"):
    embeddings.write_dataset(str(tmp_path / 'x'), {'train': []}, NAMES, {})


def test_incomplete_run_is_never_readable(tmp_path):
  out = str(tmp_path / 'emb')
  embeddings.write_dataset(out, {'train': _rows(5, 'i')}, NAMES, {})
  os.remove(os.path.join(out, embeddings.INFO_FILE))  # as if killed before the last write
  with pytest.raises(UserError, match='incomplete'):
    embeddings.read_split(out, 'train')
  with pytest.raises(Exception):
    tfds.builder_from_directory(out)
  with pytest.raises(UserError, match='incomplete run'):
    embeddings.write_dataset(out, {'train': _rows(5, 'i')}, NAMES, {})
