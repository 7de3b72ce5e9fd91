"""report.compare on small metrics files: table content, plot written, mixed inputs refused."""

import json
import os
import subprocess
import sys

import pytest

from report import compare
from transfer.errors import UserError


def _entry(top1, wall, **kw):
  return {'top1': top1, 'top5': None, 'balanced_accuracy': top1 - 0.01,
          'per_class': {'a': top1, 'b': top1}, 'wall_s': wall, **kw}


def _write(d, m):
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, 'metrics.json'), 'w') as fh:
    json.dump(m, fh)
  return str(d)


def _probe(dataset='digits', split='test'):
  return {'stage': 'probe', 'num_train': 100, 'num_eval': 40, 'num_classes': 2,
          'dataset': {'name': dataset, 'eval_split': split}, 'model': {'name': 'random:tiny'},
          'embedding': {'wall_s': 12.0, 'num_images': 140, 'images_per_s': 11.7},
          'methods': {'jax': _entry(0.91, 0.5, trainable_params=130, l2=1e-3),
                      'sklearn': _entry(0.9, 6.0, trainable_params=130, l2=1e-3),
                      'jax_1shot': {'shots': 1, 'seeds': 3, 'top1': 0.6, 'top1_std': 0.05,
                                    'balanced_accuracy': 0.6},
                      'jax_5shot': {'shots': 5, 'seeds': 3, 'top1': 0.8, 'top1_std': 0.02,
                                    'balanced_accuracy': 0.8}}}


def _finetune(dataset='digits', split='test'):
  return {'stage': 'finetune', 'num_train': 100, 'num_eval': 40, 'num_classes': 2,
          'dataset': {'name': dataset, 'eval_split': split}, 'model': {'name': 'random:tiny'},
          'methods': {'linear': _entry(0.88, 30.0, trainable_params=130, images_per_s=200.0),
                      'full': _entry(0.95, 60.0, trainable_params=105_000, images_per_s=90.0)}}


def test_table_and_plot(tmp_path):
  run = tmp_path / 'run'
  _write(run / 'probe', _probe())
  _write(run / 'finetune', _finetune())
  p = subprocess.run([sys.executable, '-m', 'report.compare', str(run)], capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 0, p.stderr
  md = (run / 'report.md').read_text()
  assert md == p.stdout.rstrip('\n') + '\n'
  main_table = md.split('## Few-shot')[0]
  lines = {l.split('|')[1].strip(): l for l in main_table.splitlines() if l.startswith('| ')}
  assert '0.9100' in lines['probe:jax'] and '12.50' in lines['probe:jax']  # 0.5 s + 12 s embed
  assert '105,000' in lines['finetune:full'] and '90.0' in lines['finetune:full']
  assert '60.00' in lines['finetune:full']
  assert '| probe:jax | 1 | 3 | 0.6000 ± 0.0500 |' in md  # few-shot table
  png = (run / 'report.png').read_bytes()
  assert png.startswith(b'\x89PNG') and len(png) > 5000


@pytest.mark.parametrize('other', [_finetune(dataset='cifar10'), _finetune(split='validation')])
def test_mixed_inputs_are_refused(tmp_path, other):
  a = _write(tmp_path / 'a', _probe())
  b = _write(tmp_path / 'b', other)
  with pytest.raises(UserError, match='not comparable'):
    compare.compare([a, b], str(tmp_path / 'out'))
  p = subprocess.run([sys.executable, '-m', 'report.compare', a, b], capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 2 and p.stderr.startswith('error: runs are not comparable')


def test_not_metrics(tmp_path):
  with pytest.raises(UserError, match='holds no metrics.json'):
    compare.compare([str(tmp_path)])
  _write(tmp_path / 'x', {'hello': 1})
  with pytest.raises(UserError, match='not a probe/fine-tune metrics.json'):
    compare.compare([str(tmp_path / 'x')])
