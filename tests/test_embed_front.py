"""A folder read in chunks (pipelines.reads.read_chunks): the same dataset whatever the chunk
size, every bad file one dead letter."""

import json
import os

import apache_beam as beam
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines import embed, reads
from clip_transfer.data import folder, paths
from clip_transfer.data.sources import open_source

MODEL = 'random:tiny'
BAD = {'train/cat/corrupt.png': 'cannot decode image', 'train/dog/empty.png': 'empty file',
       'train/stray.png': 'not in a class folder', 'train/cat/broken.png': 'broken symlink'}


@pytest.fixture
def mixed_folder(tmp_path, cat_dog_folder):
  """train: 14 images and 4 bad files among them (one of each kind); test: 4 images."""
  root = cat_dog_folder(tmp_path / 'data', train=7, test=2)
  for rel, data in (('train/cat/corrupt.png', b'garbage'), ('train/dog/empty.png', b''),
                    ('train/stray.png', b'x')):
    with open(os.path.join(root, rel), 'wb') as fh:
      fh.write(data)
  os.symlink(os.path.join(root, 'nowhere.png'), os.path.join(root, 'train/cat/broken.png'))
  return root


def _files(path):
  return {f: open(os.path.join(path, f), 'rb').read()
          for f in sorted(os.listdir(path)) if f != 'run.json'}  # run.json: wall times


def test_chunks_split_the_listing_and_found_counts_it(mixed_folder, monkeypatch):
  monkeypatch.setattr(reads, 'MIN_CHUNKS', 1)
  monkeypatch.setattr(reads, 'CHUNK', 4)
  source = open_source(f'folder:{mixed_folder}')
  listed = folder.list_split(source.root, 'train')
  assert len(listed) == 18
  with test_pipeline.TestPipeline(runner='FnApiRunner') as p:
    chunks = reads.read_chunks(p, source, 'train')
    assert_that(chunks.parts | 'Sizes' >> beam.Map(len), equal_to([4, 4, 4, 4, 2]),
                label='Sizes')
    assert_that(chunks.parts | 'Ids' >> beam.FlatMap(lambda c: [e.id for e in c]),
                equal_to([e.id for e in listed]), label='Ids')
    assert_that(chunks.found | beam.CombineGlobally(sum), equal_to([18]), label='Found')
  # Sources whose parts already hold many inputs are not chunked.
  assert reads.read_chunks(beam.Pipeline(), open_source('digits'), 'train') is None


def test_chunked_keeps_small_splits_spread():
  assert {len(c) for c in reads.chunked(list(range(4000)))} == {reads.CHUNK}
  assert len(reads.chunked(list(range(100)))) == 100  # < MIN_CHUNKS * 2 files: one per chunk
  assert reads.chunked([]) == []


def test_chunk_size_and_threads_change_no_byte(mixed_folder, tmp_path, monkeypatch):
  monkeypatch.setattr(reads, 'MIN_CHUNKS', 1)
  outs = []
  # One file per chunk read inline, then 4 per chunk on the pool (a bad file beside good ones).
  for chunk, threads in ((1, 1), (4, 0)):
    monkeypatch.setattr(reads, 'CHUNK', chunk)
    outs.append(str(tmp_path / f'out{chunk}'))
    summary = embed.run([f'--model={MODEL}', f'--dataset=folder:{mixed_folder}',
                         f'--output_dir={outs[-1]}', '--batch_size=4',
                         f'--preprocess_threads={threads}'])
    assert summary['counts'] == {'train': {'read': 18, 'written': 14, 'dead_lettered': 4},
                                 'test': {'read': 4, 'written': 4, 'dead_lettered': 0}}
  assert _files(outs[0]) == _files(outs[1])
  with open(os.path.join(outs[1], 'dead_letters.train.jsonl')) as fh:
    rows = [json.loads(line) for line in fh]
  assert sorted(r['id'] for r in rows) == sorted(BAD)  # each once
  for r in rows:
    assert BAD[r['id']] in r['reason'], r


def test_a_file_that_grew_after_its_stat_is_read_whole_and_still_bounded(tmp_path,
                                                                        monkeypatch):
  # read_input reads st_size + 1 bytes (not MAX_FILE_BYTES + 1: read(n) allocates n).
  path = tmp_path / 'a.png'
  path.write_bytes(bytes(range(100)))
  real_stat = os.stat

  def stale_stat(p, *args, **kwargs):  # the size seen before the file grew
    st = real_stat(p, *args, **kwargs)
    return os.stat_result(tuple(st)[:6] + (40,) + tuple(st)[7:10])
  monkeypatch.setattr(paths.os, 'stat', stale_stat)
  assert paths.read_input(str(path), 'a') == bytes(range(100))
  monkeypatch.setattr(paths, 'MAX_FILE_BYTES', 60)
  dead = paths.read_input(str(path), 'a')
  assert dead.id == 'a' and dead.reason == 'file too large: over 60 bytes'
