"""Issue 22 through the real CLIs: concurrent runs, a full disk, Ctrl-C, report.compare's inputs,
flag typos, and the noise around every error. Subprocesses where only a real process shows it."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from clip_transfer import errors
from clip_transfer import outputs
from clip_transfer.data import embeddings
from clip_transfer.protocol import metrics as metrics_lib

ENV = {**os.environ, 'PYTHONPATH': os.getcwd()}
CLASSES = ['a', 'b', 'c']


def _run(module, *args, timeout=300, **kw):
  """``python -m module args`` → (returncode, stdout, stderr lines)."""
  p = subprocess.run([sys.executable, '-m', module, *map(str, args)], capture_output=True,
                     text=True, timeout=timeout, env=ENV, **kw)
  return p.returncode, p.stdout, p.stderr.strip().splitlines()


# --------------------------------------------------------------------------
# report.compare's inputs
# --------------------------------------------------------------------------


def _metrics(stage='probe', methods=True) -> dict:
  labels = np.arange(30) % len(CLASSES)
  m = metrics_lib.header(
      stage, dataset={'spec': 'digits', 'name': 'digits', 'version': '1', 'train_split': 'train',
                      'eval_split': 'test'},
      model={'name': 'random:tiny', 'weights_sha256': 'f' * 64}, class_names=CLASSES,
      num_train=60, num_eval=len(labels), eval={'ids_sha256': 'e' * 64, 'labels': labels.tolist()})
  if methods:
    logits = np.eye(len(CLASSES))[(labels + (np.arange(30) % 4 == 0)) % len(CLASSES)]
    m['methods']['jax'] = {**metrics_lib.classification(logits, labels, CLASSES), 'wall_s': 0.5,
                           'trainable_params': 12}
  return m


def _write(d, m) -> str:
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, 'metrics.json'), 'w') as fh:
    json.dump(m, fh)
  return str(d)


def test_report_refuses_empty_and_mistyped_runs_and_finds_nested_ones(tmp_path, capsys):
  from report import compare
  run = _write(tmp_path / 'a' / 'deep' / 'probe', _metrics())
  # Two levels down is found; the same run named twice (directly and via its parent) is read once.
  code, out, err = _main(compare.main, [tmp_path / 'a', run, '--output_dir', tmp_path / 'r'],
                         capsys)
  assert code == 0, err
  assert out.count('| probe:jax |') == 1
  # A run with no results (Ctrl-C, --stop_after) is refused, not shown as an empty table.
  empty = _write(tmp_path / 'empty', _metrics(methods=False))
  code, _, err = _main(compare.main, [run, empty, '--output_dir', tmp_path / 'r'], capsys)
  assert code == 2 and len(err) == 1 and 'holds no results' in err[0] and empty in err[0]
  # Wrong types: one line naming the field, no traceback.
  for where, value in ((('methods', 'jax', 'top1'), 'high'), (('eval', 'labels'), 'abc'),
                       (('methods', 'jax'), [1, 2]), (('model',), 7)):
    m = _metrics()
    obj = m
    for k in where[:-1]:
      obj = obj[k]
    obj[where[-1]] = value
    bad = _write(tmp_path / 'bad', m)
    code, _, err = _main(compare.main, [bad, '--output_dir', tmp_path / 'r'], capsys)
    assert code == 2 and len(err) == 1, err
    assert '.'.join(where) in err[0] and 'Traceback' not in err[0]


# --------------------------------------------------------------------------
# Embedding datasets written in-process (no model), and the CLIs run in-process
# where the behaviour does not need a process of its own
# --------------------------------------------------------------------------


def _dataset(path, n=24, dim=4, projected=False) -> str:
  rng = np.random.default_rng(0)
  y = np.arange(n) % len(CLASSES)
  x = rng.normal(size=(n, dim)).astype(np.float32)
  x[np.arange(n), y] += 4.0
  rows = lambda s: [(f'{s}/{i:03d}', x[i], int(y[i])) + ((x[i],) if projected else ())
                    for i in range(n)]
  embeddings.write_dataset(str(path), {'train': rows('train'), 'test': rows('test')}, CLASSES,
                           {'model': {'name': 'random:tiny', 'params_sha256': 'f' * 64},
                            'source': {'name': 'fake', 'spec': 'fake', 'version': None}})
  outputs.release(str(path))  # write_dataset claimed it, as embed does; this test is done with it
  return str(path)


def _main(main, argv, capsys):
  """An entry point in-process → (exit code, stdout, stderr lines)."""
  try:
    main(list(map(str, argv)))
    code = 0
  except SystemExit as e:
    code = e.code
  cap = capsys.readouterr()
  return code, cap.out, cap.err.strip().splitlines()


@pytest.fixture(scope='module')
def small_ds(tmp_path_factory):
  return _dataset(tmp_path_factory.mktemp('ds') / 'emb', projected=True)


def _images(tmp_path):
  from PIL import Image
  for i, name in enumerate(CLASSES):
    os.makedirs(tmp_path / 'images' / 'test' / name, exist_ok=True)
    Image.new('RGB', (8, 8), (80 * i, 0, 0)).save(tmp_path / 'images' / 'test' / name / 'x.png')
  return tmp_path / 'images'


def test_a_directory_another_run_holds_is_refused_by_every_stage(small_ds, tmp_path, capsys):
  from pipelines import embed
  from probe import train, zeroshot
  from report import compare
  out = tmp_path / 'busy'
  # A real second process holds the claim, as a run started a moment earlier does.
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys; from clip_transfer import outputs; '
       'outputs.claim_exclusive(sys.argv[1]); print("held", flush=True); sys.stdin.read()',
       str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    _write(tmp_path / 'run', _metrics())
    for main, argv in (
        (embed.main, [f'--dataset=folder:{_images(tmp_path)}', '--splits=test',
                      '--model=random:tiny', f'--output_dir={out}']),
        (train.main, [f'--embeddings={small_ds}', f'--output_dir={out}']),
        (zeroshot.main, [f'--embeddings={small_ds}', f'--output_dir={out}']),
        (compare.main, [tmp_path / 'run', '--output_dir', out])):
      code, _, err = _main(main, argv, capsys)
      assert code == 2 and len(err) == 1, err
      assert 'is in use by another run' in err[0] and str(out) in err[0]
    assert os.listdir(out) == []  # nothing was written into the other run's directory
  finally:
    holder.communicate('', timeout=60)
  # Once that run has ended, the directory is free (the kernel drops the lock with the process).
  code, _, err = _main(train.main, [f'--embeddings={small_ds}', f'--output_dir={out}',
                                    '--no_progress', '--baselines='], capsys)
  assert code == 0, err


def test_probe_replaces_a_previous_run_only_with_overwrite(small_ds, tmp_path, capsys):
  from probe import train
  argv = [f'--embeddings={small_ds}', f'--output_dir={tmp_path / "p"}', '--no_progress',
          '--baselines=']
  assert _main(train.main, argv, capsys)[0] == 0
  before = (tmp_path / 'p' / 'metrics.json').read_bytes()
  code, _, err = _main(train.main, argv, capsys)
  assert code == 2 and len(err) == 1 and 'already holds a probe run; pass --overwrite' in err[0]
  assert (tmp_path / 'p' / 'metrics.json').read_bytes() == before
  code, out, err = _main(train.main, argv + ['--overwrite'], capsys)
  assert code == 0, err


def test_a_truncated_shard_is_one_line_naming_it(tmp_path, capsys):
  from probe import train
  ds = _dataset(tmp_path / 'emb', n=300, dim=64)
  (shard,) = [f for f in os.listdir(ds) if '-train.array_record-' in f]
  path = os.path.join(ds, shard)
  with open(path, 'r+b') as fh:
    fh.truncate(os.path.getsize(path) // 2)
  code, _, err = _main(train.main, [f'--embeddings={ds}', f'--output_dir={tmp_path / "p"}'],
                       capsys)
  assert code == 2 and len(err) == 1, err
  assert f'cannot read shard {path}: it is truncated or damaged' in err[0]


def test_misleading_messages(small_ds, tmp_path, capsys):
  from probe import zeroshot
  code, _, err = _main(zeroshot.main, [f'--embeddings={small_ds}', f'--output_dir={tmp_path}/z',
                                       f'--templates={tmp_path}/mine.txt'], capsys)
  assert code == 2 and err == [f'error: --templates file {tmp_path}/mine.txt does not exist']
  # Vision-only embeddings: --projected is not the fix (a vision-only model has no projection).
  vision_only = _dataset(tmp_path / 'v')
  code, _, err = _main(zeroshot.main, [f'--embeddings={vision_only}',
                                       f'--output_dir={tmp_path}/z'], capsys)
  assert code == 2 and len(err) == 1 and 'no projected feature' in err[0]
  assert '--projected' not in err[0].replace('--no_projected', '')


def test_a_misspelled_embed_flag_is_refused_and_beam_options_pass(tmp_path, capsys):
  from pipelines import embed
  out = tmp_path / 'out'
  code, _, err = _main(embed.main, ['--dataset=digits', f'--output_dir={out}', '--bacth_size=8'],
                       capsys)
  assert code == 2 and err == ['error: unknown flag --bacth_size; did you mean --batch_size?']
  assert not out.exists()
  _, beam_args = embed.parse_args(['--dataset=digits', f'--output_dir={out}',
                                   '--direct_num_workers=2', '--runner=DirectRunner',
                                   '--direct_running_mode', 'multi_processing'])
  assert beam_args == ['--direct_num_workers=2', '--runner=DirectRunner',
                       '--direct_running_mode', 'multi_processing']


def test_an_abbreviated_or_mistyped_flag_is_refused_not_guessed(small_ds, tmp_path, capsys):
  # argparse's prefix matching took --output for --output_dir and wrote report.md/report.md.
  from probe import train
  from report import compare
  out = tmp_path / 'report.md'
  code, _, err = _main(compare.main, [str(small_ds), f'--output={out}'], capsys)
  assert code == 2 and err[-1].endswith(
      f'error: unrecognized arguments: --output={out} (did you mean --output_dir?)'), err
  assert not out.exists()
  code, _, err = _main(train.main, [f'--embeddings={small_ds}', f'--output_dir={tmp_path}/p',
                                    '--solv=adam', '--basline='], capsys)
  assert code == 2 and err[-1].endswith(
      'error: unrecognized arguments: --solv=adam (did you mean --solver?) '
      '--basline= (did you mean --baselines?)'), err
  assert not (tmp_path / 'p').exists()


# --------------------------------------------------------------------------
# Real processes: Ctrl-C and a full disk
# --------------------------------------------------------------------------


def _wait_for(path, proc, timeout=300):
  start = time.time()
  while not os.path.exists(path):
    assert proc.poll() is None, proc.communicate()
    assert time.time() - start < timeout, f'{path} never appeared'
    time.sleep(0.2)


def _terminal_sigint():
  """In the child: SIGINT as a terminal delivers it (default action, not blocked).

  A child inherits an ignored SIGINT and the signal mask from the process that starts
  it, and the stages rightly leave an ignored SIGINT alone (a shell's background job).
  Earlier tests in the same pytest worker can leave it ignored (CI saw this run exit 0,
  silent, after the signal), so the child is given a terminal's disposition explicitly.
  """
  signal.signal(signal.SIGINT, signal.SIG_DFL)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_is_one_line_exit_130_and_nothing_reads_as_finished(tmp_path, digits_data_dir):
  out = tmp_path / 'emb'
  proc = subprocess.Popen(
      [sys.executable, '-m', 'pipelines.embed', '--dataset=digits', '--model=random:tiny',
       f'--data_dir={digits_data_dir}', f'--output_dir={out}', '--batch_size=1'],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
      preexec_fn=_terminal_sigint)
  _wait_for(out / outputs.MARKER, proc)  # the run has started: imports done, directory claimed
  # Mid-run: batch 1 makes the 1,797 digits take far longer than this wait (at batch 8 a quiet
  # machine could finish within 3 s of the claim, and the signal came after the run).
  time.sleep(1)
  assert proc.poll() is None, 'the run finished before it could be interrupted'
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == errors.INTERRUPTED_EXIT, err
  assert err.strip().splitlines() == [f'error: {errors.INTERRUPTED}']
  assert not embeddings.is_complete(str(out))


def test_a_ctrl_c_a_library_swallowed_still_leaves_nothing_finished(tmp_path, digits_data_dir,
                                                                    monkeypatch, capsys):
  # A Ctrl-C can land where a library catches it and carries on (an import guard turning
  # KeyboardInterrupt into ImportError). The handler remembers it; the run must not then
  # mark its output finished.
  from clip_transfer import models  # pylint: disable=g-import-not-at-top
  from pipelines import embed  # pylint: disable=g-import-not-at-top

  load = models.load
  monkeypatch.setattr(errors, '_interrupted', False)

  def load_then_swallowed_ctrl_c(*args, **kwargs):
    errors._interrupted = True  # what _on_sigint records before the exception is swallowed
    return load(*args, **kwargs)

  monkeypatch.setattr(models, 'load', load_then_swallowed_ctrl_c)
  out = tmp_path / 'emb'
  with pytest.raises(SystemExit) as e:
    embed.main(['--dataset=digits', '--model=random:tiny', f'--data_dir={digits_data_dir}',
                f'--output_dir={out}', '--splits=test'])
  assert e.value.code == errors.INTERRUPTED_EXIT
  assert capsys.readouterr().err.strip().splitlines()[-1] == f'error: {errors.INTERRUPTED}'
  assert not embeddings.is_complete(str(out))



@pytest.mark.parametrize('stage', ['probe', 'finetune'])
def test_a_swallowed_ctrl_c_leaves_no_metrics_json(stage, small_ds, tmp_path, cat_dog_folder,
                                                   monkeypatch, capsys):
  # The same for the stages whose metrics.json marks them finished (one writer,
  # metrics_lib.write, serves probe, zero-shot and fine-tune): the Ctrl-C lands mid-run
  # (while the embeddings or the model load) and is swallowed there.
  from clip_transfer import models  # pylint: disable=g-import-not-at-top
  from finetune import train as ft_train  # pylint: disable=g-import-not-at-top
  from probe import train  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(errors, '_interrupted', False)
  module, name = (models, 'load') if stage == 'finetune' else (embeddings, 'read_split')
  real = getattr(module, name)

  def then_swallowed_ctrl_c(*args, **kwargs):
    errors._interrupted = True  # what _on_sigint records before the exception is swallowed
    return real(*args, **kwargs)

  monkeypatch.setattr(module, name, then_swallowed_ctrl_c)
  out = tmp_path / 'out'
  main, argv = {
      'probe': (train.main, [f'--embeddings={small_ds}', f'--output_dir={out}', '--baselines=']),
      'finetune': (ft_train.main, [f'--dataset=folder:{cat_dog_folder(tmp_path / "images", train=6, test=2)}',
                                   '--model=random:tiny', f'--workdir={out}', '--mode=linear',
                                   '--steps=1']),
  }[stage]
  code, _, err = _main(main, argv, capsys)
  assert code == errors.INTERRUPTED_EXIT, err[-5:]
  assert err[-1] == f'error: {errors.INTERRUPTED}'
  assert not (out / 'metrics.json').exists()

def _in_tiny_filesystem(tmp_path, size_kb, script):
  """Runs ``script`` (bash) with a ``size_kb`` tmpfs mounted at $FULL; skips when it cannot."""
  full = tmp_path / 'full'
  full.mkdir()
  try:
    p = subprocess.run(['unshare', '--user', '--map-root-user', '--mount', 'bash', '-c',
                        f'mount -t tmpfs -o size={size_kb}k tmpfs {full} || exit 99\n{script}'],
                       capture_output=True, text=True, timeout=600, env={**ENV, 'FULL': str(full)})
  except FileNotFoundError:
    pytest.skip('no unshare here to mount a small tmpfs')
  if p.returncode == 99:
    pytest.skip(f'cannot mount a tmpfs in a user namespace here: {p.stderr.strip()[-200:]}')
  return p


def test_a_full_disk_is_one_line_naming_the_filesystem(tmp_path, digits_data_dir):
  # A real full filesystem: a 64 KiB tmpfs (the shards need more), no fault injection.
  p = _in_tiny_filesystem(tmp_path, 64, f'''
    {sys.executable} -m pipelines.embed --dataset=digits --model=random:tiny \\
        --data_dir={digits_data_dir} --output_dir=$FULL/emb --splits=test
    echo "rc=$?"
    ls -a $FULL/emb''')
  err = p.stderr.strip().splitlines()
  assert len(err) == 1, p.stderr[-3000:]
  assert err[0].startswith(f'error: no space left on device while writing {tmp_path}/full/emb '
                           f'(filesystem {tmp_path}/full has ')
  assert 'free of 64.0 KiB' in err[0]
  assert 'rc=2' in p.stdout and 'dataset_info.json' not in p.stdout  # nothing reads as complete


def test_a_file_size_limit_in_probe_is_one_line(small_ds, tmp_path):
  # RLIMIT_FSIZE of 1 KiB (bash's ulimit; Python ignores SIGXFSZ): a longer write fails, EFBIG.
  p = subprocess.run(['bash', '-c', 'ulimit -f 1 && exec "$@"', 'bash', sys.executable, '-m',
                      'probe.train', f'--embeddings={small_ds}', f'--output_dir={tmp_path / "p"}',
                      '--no_progress', '--baselines='],
                     capture_output=True, text=True, timeout=600, env=ENV)
  err = p.stderr.strip().splitlines()
  assert p.returncode == 2 and len(err) == 1, p.stderr[-3000:]
  assert err[0].startswith(f'error: file too large while writing {tmp_path / "p"}: a file '
                           'reached the size limit (1.0 KiB; see ulimit -f)')
  assert not (tmp_path / 'p' / 'metrics.json').exists()


def test_stop_after_says_it_stopped_and_the_report_refuses_the_run(tmp_path, digits_data_dir,
                                                                    capsys):
  from finetune import train
  from report import compare
  work = tmp_path / 'ft'
  code, out, err = _main(train.main, [
      '--dataset=digits', f'--data_dir={digits_data_dir}', '--model=random:tiny',
      f'--workdir={work}', '--mode=full', '--lr=1e-3', '--steps=2', '--batch_size=16',
      '--limit_train=48', '--limit_eval=16', '--stop_after=1', '--no_progress'], capsys)
  assert code == 0, err
  assert 'stopped early (--stop_after) before full finished; continue with --resume' in out
  assert 'metrics: ' not in out.replace('(metrics: ', '')
  code, _, err = _main(compare.main, [work, '--output_dir', tmp_path / 'r'], capsys)
  assert code == 2 and len(err) == 1 and 'holds no results' in err[0]
