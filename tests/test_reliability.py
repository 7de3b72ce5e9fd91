"""Issue 13 through the real embed CLI: nothing lost, nothing deleted, one line per failure."""

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from pipelines import embed
from clip_transfer import models
from clip_transfer.data import embeddings
from clip_transfer.data import folder
from clip_transfer import outputs
from clip_transfer.data import sources
from clip_transfer.errors import UserError

MODEL = 'random:tiny'
ROOT_USER = hasattr(os, 'geteuid') and os.geteuid() == 0  # permissions do not stop root


def _png(color=(200, 10, 10), size=(8, 8)) -> bytes:
  buf = io.BytesIO()
  Image.new('RGB', size, color).save(buf, format='PNG')
  return buf.getvalue()


def _write(root, rel, data=None):
  path = root / rel
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(_png() if data is None else data)
  return path


def _cli(capsys, *argv):
  """Runs the embed CLI; returns (exit code, stderr lines)."""
  with pytest.raises(SystemExit) as e:
    embed.main([f'--model={MODEL}', *argv])
  return e.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def small_folder(tmp_path):
  root = tmp_path / 'images'
  for rel in ('test/cat/a.png', 'test/dog/b.png'):
    _write(root, rel)
  return root


@pytest.fixture
def no_model_load(monkeypatch):
  """Fails the test if the model is loaded (the refusal must come first)."""
  def boom(*_, **__):
    raise AssertionError('the model was loaded before the refusal')
  monkeypatch.setattr(embed.models, 'load', boom)


# --------------------------------------------------------------------------
# 1. --overwrite removes only what this tool wrote
# --------------------------------------------------------------------------


def test_overwrite_never_removes_foreign_files(small_folder, tmp_path, capsys, no_model_load):
  victim = tmp_path / 'victim'
  _write(victim, 'thesis.tex', b'precious')
  _write(victim, '.hidden', b'also precious')
  code, err = _cli(capsys, f'--dataset=folder:{small_folder}', f'--output_dir={victim}',
                   '--splits=test', '--overwrite')
  assert code == 2 and len(err) == 1
  assert '.hidden' in err[0] and 'did not write' in err[0] and '--overwrite' not in err[0]
  assert sorted(os.listdir(victim)) == ['.hidden', 'thesis.tex']
  # Pointed at the input folder, nothing goes either.
  code, err = _cli(capsys, f'--dataset=folder:{small_folder}',
                   f'--output_dir={small_folder}', '--splits=test', '--overwrite')
  assert code == 2 and len(err) == 1 and 'test/cat/a.png' in err[0]
  assert (small_folder / 'test/cat/a.png').exists()


def test_overwrite_replaces_our_own_run_but_not_a_planted_file(small_folder, tmp_path, capsys):
  out = tmp_path / 'out'
  args = [f'--model={MODEL}', f'--dataset=folder:{small_folder}', f'--output_dir={out}',
          '--splits=test']
  embed.run(args)
  assert (out / outputs.MARKER).exists()
  embed.run(args + ['--overwrite'])  # only our files: replaced
  assert embeddings.read_metadata(str(out))['counts']['test']['written'] == 2
  (out / 'notes.txt').write_text('mine')
  code, err = _cli(capsys, *args[1:], '--overwrite')
  assert code == 2 and len(err) == 1 and 'notes.txt' in err[0]
  assert (out / 'notes.txt').read_text() == 'mine' and embeddings.is_complete(str(out))


def test_helper_on_a_beam_filesystem_and_nested_owned_files(tmp_path):
  """The helper the probe/fine-tune/report stages use: patterns may name sub-folders."""
  out = str(tmp_path / 'run')
  owned = ('metrics.json', 'checkpoints/*')
  outputs.prepare_output_dir(out, False, 'probe run', owned, complete='metrics.json')
  _write(tmp_path, 'run/metrics.json', b'{}')
  _write(tmp_path, 'run/checkpoints/1/state', b'x')
  with pytest.raises(UserError, match='already holds a probe run; pass --overwrite'):
    outputs.prepare_output_dir(out, False, 'probe run', owned, complete='metrics.json')
  outputs.prepare_output_dir(out, True, 'probe run', owned, complete='metrics.json')
  assert os.listdir(out) == [outputs.MARKER]


# --------------------------------------------------------------------------
# 5. one line, exit 2, before the model loads or the pipeline starts
# --------------------------------------------------------------------------


def test_output_path_is_a_file(small_folder, tmp_path, capsys, no_model_load):
  target = _write(tmp_path, 'a_file', b'keep me')
  code, err = _cli(capsys, f'--dataset=folder:{small_folder}', f'--output_dir={target}',
                   '--splits=test', '--overwrite')
  assert code == 2 and len(err) == 1 and 'is a file' in err[0]
  assert target.read_bytes() == b'keep me'


def test_read_only_output_dir_fails_before_the_model_loads(small_folder, tmp_path, capsys,
                                                          monkeypatch, no_model_load):
  out = tmp_path / 'ro'
  out.mkdir()
  out.chmod(0o555)
  if ROOT_USER:  # root writes anywhere: make the filesystem say what a read-only one says
    create = outputs.create_file  # where the claim marker is created

    def refuse(path):
      if path.startswith(str(out)):
        raise PermissionError(13, 'Permission denied', path)
      return create(path)
    monkeypatch.setattr(outputs, 'create_file', refuse)
  code, err = _cli(capsys, f'--dataset=folder:{small_folder}', f'--output_dir={out}',
                   '--splits=test')
  out.chmod(0o755)
  assert code == 2 and len(err) == 1 and 'cannot write to' in err[0]
  assert 'Permission denied' in err[0]


@pytest.mark.parametrize('splits,message', [
    ('test,test', 'names test more than once'),
    ('the test', "'the test' is not a split name"),
])
def test_bad_splits_are_one_line(small_folder, tmp_path, capsys, no_model_load, splits,
                                 message):
  code, err = _cli(capsys, f'--dataset=folder:{small_folder}',
                   f'--output_dir={tmp_path}/out', f'--splits={splits}')
  assert code == 2 and len(err) == 1 and message in err[0]
  assert not os.path.exists(f'{tmp_path}/out')


def test_projected_without_a_projection_fails_before_the_pipeline(small_folder, tmp_path,
                                                                  capsys, monkeypatch):
  load = models.load

  def vision_only(name, *a, **k):
    pre = load(name, *a, **k)
    return dataclasses.replace(pre, module=pre.module.clone(projection_dim=None))
  monkeypatch.setattr(embed.models, 'load', vision_only)
  monkeypatch.setattr(embed, 'build', lambda *a, **k: pytest.fail('the pipeline was built'))
  code, err = _cli(capsys, f'--dataset=folder:{small_folder}', f'--output_dir={tmp_path}/o',
                   '--splits=test', '--projected')
  assert code == 2 and len(err) == 1 and 'has no visual projection' in err[0]


# --------------------------------------------------------------------------
# 2, 6. every file of a folder source is embedded or dead-lettered, deterministically
# --------------------------------------------------------------------------


@pytest.fixture
def odd_folder(tmp_path, monkeypatch):
  root = tmp_path / 'odd'
  outside = tmp_path / 'elsewhere'
  _write(root, 'train/cat/a.png')
  _write(root, 'train/dog/b.png')
  _write(outside, 'c.png')
  (root / 'train/kitty').symlink_to(outside, target_is_directory=True)  # followed
  (root / 'train/cat/broken.png').symlink_to(tmp_path / 'nowhere.png')
  (root / 'train/cat/loop').symlink_to(root / 'train/cat', target_is_directory=True)
  _write(root, 'train/stray.png')  # directly in the split folder
  _write(root, 'train/cat/nested/deep.png')
  _write(root, 'train/dog/corrupt.png', b'not a png')
  _write(root, 'train/locked/d.png')
  locked = root / 'train/locked'
  locked.chmod(0)
  if ROOT_USER:  # root lists anything: make the listing fail as it would for a user
    scandir = os.scandir

    def refuse(path='.'):
      if isinstance(path, (str, os.PathLike)) and os.fspath(path) == str(locked):
        raise PermissionError(13, 'Permission denied', os.fspath(path))
      return scandir(path)
    monkeypatch.setattr(os, 'scandir', refuse)
  # Hidden files and folders: skipped alike, never counted.
  for rel in ('train/cat/.DS_Store', 'train/.hiddendir/x.png', 'train/cat/.cache/y.png',
              '.hidden_split/cat/z.png'):
    _write(root, rel)
  _write(root, 'test/cat/e.png')
  yield root
  locked.chmod(0o755)


def test_every_file_of_a_folder_is_accounted_for(odd_folder, tmp_path):
  outs = [str(tmp_path / 'out1'), str(tmp_path / 'out2')]
  summaries = [embed.run([f'--model={MODEL}', f'--dataset=folder:{odd_folder}',
                          f'--output_dir={o}', '--batch_size=4']) for o in outs]
  counts = summaries[0]['counts']['train']
  assert counts == {'read': 9, 'written': 3, 'dead_lettered': 6}
  assert counts['read'] == counts['written'] + counts['dead_lettered']
  _, _, ids = embeddings.read_split(outs[0], 'train')
  assert sorted(ids) == ['train/cat/a.png', 'train/dog/b.png', 'train/kitty/c.png']
  assert embeddings.read_metadata(outs[0])['source']['class_names'] == ['cat', 'dog', 'kitty']
  letters = [open(os.path.join(o, 'dead_letters.train.jsonl')).read() for o in outs]
  assert letters[0] == letters[1]  # 6: the same reasons on every run
  assert ' at 0x' not in letters[0]
  reasons = {d['id']: d['reason'] for d in map(json.loads, letters[0].splitlines())}
  assert sorted(reasons) == ['train/cat/broken.png', 'train/cat/loop/',
                             'train/cat/nested/deep.png', 'train/dog/corrupt.png',
                             'train/locked/', 'train/stray.png']
  assert reasons['train/cat/broken.png'].startswith('broken symlink')
  assert reasons['train/locked/'].startswith('cannot list folder: PermissionError')
  assert 'not in a class folder' in reasons['train/stray.png']
  assert 'nested folder' in reasons['train/cat/nested/deep.png']
  assert 'hidden' not in letters[0] and '.DS_Store' not in letters[0]


def test_a_lost_input_fails_the_run_and_leaves_it_unreadable(small_folder, tmp_path, capsys,
                                                            monkeypatch):
  read = folder.ReadEntry.__call__

  def lose_one(self, entry):
    # A folder's entries are read by the source's reader on every path (chunked or not).
    return iter(()) if entry.id == 'test/dog/b.png' else read(self, entry)
  monkeypatch.setattr(folder.ReadEntry, '__call__', lose_one)
  out = tmp_path / 'out'
  code, err = _cli(capsys, f'--dataset=folder:{small_folder}', f'--output_dir={out}',
                   '--splits=test')
  assert code == 2 and len(err) == 1
  assert "split 'test': found 2 inputs but wrote 1 and dead-lettered 0" in err[0]
  assert not embeddings.is_complete(str(out))


# --------------------------------------------------------------------------
# 3. a split where every input fails
# --------------------------------------------------------------------------


def test_split_where_every_image_fails_is_one_line(small_folder, tmp_path, capsys):
  _write(small_folder, 'val/cat/bad.png', b'garbage')
  _write(small_folder, 'val/dog/bad.png', b'')
  out = tmp_path / 'out'
  code, err = _cli(capsys, f'--dataset=folder:{small_folder}', f'--output_dir={out}',
                   '--splits=test,val')
  assert code == 2 and len(err) == 1
  assert "split 'val': every input failed (2 dead-lettered" in err[0]
  assert str(out / 'dead_letters.val.jsonl') in err[0]
  assert not embeddings.is_complete(str(out))
  assert len((out / 'dead_letters.val.jsonl').read_text().splitlines()) == 2


# --------------------------------------------------------------------------
# 7. TFDS: corrupt records, concurrent preparation of digits
# --------------------------------------------------------------------------


def _corrupt_record(data_dir, split, index):
  from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

  (shard,) = [f for f in os.listdir(f'{data_dir}/digits/1.0.0') if f'-{split}.' in f]
  path = f'{data_dir}/digits/1.0.0/{shard}'
  reader = ArrayRecordReader(path)
  records = reader.read_all()
  reader.close()
  records[index] = b'\x00 not a tf.train.Example'
  writer = ArrayRecordWriter(path, embeddings.ARRAY_RECORD_OPTIONS)
  for r in records:
    writer.write(r)
  writer.close()


def test_corrupt_tfds_record_is_dead_lettered_by_key(digits_data_dir, tmp_path):
  data_dir = str(tmp_path / 'tfds')
  shutil.copytree(digits_data_dir, data_dir)
  _corrupt_record(data_dir, 'test', 5)
  out = str(tmp_path / 'out')
  summary = embed.run([f'--model={MODEL}', '--dataset=digits', f'--data_dir={data_dir}',
                       f'--output_dir={out}', '--splits=test', '--batch_size=64'])
  assert summary['counts']['test'] == {'read': 360, 'written': 359, 'dead_lettered': 1}
  (dead,) = [json.loads(l) for l in open(os.path.join(out, 'dead_letters.test.jsonl'))]
  assert dead['id'] == 'digits/test/5' and dead['reason'].startswith('corrupt record: ')
  assert ' at 0x' not in dead['reason']


def test_two_processes_prepare_digits_into_one_empty_dir(tmp_path):
  data_dir = str(tmp_path / 'shared')
  code = ('import sys; from clip_transfer.data import digits; '
          'b = digits.prepare(sys.argv[1]); print(b.info.splits["train"].num_examples)')
  env = {**os.environ, 'PYTHONPATH': os.getcwd()}
  procs = [subprocess.Popen([sys.executable, '-c', code, data_dir], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env) for _ in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (stdout, stderr) in zip(procs, results):
    assert p.returncode == 0, stderr.decode()[-2000:]
    assert stdout.split()[-1] == b'1437'
  src = sources.open_source('digits', data_dir)
  assert len(list(src.iter_examples('test'))) == 360
