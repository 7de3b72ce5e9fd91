"""The embed stage's speed paths: parallel preprocessing, fast decode, bfloat16 (issue 12)."""

import io
import json
import os
import threading
import time

import jax
import numpy as np
import pytest
from PIL import Image

from pipelines import embed
from clip_transfer import models
from clip_transfer.data import embeddings
from clip_transfer.data import preprocess

pytestmark = pytest.mark.usefixtures('xla_cache')

MODEL = 'random:tiny'  # 32x32 input
FORWARD = 'clip_vision_forward'


def _jpeg(rng, h, w) -> bytes:
  # Smooth content (a photo-like gradient plus mild noise), so draft and exact decode agree closely.
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1)
  pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format='JPEG', quality=90)
  return buf.getvalue()


@pytest.fixture(scope='module')
def jpeg_folder(tmp_path_factory):
  """root/<split>/<class>/*.jpg: 14 JPEGs of mixed sizes (some 4x the model's input) + 1 corrupt."""
  root = tmp_path_factory.mktemp('jpegs')
  rng = np.random.default_rng(0)
  for i in range(14):
    split = 'test' if i % 4 == 0 else 'train'
    d = root / split / f'c{i % 2}'
    d.mkdir(parents=True, exist_ok=True)
    (d / f'{i:03d}.jpg').write_bytes(_jpeg(rng, 96 + 16 * (i % 3), 128 + 8 * i))
  (root / 'train' / 'c0' / 'broken.jpg').write_bytes(b'\xff\xd8\xff not really a jpeg' * 4)
  return str(root)


def _run(root, out, *argv):
  return embed.run([f'--model={MODEL}', f'--dataset=folder:{root}', f'--output_dir={out}',
                    '--batch_size=4', *argv])


def _files(path):
  """Every file of the dataset (shards, metadata, dead letters) except run.json (the run's cost)."""
  return {f: open(os.path.join(path, f), 'rb').read()
          for f in sorted(os.listdir(path)) if f != 'run.json'}


def test_parallel_path_writes_the_serial_paths_bytes(jpeg_folder, tmp_path, count_compiles):
  serial, parallel, again = (str(tmp_path / n) for n in ('serial', 'parallel', 'again'))
  s = _run(jpeg_folder, serial, '--preprocess_threads=1')
  with count_compiles(FORWARD) as compiles:
    p = _run(jpeg_folder, parallel, '--preprocess_threads=4')
  assert compiles.count == 1  # the pool changes nothing on the device side
  _run(jpeg_folder, again, '--preprocess_threads=4')
  assert s['counts'] == p['counts'] == {
      'train': {'read': 11, 'written': 10, 'dead_lettered': 1},
      'test': {'read': 4, 'written': 4, 'dead_lettered': 0}}
  # Images travel in stacked batches: RunInference counts batches (train 4+4+2, test 4).
  assert s['inference']['num_images'] == p['inference']['num_images'] == 14
  assert s['inference']['num_inferences'] == p['inference']['num_inferences'] == 4
  files = _files(serial)
  assert sum('.array_record-' in f for f in files) == 2
  assert files == _files(parallel) == _files(again)  # shards, dead letters and metadata
  dead = [json.loads(l) for l in open(os.path.join(parallel, 'dead_letters.train.jsonl'))]
  assert [d['id'] for d in dead] == ['train/c0/broken.jpg']
  assert dead[0]['reason'].startswith('ImageError: cannot decode image')
  meta = embeddings.read_metadata(serial)
  assert 'fast_decode' not in meta['preprocessing']  # the default path: CLIPImageProcessor's
  assert meta['model']['compute_dtype'] == 'float32'


def test_multi_processing_with_the_pool(jpeg_folder, tmp_path, count_compiles):
  """Workers in other processes unpickle the DoFn and build their own pool, as on Dataflow."""
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  _run(jpeg_folder, a, '--preprocess_threads=1', '--splits=train')
  with count_compiles(FORWARD) as compiles:
    summary = _run(jpeg_folder, b, '--preprocess_threads=2', '--splits=train',
                   '--direct_running_mode=multi_processing', '--direct_num_workers=1')
  assert compiles.count == 0  # inference ran in the worker
  assert summary['counts']['train'] == {'read': 11, 'written': 10, 'dead_lettered': 1}
  xa, _, ia = embeddings.read_split(a, 'train')
  xb, _, ib = embeddings.read_split(b, 'train')
  assert ia == ib
  np.testing.assert_allclose(xa, xb, atol=1e-5)


def test_fast_decode_and_bfloat16_are_recorded_and_close(jpeg_folder, tmp_path):
  exact, fast, bf16 = (str(tmp_path / n) for n in ('exact', 'fast', 'bf16'))
  _run(jpeg_folder, exact, '--splits=train')
  _run(jpeg_folder, fast, '--splits=train', '--fast_decode')
  _run(jpeg_folder, bf16, '--splits=train', '--dtype=bfloat16')
  assert embeddings.read_metadata(fast)['preprocessing']['fast_decode'] is True
  assert embeddings.read_metadata(bf16)['model']['compute_dtype'] == 'bfloat16'
  # Same weights either way: the checksum is of the float32 params.
  assert (embeddings.read_metadata(bf16)['model']['weights_sha256']
          == embeddings.read_metadata(exact)['model']['weights_sha256'])
  x, _, ids = embeddings.read_split(exact, 'train')
  for other in (fast, bf16):
    y, _, other_ids = embeddings.read_split(other, 'train')
    assert other_ids == ids and y.dtype == np.float32
    assert not np.array_equal(x, y)  # a different path …
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert cos.min() > 0.98, (other, cos)  # … to nearly the same embeddings


def test_bfloat16_load_keeps_float32_params():
  pre = models.load(MODEL, 'bfloat16')
  assert pre.module.dtype == jax.numpy.bfloat16
  dtypes = {a.dtype for a in jax.tree_util.tree_leaves(pre.variables)}
  assert dtypes == {np.dtype('float32')}


@pytest.mark.parametrize('flag, message', [
    ('--dtype=float16', '--dtype must be one of float32, bfloat16'),
    ('--preprocess_threads=-1', '--preprocess_threads must be >= 0'),
])
def test_refused_values_give_one_line(flag, message, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    embed.main([f'--model={MODEL}', '--dataset=digits', f'--output_dir={tmp_path}/o', flag])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err
  assert not os.path.exists(f'{tmp_path}/o')


# --------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------


def test_parallel_prepare_keeps_order_errors_and_window(monkeypatch):
  cfg = preprocess.PreprocessConfig.for_image_size(8)
  in_flight, most = [0], [0]
  lock = threading.Lock()
  real = preprocess.prepare

  def slow_prepare(image, cfg):
    with lock:
      in_flight[0] += 1
      most[0] = max(most[0], in_flight[0])
    time.sleep(0.002 * (image[0, 0, 0] % 3))  # finish out of order
    try:
      return real(image, cfg)
    finally:
      with lock:
        in_flight[0] -= 1

  monkeypatch.setattr(preprocess, 'prepare', slow_prepare)
  images = [np.full((10, 12, 3), i, np.uint8) for i in range(40)]
  images[7] = np.zeros((4, 4, 2), np.uint8)  # not an image: prepare raises
  par = preprocess.ParallelPrepare(cfg, threads=4, window=5)
  got = []
  for i, im in enumerate(images):
    got.extend(par.put(i, im))
    assert len(par._pending) <= 5  # pylint: disable=protected-access  (bounded memory)
  got.extend(par.drain())
  serial = preprocess.ParallelPrepare(cfg, threads=1, window=5)
  want = [r for i, im in enumerate(images) for r in serial.put(i, im)]
  assert [t for t, _ in got] == list(range(40)) == [t for t, _ in want]
  assert isinstance(got[7][1], preprocess.ImageError) and str(got[7][1]) == str(want[7][1])
  for (_, a), (_, b) in zip(got, want):
    if not isinstance(a, Exception):
      assert a.tobytes() == b.tobytes()
  assert most[0] > 1  # it did run in parallel


def test_fast_decode_drafts_jpegs_only():
  rng = np.random.default_rng(1)
  cfg = preprocess.PreprocessConfig(size=64, crop_size=(64, 64))
  fast = preprocess.PreprocessConfig(size=64, crop_size=(64, 64), fast_decode=True)
  big = _jpeg(rng, 512, 384)  # resized to 85x64 (h x w): 1/4 scale still covers it, 1/8 not
  with Image.open(io.BytesIO(big)) as im:
    im.draft('RGB', (64, 85))
    assert im.size == (96, 128)
  a, b = preprocess.prepare(big, cfg), preprocess.prepare(big, fast)
  assert a.shape == b.shape == (64, 64, 3)
  assert np.abs(a.astype(int) - b.astype(int)).mean() < 3
  png = io.BytesIO()
  Image.fromarray(preprocess.decode(big)).save(png, format='PNG')
  assert preprocess.prepare(png.getvalue(), cfg).tobytes() == preprocess.prepare(
      png.getvalue(), fast).tobytes()
  assert preprocess.PreprocessConfig.from_json(fast.to_json()) == fast
  assert 'fast_decode' not in cfg.to_json()


def test_batched_handler_pads_and_equals_the_per_image_handler(count_compiles):
  from pipelines import jax_handler
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
  per_image = jax_handler.ClipVisionModelHandler(MODEL, batch_size=4)
  batched = jax_handler.ClipVisionModelHandler(MODEL, batch_size=4, batched=True)
  model = batched.load_model()  # the same model either way: only the element shape differs
  with count_compiles(FORWARD) as compiles:
    want = per_image.run_inference(list(images), model)
    got = batched.run_inference([images[:4], images[4:]], model)  # 4, then 3 padded to 4
  assert compiles.count == 1
  assert [r.inference[0].shape for r in got] == [(4, 64), (3, 64)]
  rows = np.concatenate([r.inference[0] for r in got])
  np.testing.assert_array_equal(rows, np.stack([r.inference[0] for r in want]))
  assert batched.batch_elements_kwargs() == {'min_batch_size': 1, 'max_batch_size': 1}
