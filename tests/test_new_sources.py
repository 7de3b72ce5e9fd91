"""csv:, parquet: and wds: sources: through the embed CLI, the Beam readers and iter_examples."""

import io
import json
import os
import tarfile

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystem import FileMetadata
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipelines import embed, reads
from test_embed import FakeFileSystem
from clip_transfer.data import embeddings
from clip_transfer.data import labels, manifest, paths, webdataset
from clip_transfer.data import preprocess
from clip_transfer.errors import UserError
from clip_transfer.data.sources import open_source

MODEL = 'random:tiny'
COLORS = {'cat': (200, 30, 30), 'dog': (30, 200, 30), 'owl': (30, 30, 200)}
NAMES = sorted(COLORS)


def _image(color, fmt='PNG', size=(20, 16)) -> bytes:
  buf = io.BytesIO()
  Image.new('RGB', size, color).save(buf, format=fmt)
  return buf.getvalue()


def _run(*argv):
  return embed.run([f'--model={MODEL}', '--batch_size=4', *argv])


def _dead(out, split):
  path = os.path.join(out, f'dead_letters.{split}.jsonl')
  return {d['id']: d['reason'] for d in map(json.loads, open(path))}


def _written(out, split):
  _, y, ids = embeddings.read_split(out, split)
  return dict(zip(ids, y.tolist()))


def _usable(source, split):
  """What the fine-tune stage keeps: iter_examples minus images that fail to decode."""
  out = {}
  for ex in source.iter_examples(split):
    try:
      preprocess.decode(ex.image)
    except preprocess.ImageError:
      continue
    out[ex.id] = ex.label
  return out


def _check_reader(source, split) -> int:
  """The split's Beam reader alone gives the inputs iter_examples sees; returns found's sum."""
  inputs = list(source.inputs(split))
  examples = sorted(i.id for i in inputs if not isinstance(i, tuple))
  dead = sorted(i for i in inputs if isinstance(i, tuple))
  with test_pipeline.TestPipeline(runner='FnApiRunner') as p:
    read = reads.read_split(p, source, split, None)
    assert_that(read.examples | 'Ids' >> beam.Map(lambda e: e[0]), equal_to(examples),
                label='Examples')
    assert_that(read.dead | 'Dead' >> beam.Flatten(), equal_to(dead), label='DeadLetters')
    assert_that(read.found | 'Sum' >> beam.CombineGlobally(sum), equal_to([len(inputs)]),
                label='Found')
  return len(inputs)


# --------------------------------------------------------------------------
# CSV manifests
# --------------------------------------------------------------------------


@pytest.fixture
def vertex_manifest(tmp_path):
  """A Vertex AI manifest over a folder with a missing and a corrupt file."""
  imgs = tmp_path / 'data' / 'imgs'
  imgs.mkdir(parents=True)
  rows = []
  for i in range(9):
    cls = NAMES[i % 3]
    (imgs / f'{i}.png').write_bytes(_image(COLORS[cls]))
    rows.append(f'{"test" if i >= 6 else "training"},imgs/{i}.png,{cls}')
  (imgs / 'corrupt.png').write_bytes(b'not an image' * 5)
  (imgs / 'unlabelled.png').write_bytes(_image(COLORS['cat']))
  abs_path = imgs / 'abs.png'
  abs_path.write_bytes(_image(COLORS['dog']))
  rows += ['TRAINING,imgs/missing.png,cat', 'training,imgs/corrupt.png,dog',
           'training,imgs/unlabelled.png,', f'{abs_path},dog',  # no split column: default split
           'test,imgs/8.png,owl', 'test,imgs/7.png,cat',  # listed twice: same / other label
           '', 'test,a,b,c']
  manifest = tmp_path / 'data' / 'manifest.csv'
  manifest.write_text('\n'.join(rows) + '\n')
  return manifest, abs_path


def test_csv_vertex_manifest_end_to_end(vertex_manifest, tmp_path):
  manifest, abs_path = vertex_manifest
  out = str(tmp_path / 'out')
  summary = _run(f'--dataset=csv:{manifest}', f'--output_dir={out}')
  # train: 6 good + missing + corrupt + unlabelled + absolute path;
  # test: 3 + a bad row + 8.png again (kept once) + 7.png with another label (both dead).
  assert summary['counts'] == {'train': {'read': 10, 'written': 7, 'dead_lettered': 3},
                               'test': {'read': 6, 'written': 2, 'dead_lettered': 4}}
  dead = _dead(out, 'train')
  assert dead['imgs/missing.png'] == f'missing file: {manifest.parent}/imgs/missing.png'
  assert 'cannot decode' in dead['imgs/corrupt.png']
  assert dead['imgs/unlabelled.png'] == 'empty label'
  assert _dead(out, 'test') == {
      'test,a,b,c': '3 columns after the split, expected IMAGE,LABEL',
      'imgs/8.png': 'duplicate row (listed 2 times)',
      'imgs/7.png': "listed 2 times with different labels: 'cat', 'dog'"}
  assert _written(out, 'test') == {'imgs/6.png': 0, 'imgs/8.png': 2}
  written = _written(out, 'train')
  assert written[str(abs_path)] == 1 and written['imgs/4.png'] == 1  # id: the path as written
  assert embeddings.read_metadata(out)['source']['class_names'] == NAMES
  # The fine-tune stage reads the same examples through iter_examples.
  source = open_source(f'csv:{manifest}')
  assert source.num_examples('train') == 10
  for split in ('train', 'test'):
    assert _usable(source, split) == _written(out, split)
    assert _check_reader(source, split) == summary['counts'][split]['read']


def test_headed_tsv_with_class_names_file(tmp_path):
  for i, cls in enumerate(['owl', 'cat', 'owl', 'dog', 'owl']):
    (tmp_path / f'{i}.jpg').write_bytes(_image(COLORS[cls], 'JPEG'))
  (tmp_path / 'manifest.tsv').write_text(
      'Split\tlabel\timage\n'
      'train\towl\t0.jpg\ntrain\tcat\t1.jpg\nvalidation\towl\t2.jpg\n'
      'train\tdog\t3.jpg\ntrain\tbird\t4.jpg\n')
  (tmp_path / 'classes.txt').write_text('owl\ncat\ndog\n')
  out = str(tmp_path / 'out')
  summary = _run(f'--dataset=csv:{tmp_path}/manifest.tsv', f'--class_names={tmp_path}/classes.txt',
                 '--splits=train,validation', f'--output_dir={out}')
  assert summary['counts']['train'] == {'read': 4, 'written': 3, 'dead_lettered': 1}
  assert _dead(out, 'train') == {'4.jpg': "unknown label 'bird'"}  # not in --class_names
  assert _written(out, 'train') == {'0.jpg': 0, '1.jpg': 1, '3.jpg': 2}  # the file's order
  assert _written(out, 'validation') == {'2.jpg': 0}
  with pytest.raises(UserError, match="no split 'test'; available: train, validation"):
    _run(f'--dataset=csv:{tmp_path}/manifest.tsv', f'--output_dir={tmp_path}/o2')


def test_csv_parsing_rules():
  vertex = manifest.sniff_csv('training,gs://b/x.jpg,cat', 'm.csv', 'image', 'label')
  parse = lambda line: manifest.parse_csv_line(line, vertex, 'train')
  assert parse('training,gs://b/x.jpg,cat') == ('train', 'gs://b/x.jpg', 'gs://b/x.jpg', 'cat')
  assert parse('VALIDATION,x.jpg,cat')[0] == 'validation'
  assert parse('\ufefftest,x.jpg,cat\r\n')[0] == 'test'  # BOM and CRLF (Excel exports)
  assert parse('UNASSIGNED,x.jpg,cat')[0] == 'train'  # Vertex's "assign for me": default split
  assert parse('x.jpg,cat') == ('train', 'x.jpg', 'x.jpg', 'cat')
  assert parse('test,x.jpg') == ('test', 'x.jpg', 'x.jpg', '')  # unlabelled: dead later
  assert parse('"a,b.jpg",cat')[2] == 'a,b.jpg'  # CSV quoting
  assert parse('   ') is None
  assert labels.label_index('', NAMES) == 'empty label'
  assert labels.label_index(' dog ', NAMES) == 1


# --------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------


def _hf_table(images, labels, names=None):
  table = pa.table({'image': images, 'label': labels})
  if names:
    hf = {'info': {'features': {'image': {'_type': 'Image'},
                                'label': {'names': names, '_type': 'ClassLabel'}}}}
    table = table.replace_schema_metadata({b'huggingface': json.dumps(hf).encode()})
  return table


def test_parquet_string_labels_end_to_end(tmp_path):
  """Written by pyarrow as a new user would: {bytes, path} structs, string labels."""
  d = tmp_path / 'pq'
  d.mkdir()
  good = [{'bytes': _image(COLORS[c]), 'path': f'{c}.png'} for c in ('owl', 'cat', 'dog', 'cat')]
  pq.write_table(pa.table({
      'image': good + [{'bytes': b'garbage', 'path': 'x.png'}, {'bytes': good[0]['bytes'],
                                                               'path': None},
                       {'bytes': None, 'path': 'missing.png'}],
      'label': ['owl', 'cat', 'dog', 'cat', 'cat', None, 'dog']}),
      d / 'train-00000-of-00001.parquet', row_group_size=3)
  pq.write_table(pa.table({'image': good[:2], 'label': ['owl', 'cat']}),
                 d / 'test-00000-of-00001.parquet')
  out = str(tmp_path / 'out')
  summary = _run(f'--dataset=parquet:{d}/*.parquet', f'--output_dir={out}')
  assert summary['counts']['train'] == {'read': 7, 'written': 4, 'dead_lettered': 3}
  f = 'train-00000-of-00001.parquet'
  dead = _dead(out, 'train')
  assert dead[f'{f}/5'] == 'empty label'
  assert dead[f'{f}/6'] == f'missing file: {d}/missing.png'
  assert 'cannot decode' in dead[f'{f}/4']
  assert _written(out, 'train') == {f'{f}/0': 2, f'{f}/1': 0, f'{f}/2': 1, f'{f}/3': 0}
  assert embeddings.read_metadata(out)['source']['class_names'] == NAMES
  source = open_source(f'parquet:{d}/*.parquet')
  assert _usable(source, 'train') == _written(out, 'train')
  assert _check_reader(source, 'train') == 7


def test_parquet_hf_classlabel_split_dirs_and_columns(tmp_path):
  names = ['zebra', 'ant']  # ClassLabel order, not sorted
  for split, labels in (('train', [0, 1, 1, 5]), ('test', [1, -1])):
    d = tmp_path / 'hf' / f'split={split}'
    d.mkdir(parents=True)
    table = _hf_table([_image((i * 40, 0, 0)) for i in range(len(labels))], labels, names)
    pq.write_table(table.rename_columns(['img', 'y']).replace_schema_metadata(
        {b'huggingface': json.dumps({'info': {'features': {
            'img': {'_type': 'Image'}, 'y': {'names': names, '_type': 'ClassLabel'}}}}).encode()}),
        d / '0000.parquet')
  spec = f'parquet:{tmp_path}/hf/*/*.parquet'
  source = open_source(spec, image_column='img', label_column='y')
  assert source.class_names == names and source.splits == ['test', 'train']
  out = str(tmp_path / 'out')
  summary = _run(f'--dataset={spec}', '--image_column=img', '--label_column=y',
                 f'--output_dir={out}')
  assert summary['counts']['test'] == {'read': 2, 'written': 1, 'dead_lettered': 1}
  assert _dead(out, 'test') == {'split=test/0000.parquet/1': 'no label (-1)'}
  assert _dead(out, 'train') == {'split=train/0000.parquet/3': 'label 5 out of range for 2 classes'}
  assert embeddings.read_metadata(out)['source']['class_names'] == names
  with pytest.raises(UserError, match="no column 'image'.*--image_column"):
    open_source(spec)
  with pytest.raises(UserError, match='no Parquet files match'):
    open_source(f'parquet:{tmp_path}/nothing/*.parquet')


def test_split_from_file_names():
  s = paths.split_of_path
  assert s('train-00000-of-00004.parquet', 'x') == 'train'
  assert s('data/validation-00000-of-00001.parquet', 'x') == 'validation'
  assert s('cifar10/split=test/part-0.parquet', 'x') == 'test'
  assert s('plain/test/0000.parquet', 'x') == 'test'  # the Hub's refs/convert/parquet layout
  assert s('plain/partial-train/0000.parquet', 'x') == 'train'  # a partial conversion
  assert s('trainset.parquet', 'x') == 'x'


def test_parquet_image_paths_and_txt_labels_in_shards(tmp_path):
  """Parquet rows naming image files (relative to the file); .txt labels in shards."""
  (tmp_path / 'a.png').write_bytes(_image(COLORS['dog']))
  pq.write_table(pa.table({'image': ['a.png', 'gone.png', None], 'label': ['dog'] * 3}),
                 tmp_path / 'rows.parquet')
  got = list(open_source(f'parquet:{tmp_path}/*.parquet').inputs('train'))
  assert got[0].id == 'rows.parquet/0' and got[0].image == (tmp_path / 'a.png').read_bytes()
  assert got[1:] == [('rows.parquet/1', f'missing file: {tmp_path}/gone.png'),
                     ('rows.parquet/2', 'no image')]
  _tar(tmp_path / 'txt.tar', [('k1.png', _image(COLORS['owl'])), ('k1.txt', b'owl\n'),
                              ('k2.png', _image(COLORS['cat'])), ('k2.txt', b' cat ')])
  source = open_source(f'wds:{tmp_path}/txt.tar', default_split='test')
  assert source.splits == ['test'] and source.class_names == ['cat', 'owl']
  assert source.num_examples('test') == 2
  assert [(e.id, e.label) for e in source.iter_examples('test')] == [('txt/k1', 1), ('txt/k2', 0)]


# --------------------------------------------------------------------------
# WebDataset
# --------------------------------------------------------------------------


def _tar(path, members):
  with tarfile.open(path, 'w') as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
  d = tmp_path / 'shards'
  d.mkdir()
  for s in range(2):
    members = []
    for i in range(3 * s, 3 * s + 3):
      cls = i % 3
      members += [(f'{i:04d}.jpg', _image(COLORS[NAMES[cls]], 'JPEG')),
                  (f'{i:04d}.cls', str(cls).encode()),
                  (f'{i:04d}.json', json.dumps({'name': NAMES[cls]}).encode())]
    if s == 0:
      members += [('a/nolabel.png', _image((1, 2, 3))), ('noimage.cls', b'1'),
                  ('badcls.webp', _image((5, 5, 5), 'WEBP')), ('badcls.cls', b'cat')]
    _tar(d / f'{s:05d}.tar', members)
  _tar(d / 'test-00000.tar', [('x.jpeg', _image(COLORS['owl'], 'JPEG')), ('x.cls', b'2'),
                              ('x.json', b'{"name": "owl"}')])
  return d


def test_wds_end_to_end(shards, tmp_path):
  spec = f'wds:train={shards}/{{00000..00001}}.tar;test={shards}/test-00000.tar'
  out = str(tmp_path / 'out')
  summary = _run(f'--dataset={spec}', f'--output_dir={out}')
  assert summary['counts']['train'] == {'read': 9, 'written': 6, 'dead_lettered': 3}
  assert _dead(out, 'train') == {
      '00000/a/nolabel': 'no label member (.cls, .txt, or .json with --label_field)',
      '00000/noimage': 'no image member (.jpg/.jpeg/.png/.webp); has .cls',
      '00000/badcls': ".cls is not an integer: 'cat'"}
  assert _written(out, 'train') == {f'{s:05d}/{i:04d}': i % 3
                                    for s in range(2) for i in range(3 * s, 3 * s + 3)}
  assert _written(out, 'test') == {'test-00000/x': 2}
  assert embeddings.read_metadata(out)['source']['class_names'] == ['0', '1', '2']
  source = open_source(spec)
  assert _usable(source, 'train') == _written(out, 'train')
  assert _check_reader(source, 'train') == 9


def test_wds_with_class_names_makes_one_output_shard_per_input_shard(shards, tmp_path):
  """Nothing scanned up front (count unknown): the output is not squeezed into one shard."""
  names = tmp_path / 'names.txt'
  names.write_text('0\n1\n2\n')
  spec = f'wds:train={shards}/{{00000..00001}}.tar;test={shards}/test-00000.tar'
  assert open_source(spec, class_names=str(names)).num_examples('train') is None
  out = str(tmp_path / 'out')
  summary = _run(f'--dataset={spec}', f'--output_dir={out}', f'--class_names={names}')
  assert summary['counts']['train'] == {'read': 9, 'written': 6, 'dead_lettered': 3}
  shard_files = [f for f in os.listdir(out) if '-train.array_record-' in f]
  assert len(shard_files) == 2 and _written(out, 'train') == {
      f'{s:05d}/{i:04d}': i % 3 for s in range(2) for i in range(3 * s, 3 * s + 3)}


def test_wds_label_field_split_by_name_and_bad_shard(shards, tmp_path):
  (shards / 'train-99999.tar').write_bytes(b'this is no tar file')
  spec = f'wds:{shards}/{{{{00000..00001}},train-99999,train-77777,test-00000}}.tar'
  source = open_source(spec, label_field='name', default_split='train')
  assert source.class_names == NAMES and source.splits == ['test', 'train']
  # An unreadable or missing shard counts as one input.
  assert _check_reader(source, 'train') == 11
  inputs = {i[0] if isinstance(i, tuple) else i.id: i for i in source.inputs('train')}
  assert inputs['train-99999'][1].startswith('cannot read shard: ReadError')
  assert inputs['train-77777'][1] == f'missing shard: {shards}/train-77777.tar'
  # With --label_field the label comes from .json only (a .cls beside it is not used).
  assert inputs['00000/badcls'][1] == "no label: no .json member (--label_field=name)"
  assert inputs['00000/0001'].label == NAMES.index('dog')
  out = str(tmp_path / 'out')
  _run(f'--dataset={spec}', '--label_field=name', f'--output_dir={out}', '--splits=test')
  assert _written(out, 'test') == {'test-00000/x': 2}
  with pytest.raises(UserError, match='per-split patterns'):
    open_source(f'wds:train={shards}/00000.tar;oops')


def test_brace_expansion_and_keys():
  assert paths.brace_expand('s/{000..002}.tar') == ['s/000.tar', 's/001.tar', 's/002.tar']
  assert paths.brace_expand('{a,b}-{1..2}') == ['a-1', 'a-2', 'b-1', 'b-2']
  assert webdataset.member_key('dir/0001.seg.png') == ('dir/0001', 'seg.png')


# --------------------------------------------------------------------------
# Multi-processing, non-local filesystems, reruns
# --------------------------------------------------------------------------


def test_multi_processing_and_reruns_are_identical(shards, tmp_path):
  spec = f'wds:{shards}/{{00000..00001}}.tar'
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  _run(f'--dataset={spec}', f'--output_dir={a}', '--splits=train')
  summary = _run(f'--dataset={spec}', f'--output_dir={b}', '--splits=train',
                 '--direct_running_mode=multi_processing', '--direct_num_workers=1')
  assert summary['counts']['train']['written'] == 6
  for name in sorted(os.listdir(a)):
    if '.array_record-' in name or name.startswith('dead_letters'):
      assert open(os.path.join(a, name), 'rb').read() == open(os.path.join(b, name), 'rb').read()


class FakeRemoteFileSystem(FakeFileSystem):
  """test_embed's fake scheme, plus metadata() of one path (ReadFromText matches the file)."""

  PREFIX = 'fakeremote://'

  @classmethod
  def scheme(cls):
    return 'fakeremote'

  def metadata(self, path):
    m = super().metadata(self._local(path))
    return FileMetadata(path, m.size_in_bytes, m.last_updated_in_seconds)


def test_sources_on_a_non_local_filesystem(vertex_manifest, shards, tmp_path):
  manifest, _ = vertex_manifest
  FakeRemoteFileSystem.ROOT = str(tmp_path)
  remote = f'fakeremote://{os.path.relpath(manifest, tmp_path)}'
  summary = _run(f'--dataset=csv:{remote}', '--output_dir=fakeremote://emb_csv')
  assert summary['counts']['test']['written'] == 2
  assert _dead(str(tmp_path / 'emb_csv'), 'train')['imgs/missing.png'] == (
      'missing file: fakeremote://data/imgs/missing.png')
  summary = _run('--dataset=wds:fakeremote://shards/{00000..00001}.tar', '--splits=train',
                 '--output_dir=fakeremote://emb_wds')
  assert summary['counts']['train']['written'] == 6
  assert '00000/0000' in _written(str(tmp_path / 'emb_wds'), 'train')
  (tmp_path / 'pq').mkdir()
  pq.write_table(pa.table({'image': [_image(COLORS['cat']), b'', _image(COLORS['dog'])],
                           'label': [0, 1, 1]}), tmp_path / 'pq' / 'part.parquet')
  summary = _run('--dataset=parquet:fakeremote://pq/*.parquet', '--splits=train',
                 '--output_dir=fakeremote://emb_pq')
  assert summary['counts']['train'] == {'read': 3, 'written': 2, 'dead_lettered': 1}
  assert _written(str(tmp_path / 'emb_pq'), 'train') == {'part.parquet/0': 0,
                                                         'part.parquet/2': 1}
