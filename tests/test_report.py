"""report.compare through its CLI on small fake metrics files: the ladder table, intervals,
paired verdicts, the plot (with its WiSE-FT panel), old files, and every refusal."""

import copy
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from report import compare
from clip_transfer.protocol import metrics as metrics_lib
from clip_transfer.errors import UserError

N_EVAL, CLASSES = 200, ['a', 'b', 'c', 'd']
LABELS = np.arange(N_EVAL) % len(CLASSES)
SHA = 'f' * 64
VALIDATION = {'fraction': 0.1, 'seed': 0, 'num_examples': 40, 'ids_sha256': 'a' * 64}


def _entry(correct, wall, **kw):
  """A method entry as the stages write it, from which eval examples it gets right."""
  correct = np.asarray(correct, bool)
  pred = np.where(correct, LABELS, (LABELS + 1) % len(CLASSES))
  logits = np.eye(len(CLASSES))[pred]
  return {**metrics_lib.classification(logits, LABELS, CLASSES), 'wall_s': wall, **kw}


def _correct(k, offset=0):
  """k correct examples out of N_EVAL (the first k after ``offset``, cyclically)."""
  c = np.zeros(N_EVAL, bool)
  c[(np.arange(k) + offset) % N_EVAL] = True
  return c


def _header(stage, **kw):
  h = metrics_lib.header(
      stage, dataset={'spec': 'digits', 'name': 'digits', 'version': '1.0.0',
                      'train_split': 'train', 'eval_split': 'test'},
      model={'name': 'random:tiny', 'revision': None, 'weights_sha256': SHA},
      class_names=CLASSES, num_train=400, num_eval=N_EVAL,
      eval={'ids_sha256': 'e' * 64, 'labels': LABELS.tolist()}, **kw)
  if stage != 'zeroshot':
    h['validation'] = dict(VALIDATION)
    h['final_fit'] = 'fit'
  return h


def _zeroshot():
  m = _header('zeroshot', embedding={'wall_s': 12.0, 'num_images': 600, 'images_per_s': 50.0})
  m['methods']['zeroshot'] = _entry(_correct(50), 0.3, trainable_params=0, num_templates=2,
                                    templates=['a photo of a {}.', 'a {}.'],
                                    cost='text tower on 2 templates, then scoring')
  return m


def _probe(selection='within-shots'):
  m = _header('probe', embedding={'wall_s': 12.0, 'num_images': 600, 'images_per_s': 50.0})
  m['methods'] = {
      'jax': _entry(_correct(140), 0.5, trainable_params=260, l2=1e-3,
                    cost='L2 search on validation and final fit, cached embeddings'),
      'sklearn': _entry(_correct(138), 6.0, trainable_params=260, l2=1e-3),
      'jax_1shot': {'shots': 1, 'seeds': 3, 'selection': selection, 'top1': 0.6,
                    'top1_std': 0.05, 'top1_ci95': [0.55, 0.65], 'balanced_accuracy': 0.6,
                    'balanced_accuracy_ci95': [0.55, 0.65], 'wall_s': 0.2},
      'jax_5shot': {'shots': 5, 'seeds': 3, 'selection': selection, 'top1': 0.8,
                    'top1_std': 0.02, 'top1_ci95': [0.76, 0.84], 'balanced_accuracy': 0.8,
                    'balanced_accuracy_ci95': [0.76, 0.84], 'wall_s': 0.3}}
  return m


def _finetune(wise=False):
  m = _header('finetune', data_wall_s=4.0)
  full = _entry(_correct(190), 60.0, trainable_params=105_000, images_per_s=90.0,
                grid=[1e-4, 3e-4], selected={'lr': 3e-4, 'step': 40}, head_init='zeros',
                curves={'0.0003': [{'step': 40, 'val_top1': 0.9, 'val_loss': 0.3}]},
                cost='data preparation, 2-lr sweep and one eval')
  m['methods'] = {  # written in the order the modes ran, not the ladder's
      'full': full,
      'full@probe': _entry(_correct(141, offset=30), 55.0, trainable_params=105_000,
                           head_init='probe:runs/probe'),
      'linear': _entry(_correct(139), 20.0, trainable_params=260, selected={'l2': 1e-3}),
  }
  if wise:
    full['wise'] = {'alphas': [0, 0.5, 1], 'val_top1': [0.7, 0.93, 0.9],
                    'eval_top1': [0.7, 0.96, 0.95], 'selected_alpha': 0.5}
    m['methods']['full+wise'] = _entry(_correct(192), 61.0, trainable_params=105_000)
  return m


def _write(d, m):
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, 'metrics.json'), 'w') as fh:
    json.dump(m, fh)  # allow_nan: the writer of a broken file is not ours
  return str(d)


def _process(*args):
  """``python -m report.compare ARGS`` in a process of its own (the module's own wiring)."""
  return subprocess.run([sys.executable, '-m', 'report.compare', *map(str, args)],
                        capture_output=True, text=True, timeout=120)


def _cli(capsys, *args):
  """The same entry point in-process (``compare.main``), as ``_process`` reports it."""
  try:
    compare.main(list(map(str, args)))
    code = 0
  except SystemExit as e:
    code = e.code
  cap = capsys.readouterr()
  return subprocess.CompletedProcess(args, code, cap.out, cap.err)


def _table(md):
  main = md.split('## Few-shot')[0]
  return [l for l in main.splitlines() if l.startswith('| ') and not l.startswith('| method')]


def _png_width(path):
  data = path.read_bytes()
  assert data.startswith(b'\x89PNG') and len(data) > 5000
  return struct.unpack('>I', data[16:20])[0]


def test_ladder_intervals_verdicts_and_plot(tmp_path, capsys):
  run = tmp_path / 'run'
  _write(run / 'finetune', _finetune(wise=True))
  _write(run / 'probe', _probe())
  _write(run / 'zeroshot', _zeroshot())
  p = _process(run)
  assert p.returncode == 0, p.stderr
  md = (run / 'report.md').read_text()
  assert md == p.stdout.rstrip('\n') + '\n'
  table = _table(md)
  # The ladder: zero-shot, probe (jax, sklearn), head-only, LP-FT, fine-tune, WiSE-FT.
  assert [l.split('|')[1].strip() for l in table] == [
      'zeroshot:zeroshot', 'probe:jax', 'probe:sklearn', 'finetune:linear',
      'finetune:full@probe', 'finetune:full', 'finetune:full+wise']
  rows = {l.split('|')[1].strip(): [c.strip() for c in l.split('|')[2:-1]] for l in table}
  assert 'Δ top-1 vs probe:jax [95% CI]' in md
  # top-1 with its interval from the file; the reference row; the paired columns.
  jax_ci = _probe()['methods']['jax']['top1_ci95']
  assert rows['probe:jax'][0] == f'0.7000 [{jax_ci[0]:.3f}, {jax_ci[1]:.3f}]'
  assert rows['probe:jax'][2:5] == ['(reference)', '—', '—']
  assert rows['finetune:full'][2].startswith('+0.2500 [')
  assert rows['finetune:full'][4] == 'better'
  assert rows['zeroshot:zeroshot'][4] == 'worse'
  assert rows['probe:sklearn'][4] == 'no detectable difference'
  assert rows['finetune:full@probe'][4] == 'no detectable difference'
  # Costs: probe and zero-shot add the one-off embedding; fine-tune already holds its data prep.
  assert rows['probe:jax'][6:9] == ['0.50', '12.50', '—']
  assert rows['zeroshot:zeroshot'][5:8] == ['0', '0.30', '12.30']
  assert rows['finetune:full'][5:9] == ['105,000', '60.00', '60.00', '90.0']
  assert 'jax: L2 search on validation and final fit, cached embeddings' in md
  assert 'includes its own data preparation (decode/resize: 4.0 s)' in md
  assert 'fraction 0.1, seed 0, 40 examples' in md
  # Few-shot table, labelled with its selection protocol.
  assert ('| probe:jax | 1 | 3 | true few-shot (L2 chosen within the shots) | 0.6000 ± 0.0500 | '
          '[0.550, 0.650] |') in md
  assert 'WiSE-FT finetune:full: α = 0.5 chosen on validation (validation top-1 0.9300)' in md
  # Three panels: accuracy vs cost, few-shot, WiSE-FT α.
  wide = _png_width(run / 'report.png')
  out = tmp_path / 'no_wise'
  assert _cli(capsys, run / 'probe', run / 'zeroshot', '--output_dir', out).returncode == 0
  assert wide > _png_width(out / 'report.png') * 1.4


def test_validation_selection_is_labelled(tmp_path):
  a = _write(tmp_path / 'a', _probe(selection='validation'))
  md = compare.compare([a], str(tmp_path / 'out'))
  assert '| probe:jax | 5 | 3 | L2 chosen on the validation split |' in md


def test_old_files_without_predictions_render(tmp_path, capsys):
  old = _probe()
  for key in ('eval', 'validation', 'final_fit'):
    old.pop(key)
  old['model'].pop('weights_sha256')
  for e in old['methods'].values():
    for key in ('predictions', 'top1_ci95', 'balanced_accuracy_ci95', 'selection'):
      e.pop(key, None)
  run = tmp_path / 'run'
  _write(run / 'probe', old)
  _write(run / 'finetune', _finetune())
  p = _cli(capsys, run)
  assert p.returncode == 0, p.stderr
  md = (run / 'report.md').read_text()
  assert 'No paired comparison: probe:jax' in md and 'verdict' not in md
  rows = {l.split('|')[1].strip(): l for l in _table(md)}
  assert '| 0.7000 |' in rows['probe:jax']  # no interval recorded, none invented
  assert '| 0.9500 [' in rows['finetune:full']
  assert 'selection not recorded' not in md and '| not recorded |' in md


def _refused(tmp_path, capsys, other, match, base=None):
  a = _write(tmp_path / 'a', base or _probe())
  b = _write(tmp_path / 'b', other)
  with pytest.raises(UserError, match=match):
    compare.compare([a, b], str(tmp_path / 'out'))
  p = _cli(capsys, a, b)
  assert p.returncode == 2, p.stderr
  assert p.stderr.startswith('error: ') and p.stderr.count('\n') == 1, p.stderr
  return p.stderr


def _with(m, path, value):
  m = copy.deepcopy(m)
  *keys, last = path
  d = m
  for k in keys:
    d = d[k]
  d[last] = value
  return m


@pytest.mark.parametrize('path, value, match', [
    (('dataset', 'name'), 'cifar10', 'different dataset or eval split'),
    (('dataset', 'eval_split'), 'validation', 'different dataset or eval split'),
    (('validation', 'seed'), 1, 'different validation split'),
    (('validation', 'ids_sha256'), 'b' * 64, 'different validation split'),
    (('eval', 'ids_sha256'), 'd' * 64, 'different eval examples'),
    (('eval', 'labels'), np.roll(LABELS, 1).tolist(), r'different eval example order'),
])
def test_mixed_inputs_are_refused(tmp_path, capsys, path, value, match):
  _refused(tmp_path, capsys, _with(_finetune(), path, value), match)


def test_zeroshot_is_exempt_from_the_validation_check(tmp_path):
  a = _write(tmp_path / 'a', _probe())
  b = _write(tmp_path / 'b', _zeroshot())
  assert 'zeroshot:zeroshot' in compare.compare([a, b], str(tmp_path / 'out'))


@pytest.mark.parametrize('path, value, where', [
    (('methods', 'full', 'wall_s'), float('nan'), 'methods.full.wall_s'),
    (('methods', 'full', 'curves', '0.0003', 0, 'val_loss'), float('inf'),
     'methods.full.curves.0.0003[0].val_loss'),
    (('data_wall_s',), float('-inf'), 'data_wall_s'),
])
def test_non_finite_numbers_are_refused(tmp_path, capsys, path, value, where):
  err = _refused(tmp_path, capsys, _with(_finetune(), path, value), 'is NaN or inf')
  assert f': {where} is NaN or inf' in err


def test_not_metrics(tmp_path):
  with pytest.raises(UserError, match='holds no metrics.json'):
    compare.compare([str(tmp_path)])
  _write(tmp_path / 'x', {'hello': 1})
  with pytest.raises(UserError, match='not a probe/fine-tune metrics.json'):
    compare.compare([str(tmp_path / 'x')])


def test_a_report_the_tool_did_not_write_is_never_replaced(tmp_path, capsys):
  run = tmp_path / 'run'
  _write(run / 'probe', _probe())
  (run / 'report.md').write_text('my own notes')
  p = _process(run)  # a real process's refusal: exit 2 and the one line, nothing else
  assert p.returncode == 2 and 'was not written by report.compare' in p.stderr
  assert p.stderr.startswith('error: ') and p.stderr.count('\n') == 1, p.stderr
  assert (run / 'report.md').read_text() == 'my own notes'
  (run / 'report.md').unlink()
  for _ in range(2):  # its own report is replaced on the next run
    p = _cli(capsys, run)
    assert p.returncode == 0, p.stderr


def test_mixed_weights_within_one_run_are_refused(tmp_path):
  run = tmp_path / 'run'
  _write(run / 'probe', _probe())
  _write(run / 'finetune', _with(_finetune(), ('model', 'weights_sha256'), '0' * 64))
  with pytest.raises(UserError, match='different model weights within one run'):
    compare.compare([str(run)], str(tmp_path / 'out'))


def test_backbones_side_by_side_with_paired_verdicts(tmp_path):
  """Two runs that differ only in the model: one table, a backbone column, pairs across them."""
  a = _write(tmp_path / 'clip', _probe())
  other = _with(_with(_probe(), ('model', 'name'), 'random:dinov2-tiny'),
                ('model', 'weights_sha256'), '0' * 64)
  other['methods']['jax'] = _entry(_correct(180, offset=7), 0.4, trainable_params=520)
  b = _write(tmp_path / 'clip' / 'backbone2' / 'probe', other)  # a run inside the other, as the demo
  md = compare.compare([a, str(tmp_path / 'clip' / 'backbone2')], str(tmp_path / 'out'))
  rows = _table(md)
  assert '| backbone |' in md and 'vs probe:jax on random:dinov2-tiny (00000000)' in md
  ours = [r for r in rows if r.startswith('| probe:jax | `random:tiny (ffffffff)`')]
  assert len(ours) == 1 and '| worse |' in ours[0]  # 140 vs 180 of 200 correct
  assert any('(reference)' in r and 'random:dinov2-tiny' in r for r in rows)
  assert '| probe:jax on random:dinov2-tiny (00000000) | 1 |' in md  # few-shot rows apart


def test_the_report_claims_its_files_with_the_output_marker(tmp_path):
  """One marker for every stage (clip_transfer.outputs): it lists report.md and report.png."""
  from clip_transfer import outputs  # pylint: disable=g-import-not-at-top

  run = tmp_path / 'run'
  _write(run / 'probe', _probe())
  compare.compare([str(run)])
  marker = json.loads((run / outputs.MARKER).read_text())
  assert marker['files'] == ['report.md', 'report.png']
  assert compare.OLD_MARKER not in (run / 'report.md').read_text()
  # A user's picture where the report goes is refused (and kept), even with no report.md.
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'report.png').write_bytes(b'mine')
  with pytest.raises(UserError, match='report.png was not written by report.compare'):
    compare.compare([str(run)], str(other))
  assert (other / 'report.png').read_bytes() == b'mine'
  # A report an older version wrote (the comment, no marker) is still ours to replace.
  old = tmp_path / 'old'
  old.mkdir()
  (old / 'report.md').write_text('old table\n' + compare.OLD_MARKER + '\n')
  (old / 'report.png').write_bytes(b'old plot')
  compare.compare([str(run)], str(old))
  assert (old / 'report.md').read_text().startswith('# Transfer ladder')
