"""pipelines.embed end to end: digits, image folders with bad files, TFDS, filesystems."""

import io
import json
import os
import struct
import zlib

import apache_beam as beam
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.localfilesystem import LocalFileSystem
from PIL import Image

from pipelines import embed, jax_handler
from clip_transfer import models
from clip_transfer.data import embeddings
from clip_transfer.data import preprocess
from clip_transfer.errors import UserError
from clip_transfer.data.sources import open_source

MODEL = 'random:tiny'


def _run(*argv):
  return embed.run([f'--model={MODEL}', *argv])


def _shards(path):
  return {f: open(os.path.join(path, f), 'rb').read()
          for f in sorted(os.listdir(path)) if '.array_record-' in f}


FORWARD = 'clip_vision_forward'  # the jitted function in pipelines.jax_handler


@pytest.fixture(scope='module')
def digits_run(tiny_digits_embeddings):
  """(output dir, summary, compiles of FORWARD): digits at batch 64, once per session (conftest)."""
  return tiny_digits_embeddings


def test_digits_end_to_end(digits_run):
  out, summary, compilations = digits_run
  assert compilations == 1  # fixed batch shape + padding: no recompiles
  assert summary['counts'] == {
      'train': {'read': 1437, 'written': 1437, 'dead_lettered': 0},
      'test': {'read': 360, 'written': 360, 'dead_lettered': 0}}
  assert summary['inference']['num_images'] == 1797  # the handler's counter
  assert summary['inference']['num_inferences'] == 23 + 6  # RunInference's: batches of 64
  builder = tfds.builder_from_directory(out)
  f = builder.info.features
  assert f['embedding'].shape == (64,) and f['embedding'].dtype == np.float32
  assert f['label'].names == [str(d) for d in range(10)]
  data = builder.as_data_source()
  assert {s: len(d) for s, d in data.items()} == {'train': 1437, 'test': 360}
  row = data['test'][0]
  assert row['embedding'].dtype == np.float32 and row['embedding'].shape == (64,)
  x, y, ids = embeddings.read_split(out, 'train')
  assert x.shape == (1437, 64) and len(set(ids)) == 1437 and np.isfinite(x).all()
  assert np.bincount(y, minlength=10).min() > 100
  meta = embeddings.read_metadata(out)
  assert meta['model']['name'] == MODEL and len(meta['model']['weights_sha256']) == 64
  assert meta['source']['name'] == 'digits' and meta['preprocessing']['size'] == 32
  assert meta['code_version'] == '0.1.0'
  assert open(os.path.join(out, 'dead_letters.test.jsonl')).read() == ''


def test_embeddings_equal_the_backbone_applied_directly(digits_run, digits_data_dir):
  out, _, _ = digits_run
  x, _, ids = embeddings.read_split(out, 'test')
  got = dict(zip(ids, x))
  pre = models.load(MODEL)
  exs = list(open_source('digits', digits_data_dir).iter_examples('test'))[:50]
  pixels = preprocess.prepare_batch([e.image for e in exs], pre.preprocess)
  # The whole CLIP module (no bind/unbind), float32 input normalised outside jit.
  apply = jax.jit(lambda v, x: pre.module.apply(
      v, x, method=lambda m, x: m.vision_model(x).pooler_output))
  want = apply(pre.variables, np.asarray(preprocess.normalize(pixels, pre.preprocess)))
  # Another batch size and composition: float32 rounding only (outputs are O(1)).
  np.testing.assert_allclose(np.stack([got[e.id] for e in exs]), np.asarray(want),
                             atol=1e-5, rtol=1e-5)


def test_two_runs_write_identical_bytes(digits_run, digits_data_dir, tmp_path):
  out, _, _ = digits_run
  again = str(tmp_path / 'again')
  _run('--dataset=digits', f'--data_dir={digits_data_dir}', f'--output_dir={again}',
       '--batch_size=64')
  first, second = _shards(out), _shards(again)
  assert len(first) == 2 and first == second
  for name in ('metadata.json', 'features.json'):
    assert open(os.path.join(out, name)).read() == open(os.path.join(again, name)).read()


def test_existing_output_is_refused_and_bad_split_exits_2(digits_run, digits_data_dir):
  out, _, _ = digits_run
  args = [f'--model={MODEL}', '--dataset=digits', f'--data_dir={digits_data_dir}',
          f'--output_dir={out}', '--splits=test']
  with pytest.raises(UserError, match='already holds an embedding dataset; pass --overwrite'):
    embed.run(args)
  with pytest.raises(SystemExit) as e:  # the CLI: one line, exit 2
    embed.main(args)
  assert e.value.code == 2
  with pytest.raises(SystemExit) as e:
    embed.main([f'--model={MODEL}', '--dataset=digits', f'--output_dir={out}x',
                f'--data_dir={digits_data_dir}', '--splits=val'])
  assert e.value.code == 2 and not os.path.exists(f'{out}x')  # refused before any write


# --------------------------------------------------------------------------
# Image folders, dead letters, multi-processing, non-local filesystems
# --------------------------------------------------------------------------


def _png(mode, size, color) -> bytes:
  buf = io.BytesIO()
  Image.new(mode, size, color).save(buf, format='PNG')
  return buf.getvalue()


def _huge_png() -> bytes:
  """A PNG header claiming 30000x30000 pixels (tiny file; decoding must refuse it)."""
  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack(
        '>I', zlib.crc32(kind + data) & 0xffffffff)
  ihdr = struct.pack('>IIBBBBB', 30000, 30000, 8, 2, 0, 0, 0)
  return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'')) + chunk(
      b'IEND', b'')


@pytest.fixture
def image_folder(tmp_path):
  root = tmp_path / 'images'
  good = {
      'train/cat/rgb.png': _png('RGB', (40, 30), (200, 10, 10)),
      'train/cat/gray.png': _png('L', (16, 50), 90),
      'train/dog/rgba.png': _png('RGBA', (33, 33), (0, 0, 255, 100)),
      'train/dog/palette.png': _png('P', (20, 20), 3),
      'test/cat/a.png': _png('RGB', (8, 8), (1, 2, 3)),
      'test/dog/b.png': _png('RGB', (64, 64), (9, 9, 9)),
  }
  bad = {
      'train/cat/corrupt.jpg': b'this is not a jpeg' * 10,
      'train/dog/empty.png': b'',
      'train/dog/huge.png': _huge_png(),
  }
  for rel, data in {**good, **bad}.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
  return root, good, bad


def test_folder_dead_letters(image_folder, tmp_path):
  root, good, bad = image_folder
  out = str(tmp_path / 'out')
  summary = _run(f'--dataset=folder:{root}', f'--output_dir={out}', '--batch_size=4')
  assert summary['counts']['train'] == {'read': 7, 'written': 4, 'dead_lettered': 3}
  assert summary['counts']['test'] == {'read': 2, 'written': 2, 'dead_lettered': 0}
  dead = [json.loads(l) for l in open(os.path.join(out, 'dead_letters.train.jsonl'))]
  reasons = {d['id']: d['reason'] for d in dead}
  assert sorted(reasons) == sorted(k for k in bad)
  assert 'empty file' in reasons['train/dog/empty.png']
  assert 'cannot decode' in reasons['train/cat/corrupt.jpg']
  assert 'too large' in reasons['train/dog/huge.png']
  _, y, ids = embeddings.read_split(out, 'train')
  assert sorted(ids) == sorted(k for k in good if k.startswith('train/'))
  assert dict(zip(ids, y.tolist()))['train/dog/rgba.png'] == 1
  assert embeddings.read_metadata(out)['source']['class_names'] == ['cat', 'dog']


def test_multi_processing_matches_in_process(image_folder, tmp_path, count_compiles):
  """Workers in other processes unpickle every DoFn, as on Dataflow."""
  root, _, _ = image_folder
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  _run(f'--dataset=folder:{root}', f'--output_dir={a}', '--batch_size=4')
  with count_compiles(FORWARD) as compiles:
    # One worker keeps the test cheap; it is still another process.
    summary = _run(f'--dataset=folder:{root}', f'--output_dir={b}', '--batch_size=4',
                   '--direct_running_mode=multi_processing', '--direct_num_workers=1')
  assert compiles.count == 0  # inference ran elsewhere
  assert summary['counts']['train']['written'] == 4
  xa, _, ia = embeddings.read_split(a, 'train')
  xb, _, ib = embeddings.read_split(b, 'train')
  assert ia == ib
  np.testing.assert_allclose(xa, xb, atol=1e-5)


def test_pipeline_serialises_with_to_runner_api(image_folder, tmp_path):
  root, _, _ = image_folder
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner

  args, _ = embed.parse_args([f'--dataset=folder:{root}', f'--model={MODEL}',
                              f'--output_dir={tmp_path}/o'])
  p = beam.Pipeline(runner=FnApiRunner())
  embed.build(p, args, open_source(args.dataset), models.load(MODEL))
  proto = p.to_runner_api()
  labels = {t.unique_name for t in proto.components.transforms.values()}
  for want in ('RunInference', 'Encode', 'GroupShards', 'WriteShard', 'Finalize',
               'Read[train]', 'Preprocess[test]'):
    assert want in labels
  # Every DoFn round-trips through the proto (pickled), as a runner would load it.
  beam.Pipeline.from_runner_api(proto, FnApiRunner(), beam.options.pipeline_options.PipelineOptions())


class FakeFileSystem(LocalFileSystem):
  """fakefs://… kept under a local root: a non-local scheme for the sink to write to."""

  ROOT = None
  PREFIX = 'fakefs://'
  writes = []

  @classmethod
  def scheme(cls):
    return 'fakefs'

  def _local(self, path):
    if not path.startswith(self.PREFIX):  # already translated (base-class internals)
      return path
    return os.path.join(self.ROOT, path[len(self.PREFIX):])

  def join(self, base, *paths):
    return '/'.join([base.rstrip('/'), *paths])

  def create(self, path, *args, **kwargs):
    self.writes.append(path)
    return super().create(self._local(path), *args, **kwargs)

  def open(self, path, *args, **kwargs):
    return super().open(self._local(path), *args, **kwargs)

  def exists(self, path):
    return super().exists(self._local(path))

  def delete(self, paths):
    return super().delete([self._local(p) for p in paths])

  def _list(self, dir_or_prefix):
    for m in super()._list(self._local(dir_or_prefix)):
      yield FileMetadata(self.PREFIX + os.path.relpath(m.path, self.ROOT), m.size_in_bytes,
                         m.last_updated_in_seconds)


def test_sink_writes_through_beam_filesystems(image_folder, tmp_path):
  root, _, _ = image_folder
  FakeFileSystem.ROOT = str(tmp_path / 'bucket')
  FakeFileSystem.writes.clear()
  _run(f'--dataset=folder:{root}', '--output_dir=fakefs://emb', '--batch_size=4', '--splits=test')
  written = {os.path.basename(p) for p in FakeFileSystem.writes}
  # The dataset's own files end with dataset_info.json; run.json (the run's cost) follows it.
  assert [os.path.basename(p) for p in FakeFileSystem.writes[-2:]] == ['dataset_info.json',
                                                                      'run.json']
  assert 'clip_embeddings-test.array_record-00000-of-00001' in written
  _, _, ids = embeddings.read_split(str(tmp_path / 'bucket' / 'emb'), 'test')
  assert sorted(ids) == ['test/cat/a.png', 'test/dog/b.png']
  with pytest.raises(UserError, match='already holds'):
    _run(f'--dataset=folder:{root}', '--output_dir=fakefs://emb', '--splits=test')
  FakeFileSystem.writes.clear()
  _run(f'--dataset=folder:{root}', '--output_dir=fakefs://emb', '--splits=test', '--overwrite')
  assert [os.path.basename(p) for p in FakeFileSystem.writes[-2:]] == ['dataset_info.json',
                                                                      'run.json']


def test_tfds_source_with_mock_data(tmp_path):
  out = str(tmp_path / 'mnist')
  with tfds.testing.mock_data(num_examples=20):
    summary = _run('--dataset=mnist', '--splits=train', f'--output_dir={out}', '--batch_size=8',
                   '--projected')
  assert summary['counts'] == {'train': {'read': 20, 'written': 20, 'dead_lettered': 0}}
  x, y, ids = embeddings.read_split(out, 'train')
  assert x.shape == (20, 64) and sorted(ids) == sorted(f'mnist/train/{i}' for i in range(20))
  assert embeddings.read_metadata(out)['source']['name'] == 'mnist'
  row = tfds.builder_from_directory(out).as_data_source('train')[0]
  assert row['projected'].shape == (32,) and row['projected'].dtype == np.float32


def test_handler_pads_to_one_shape(count_compiles):
  handler = jax_handler.ClipVisionModelHandler(MODEL, batch_size=4)
  model = handler.load_model()
  images = [np.full((32, 32, 3), i * 20, np.uint8) for i in range(7)]
  with count_compiles(FORWARD) as compiles:
    seven = handler.run_inference(images, model)  # 4 + 3 (padded)
    three = handler.run_inference(images[:3], model)
  assert compiles.count == 1
  assert len(seven) == 7 and seven[0].inference[0].shape == (64,)
  for a, b in zip(seven[:3], three):
    np.testing.assert_allclose(a.inference[0], b.inference[0], atol=1e-6)
  assert handler.batch_elements_kwargs() == {'min_batch_size': 4, 'max_batch_size': 4}
