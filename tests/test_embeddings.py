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


def _tfds_bytes(enc, ex_id, embedding, label, projected=None):
  """The reference: what TFDS' own feature encoder and serializer write for a row."""
  from tensorflow_datasets.core import example_serializer  # pylint: disable=g-import-not-at-top

  serializer = example_serializer.ExampleSerializer(enc.features.get_serialized_info())
  ex = {'embedding': np.asarray(embedding, np.float32), 'label': int(label), 'id': ex_id}
  if projected is not None:
    ex['projected'] = np.asarray(projected, np.float32)
  return serializer.get_tf_example(enc.features.encode_example(ex)).SerializeToString(
      deterministic=True)


# Ids a folder, manifest or TFDS key can hold: non-ASCII, astral, quotes, control
# characters, empty, long enough that every length prefix needs two varint bytes.
ODD_IDS = ['train/c0/0001.jpg', 'é/ü ß 日本/𝄞 "q\'\n\t\x00,;', '', 'x' * 200, '\x7f\u2028']


@pytest.mark.parametrize('dim,projected_dim,names', [
    (8, None, NAMES), (8, 4, NAMES), (1, 1, ['only']), (768, 512, [str(i) for i in range(300)])])
def test_encoder_writes_the_bytes_tfds_writes(dim, projected_dim, names):
  import ml_dtypes  # pylint: disable=g-import-not-at-top

  enc = embeddings.Encoder(dim, names, projected_dim)
  rng = np.random.default_rng(dim)
  specials = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, 3.4e38], np.float32)
  labels = [-1, 0, len(names) - 1] + [int(x) for x in rng.integers(0, len(names), 2)]
  emb = rng.normal(size=(len(ODD_IDS), dim)).astype(np.float32)
  emb[0, :min(dim, 6)] = specials[:dim]
  pro = rng.normal(size=(len(ODD_IDS), projected_dim)) if projected_dim else None  # float64
  want = [_tfds_bytes(enc, i, e, l, None if pro is None else p)
          for i, e, l, p in zip(ODD_IDS, emb, labels, pro if pro is not None else emb)]
  assert enc.encode_batch(ODD_IDS, emb, labels, pro) == want
  assert [enc.encode(i, e, np.int64(l), None if pro is None else p)
          for i, e, l, p in zip(ODD_IDS, emb, labels, pro if pro is not None else emb)] == want
  # bfloat16 features (a --dtype=bfloat16 tower's raw output) are stored as float32 either way.
  low = emb.astype(ml_dtypes.bfloat16)
  assert enc.encode(ODD_IDS[1], low[1], 0, None if pro is None else pro[1]) == _tfds_bytes(
      enc, ODD_IDS[1], low[1].astype(np.float32), 0, None if pro is None else pro[1])


def test_encoder_refuses_what_tfds_refuses():
  enc = embeddings.Encoder(4, NAMES, 2)
  ok = np.zeros(4, np.float32), np.zeros(2, np.float32)
  for bad in (dict(label=3), dict(label=-2), dict(embedding=np.zeros(5)),
              dict(projected=np.zeros((2, 1))), dict(ex_id='\udcff')):  # an unpaired surrogate
    row = {'ex_id': 'a', 'embedding': ok[0], 'label': 0, 'projected': ok[1], **bad}
    with pytest.raises(Exception):  # TFDS wraps some in RuntimeError
      _tfds_bytes(enc, row['ex_id'], row['embedding'], row['label'], row['projected'])
    with pytest.raises(ValueError):  # UnicodeEncodeError is one
      enc.encode(**row)
  with pytest.raises(ValueError, match='3 rows of embedding for 2 ids'):
    enc.encode_batch(['a', 'b'], np.zeros((3, 4)), [0, 1], np.zeros((2, 2)))


def test_written_records_open_with_tfds_and_plain_array_record(tmp_path):
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top

  out = str(tmp_path / 'emb')
  rows = [(i, *r[1:]) for i, r in zip(ODD_IDS, _rows(len(ODD_IDS), 'o', projected=4))]
  embeddings.write_dataset(out, {'train': rows}, NAMES, {}, examples_per_shard=100)
  source = tfds.builder_from_directory(out).as_data_source('train')
  got = {source[k]['id'].decode(): source[k] for k in range(len(source))}
  assert sorted(got) == sorted(ODD_IDS)
  enc = embeddings.Encoder(8, NAMES, 4)
  path = os.path.join(out, embeddings.shard_name('train', 0, 1))
  reader = ArrayRecordReader(path)
  records = reader.read_all()
  reader.close()
  # Sorted by id within the shard, each record exactly TFDS' own serialisation.
  assert records == [_tfds_bytes(enc, *r) for r in sorted(rows, key=lambda r: r[0])]
  for ex_id, emb, label, pro in rows:
    np.testing.assert_array_equal(got[ex_id]['embedding'], emb)
    np.testing.assert_array_equal(got[ex_id]['projected'], pro)
    assert got[ex_id]['label'] == label
    parsed = tf_example_pb2.Example.FromString(records[sorted(ODD_IDS).index(ex_id)])
    assert parsed.features.feature['id'].bytes_list.value == [ex_id.encode()]


def test_group_by_shard_keeps_order_within_a_shard():
  items = [{'id': f'r{i}'} for i in range(40)]
  groups = embeddings.group_by_shard(items, lambda r: r['id'], 3)
  assert [i for i, _ in groups] == sorted({embeddings.shard_index(r['id'], 3) for r in items})
  for index, members in groups:
    assert members == [r for r in items if embeddings.shard_index(r['id'], 3) == index]
  assert embeddings.group_by_shard([], str, 3) == []
