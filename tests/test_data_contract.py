"""One data-source contract: the same bad inputs dead-lettered alike by embed and fine-tune.

Also issue 22's data defects, each through the real CLIs (refusals are one line, exit 2,
before any model loads).
"""

import io
import json
import logging
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from finetune import input_pipeline
from finetune import train as finetune_train
from pipelines import embed
from clip_transfer import models
from clip_transfer.data import embeddings, paths, preprocess
from clip_transfer.data.base import dead_letter_lines
from clip_transfer.data.sources import Dead, open_source

pytestmark = pytest.mark.usefixtures('xla_cache')  # tests/conftest.py

MODEL = 'random:tiny'
COLORS = {'cat': (200, 30, 30), 'dog': (30, 200, 30), 'owl': (30, 30, 200)}


def _png(color, size=(12, 10)) -> bytes:
  buf = io.BytesIO()
  Image.new('RGB', size, color).save(buf, format='PNG')
  return buf.getvalue()


def _embed_cli(capsys, *argv):
  """The embed CLI; returns (exit code, stderr lines)."""
  try:
    embed.main([f'--model={MODEL}', '--batch_size=4', *argv])
    code = 0
  except SystemExit as e:
    code = e.code
  return code, capsys.readouterr().err.strip().splitlines()


def _finetune_cli(capsys, *argv):
  try:
    code = finetune_train.main([f'--model={MODEL}', '--mode=linear', '--batch_size=4',
                                '--no_progress', *argv])
  except SystemExit as e:
    code = e.code
  return code, capsys.readouterr().err.strip().splitlines()


def _letters(out, split) -> bytes:
  with open(os.path.join(out, f'dead_letters.{split}.jsonl'), 'rb') as fh:
    return fh.read()


@pytest.fixture
def no_model_load(monkeypatch):
  """Fails the test if a model is loaded: a refusal must come first."""
  def boom(*_, **__):
    raise AssertionError('the model was loaded before the refusal')
  monkeypatch.setattr(models, 'load', boom)


# --------------------------------------------------------------------------
# Embed and fine-tune count and write the same dead letters (issue 17, issue 22 #11)
# --------------------------------------------------------------------------


@pytest.fixture
def bad_manifest(tmp_path):
  """A headed CSV: 12 good train rows and one bad row of every kind; test: 3 bad of 6."""
  root = tmp_path / 'data'
  root.mkdir()
  rows = ['image,label,split']
  for name, color in COLORS.items():
    for i in range(4):
      (root / f'{name}{i}.png').write_bytes(_png(color))
      rows.append(f'{name}{i}.png,{name},train')
    (root / f'{name}_t.png').write_bytes(_png(color))
  (root / 'corrupt.png').write_bytes(b'not an image')
  (root / 'folder.png').mkdir()
  os.mkfifo(root / 'fifo.png')  # read, it would block forever
  (root / 'dup.png').write_bytes(_png((9, 9, 9)))
  rows += ['missing.png,cat,train', 'folder.png,dog,train', 'fifo.png,cat,train',
           '/dev/zero,dog,train',  # read, it never ends
           'corrupt.png,owl,train', 'cat_t.png,,train', 'dup.png,cat,train',
           'dup.png,dog,train']
  rows += ['cat_t.png,cat,test', 'dog_t.png,dog,test', 'owl_t.png,owl,test',
           'missing.png,cat,test', 'folder.png,dog,test', 'corrupt.png,owl,test']
  (root / 'manifest.csv').write_text('\n'.join(rows) + '\n')
  return root / 'manifest.csv'


def test_embed_and_finetune_dead_letter_the_same_inputs(bad_manifest, tmp_path, capsys):
  out, workdir = str(tmp_path / 'emb'), str(tmp_path / 'ft')
  spec = f'--dataset=csv:{bad_manifest}'
  code, _ = _embed_cli(capsys, spec, f'--output_dir={out}', '--splits=train,test')
  assert code == 0
  counts = embeddings.read_metadata(out)['counts']
  code, err = _finetune_cli(capsys, spec, f'--workdir={workdir}')
  assert code == 0, err
  m = json.load(open(os.path.join(workdir, 'metrics.json')))
  # Issue 22 #11: 3 unusable of the 6 test rows count 3 in both stages.
  assert m['dead_lettered'] == {'train': 8, 'test': 3}
  for split in ('train', 'test'):
    assert _letters(workdir, split) == _letters(out, split)  # the same ids, the same reasons
  reasons = {d['id']: d['reason'] for d in map(json.loads, _letters(out, 'train').splitlines())}
  assert reasons['missing.png'].startswith('missing file')
  assert reasons['folder.png'].startswith('not a regular file')
  assert reasons['fifo.png'].startswith('not a regular file')
  assert reasons['/dev/zero'].startswith('not a regular file')
  assert 'cannot decode' in reasons['corrupt.png']
  assert 'different labels' in reasons['dup.png']
  assert counts['test'] == {'read': 6, 'written': 3, 'dead_lettered': 3}


def test_an_oversized_file_is_dead_lettered_not_read(tmp_path, monkeypatch):
  (tmp_path / 'big.png').write_bytes(_png((1, 2, 3)))
  monkeypatch.setattr(paths, 'MAX_FILE_BYTES', 10)
  got = paths.read_input(str(tmp_path / 'big.png'), 'big')
  assert isinstance(got, Dead) and got.reason.startswith('file too large')


def _same_dead(source, split, out):
  """The in-process driver's dead inputs (as fine-tune prepares them) == embed's file."""
  cfg = preprocess.PreprocessConfig.for_image_size(16)
  got = input_pipeline.load_split(source, split, cfg, progress=False)
  assert b''.join(dead_letter_lines(got.dead)) == _letters(out, split)
  return got


# --------------------------------------------------------------------------
# Issue 22 #1: a CSV header with other column names
# --------------------------------------------------------------------------


def test_csv_header_with_other_names_is_refused_in_one_line(tmp_path, capsys, no_model_load):
  (tmp_path / 'a.png').write_bytes(_png((1, 2, 3)))
  manifest = tmp_path / 'm.csv'
  manifest.write_text('path,class\na.png,cat\n')
  for cli, flag in ((_embed_cli, f'--output_dir={tmp_path}/out'),
                    (_finetune_cli, f'--workdir={tmp_path}/wd')):
    code, err = cli(capsys, f'--dataset=csv:{manifest}', flag)
    assert code == 2 and len(err) == 1, err
    assert "looks like a header" in err[0] and '--image_column' in err[0]
  # Named, it is read.
  src = open_source(f'csv:{manifest}', image_column='path', label_column='class')
  assert src.class_names == ['cat'] and len(list(src.iter_examples('train'))) == 1


def test_headerless_manifest_with_val_or_dev_splits(tmp_path):
  (tmp_path / 'a.png').write_bytes(_png((1, 2, 3)))
  manifest = tmp_path / 'm.csv'
  manifest.write_text('train,a.png,cat\nval,a.png,dog\ndev,b.png,dog\nholdout,a.png,cat\n')
  src = open_source(f'csv:{manifest}')
  assert src.splits == ['train', 'validation']
  (dead,) = [i for i in src.inputs('train') if isinstance(i, Dead)]
  assert dead.reason.startswith("unknown split 'holdout' in the first column")


def test_an_image_in_train_and_test_is_warned_with_the_count(tmp_path, caplog):
  (tmp_path / 'a.png').write_bytes(_png((1, 2, 3)))
  manifest = tmp_path / 'm.csv'
  manifest.write_text('train,a.png,cat\ntest,a.png,cat\n')
  src = open_source(f'csv:{manifest}')
  assert src.shared_inputs(['train', 'test']) == 1
  assert src.shared_inputs(['train']) == 0


# --------------------------------------------------------------------------
# Issue 22 #2, #3: Parquet schemas and Hugging Face metadata
# --------------------------------------------------------------------------


def _parquet(path, table, hf=None):
  if hf is not None:
    table = table.replace_schema_metadata({b'huggingface': hf})
  pq.write_table(table, str(path))


def test_parquet_files_with_different_schemas_are_refused_up_front(tmp_path, capsys,
                                                                  no_model_load):
  img = {'bytes': _png((1, 2, 3)), 'path': None}
  _parquet(tmp_path / 'train-0.parquet', pa.table({'image': [img], 'label': [0]}))
  _parquet(tmp_path / 'train-1.parquet', pa.table({'image': [img], 'tag': [0]}))
  for cli, flag in ((_embed_cli, f'--output_dir={tmp_path}/out'),
                    (_finetune_cli, f'--workdir={tmp_path}/wd')):
    code, err = cli(capsys, f'--dataset=parquet:{tmp_path}/*.parquet', flag)
    assert code == 2 and len(err) == 1, err
    assert "train-1.parquet has no column 'label'" in err[0]
  os.remove(tmp_path / 'train-1.parquet')
  _parquet(tmp_path / 'train-1.parquet', pa.table({'image': [img], 'label': ['cat']}))
  code, err = _embed_cli(capsys, f'--dataset=parquet:{tmp_path}/*.parquet',
                         f'--output_dir={tmp_path}/out')
  assert code == 2 and len(err) == 1 and "column 'label' is string, but int64" in err[0]


def test_malformed_hf_metadata(tmp_path, capsys, caplog, no_model_load):
  img = {'bytes': _png((1, 2, 3)), 'path': None}
  table = pa.table({'image': [img, img], 'label': [0, 1]})
  for i, hf in enumerate((b'{not json', json.dumps({'info': {'features': ['label']}}).encode())):
    d = tmp_path / f'ignored{i}'
    d.mkdir()
    _parquet(d / 'train-0.parquet', table, hf)
    with caplog.at_level(logging.WARNING):
      src = open_source(f'parquet:{d}/*.parquet')
    assert src.class_names == ['0', '1']  # read from the column instead
    assert 'ignoring its Hugging Face metadata' in caplog.text
  d = tmp_path / 'dup'
  d.mkdir()
  _parquet(d / 'train-0.parquet', table, json.dumps({'info': {'features': {'label': {
      '_type': 'ClassLabel', 'names': ['cat', 'dog', 'cat']}}}}).encode())
  code, err = _embed_cli(capsys, f'--dataset=parquet:{d}/*.parquet', f'--output_dir={d}/out')
  assert code == 2 and len(err) == 1 and "ClassLabel names of 'label' repeats cat" in err[0]


def test_a_huge_integer_label_is_refused_in_one_line(tmp_path, capsys, no_model_load):
  img = {'bytes': _png((1, 2, 3)), 'path': None}
  _parquet(tmp_path / 'train-0.parquet', pa.table({'image': [img, img],
                                                   'label': [0, 2_000_000_000]}))
  code, err = _embed_cli(capsys, f'--dataset=parquet:{tmp_path}/*.parquet',
                         f'--output_dir={tmp_path}/out')
  assert code == 2 and len(err) == 1
  assert 'would make 2000000001 classes (limit 100000)' in err[0] and '--max_classes' in err[0]


# --------------------------------------------------------------------------
# Issue 22 #4, #5: WebDataset shards cut short, duplicate keys, all missing
# --------------------------------------------------------------------------


def _shard(path, keys):
  with tarfile.open(path, 'w') as tar:
    for key in keys:
      for ext, data in (('png', _png((5, 5, 5))), ('cls', b'0')):
        info = tarfile.TarInfo(f'{key}.{ext}')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _member_ends(path):
  with tarfile.open(path) as tar:
    return [m.offset_data + -(-m.size // 512) * 512 for m in tar]


@pytest.mark.parametrize('cut', ['in_header', 'between_members'])
def test_a_truncated_shard_is_dead_lettered(tmp_path, capsys, cut):
  good, bad = tmp_path / 'train-0.tar', tmp_path / 'train-1.tar'
  _shard(good, ['a', 'b'])
  _shard(bad, ['c', 'd', 'e'])
  ends = _member_ends(bad)
  size = ends[3] + (100 if cut == 'in_header' else 0)  # c and d whole, e lost
  data = bad.read_bytes()[:size]
  bad.write_bytes(data)
  out = str(tmp_path / 'out')
  code, err = _embed_cli(capsys, f'--dataset=wds:{tmp_path}/train-{{0..1}}.tar',
                         f'--output_dir={out}', '--splits=train')
  assert code == 0, err
  dead = {d['id']: d['reason'] for d in map(json.loads, _letters(out, 'train').splitlines())}
  assert 'train-1' in dead and dead['train-1'].startswith('shard cut short')
  src = open_source(f'wds:{tmp_path}/train-{{0..1}}.tar')
  inputs = list(src.inputs('train'))
  assert sum(isinstance(i, Dead) for i in inputs) == len(dead)
  _same_dead(src, 'train', out)


def test_a_duplicate_wds_key_is_dead_lettered(tmp_path, capsys):
  shard = tmp_path / 'train-0.tar'
  _shard(shard, ['a', 'b', 'a'])
  out = str(tmp_path / 'out')
  code, err = _embed_cli(capsys, f'--dataset=wds:{shard}', f'--output_dir={out}',
                         '--splits=train')
  assert code == 0, err
  dead = [json.loads(l) for l in _letters(out, 'train').splitlines()]
  assert dead == [{'id': 'train-0/a', 'reason': 'duplicate key: a second member group with '
                   'this key in the shard'}]
  assert embeddings.read_metadata(out)['counts']['train'] == {
      'read': 3, 'written': 2, 'dead_lettered': 1}


def test_all_wds_shards_missing_says_so(tmp_path, capsys, no_model_load):
  code, err = _embed_cli(capsys, f'--dataset=wds:{tmp_path}/s-{{0..2}}.tar',
                         f'--output_dir={tmp_path}/out')
  assert code == 2 and len(err) == 1
  assert 'none of its 3 shard(s) exists' in err[0] and 's-0.tar' in err[0]


# --------------------------------------------------------------------------
# Folders and TFDS: the in-process driver agrees with embed
# --------------------------------------------------------------------------


def test_folder_dead_letters_agree_in_process(tmp_path, capsys):
  root = tmp_path / 'imgs'
  for rel, data in (('train/cat/a.png', _png((1, 2, 3))), ('train/dog/b.png', _png((3, 2, 1))),
                    ('train/dog/bad.png', b'junk'), ('train/stray.png', _png((0, 0, 0)))):
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
  os.mkfifo(root / 'train/cat/pipe.png')
  out = str(tmp_path / 'out')
  code, err = _embed_cli(capsys, f'--dataset=folder:{root}', f'--output_dir={out}',
                         '--splits=train')
  assert code == 0, err
  got = _same_dead(open_source(f'folder:{root}'), 'train', out)
  assert len(got.dead) == 3 and len(got) == 2


# --------------------------------------------------------------------------
# Fine-tune input: parallel preparation, prefetched batches (issue 20 item 1)
# --------------------------------------------------------------------------


def test_parallel_preparation_and_prefetch_equal_the_serial_loop(tmp_path):
  root = tmp_path / 'imgs'
  rng = np.random.default_rng(0)
  for i in range(10):
    (root / 'train' / f'c{i % 2}').mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype='uint8')).save(
        root / 'train' / f'c{i % 2}' / f'{i}.png')
  source = open_source(f'folder:{root}')
  cfg = preprocess.PreprocessConfig.for_image_size(16)
  serial = input_pipeline.load_split(source, 'train', cfg, progress=False, threads=1)
  parallel = input_pipeline.load_split(source, 'train', cfg, progress=False, threads=3)
  assert serial.ids == parallel.ids and (serial.images == parallel.images).all()
  assert (serial.labels == parallel.labels).all()
  want = [input_pipeline.train_batch(serial, 4, s, 7, augment=True) for s in range(2, 7)]
  with input_pipeline.Prefetch(serial, 4, 2, 7, 7, augment=True) as batches:
    got = list(batches)
  assert len(got) == 5
  for g, w in zip(got, want):
    assert (g['image'] == w['image']).all() and (g['label'] == w['label']).all()
  with input_pipeline.Prefetch(serial, 4, 0, 1000, 7) as batches:  # left early: no hang
    next(iter(batches))
  with pytest.raises(Exception, match='batch size 40 is larger'):
    with input_pipeline.Prefetch(serial, 40, 0, 2, 7) as batches:
      list(batches)


def test_parquet_and_tfds_dead_letters_agree_in_process(tmp_path, capsys, digits_data_dir):
  import shutil  # pylint: disable=import-outside-toplevel
  from test_reliability import _corrupt_record  # pylint: disable=import-outside-toplevel

  (tmp_path / 'p').mkdir()
  good = {'bytes': _png((1, 2, 3)), 'path': None}
  _parquet(tmp_path / 'p' / 'train-0.parquet', pa.table({
      'image': [good, good, good, {'bytes': None, 'path': None},
                {'bytes': None, 'path': 'gone.png'}, {'bytes': b'junk', 'path': None}],
      'label': ['cat', 'dog', None, 'cat', 'dog', 'cat']}))
  out = str(tmp_path / 'out_p')
  code, err = _embed_cli(capsys, f'--dataset=parquet:{tmp_path}/p/*.parquet',
                         f'--output_dir={out}', '--splits=train')
  assert code == 0, err
  got = _same_dead(open_source(f'parquet:{tmp_path}/p/*.parquet'), 'train', out)
  assert len(got.dead) == 4 and len(got) == 2

  data_dir = str(tmp_path / 'tfds')
  shutil.copytree(digits_data_dir, data_dir)
  _corrupt_record(data_dir, 'test', 5)
  out = str(tmp_path / 'out_t')
  code, err = _embed_cli(capsys, '--dataset=digits', f'--data_dir={data_dir}',
                         f'--output_dir={out}', '--splits=test')
  assert code == 0, err
  got = _same_dead(open_source('digits', data_dir), 'test', out)
  assert [d.id for d in got.dead] == ['digits/test/5'] and len(got) == 359
