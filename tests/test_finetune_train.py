"""finetune.train end to end on the built-in digits with random:tiny: accuracy, resume, errors."""

import json
import os

import jax
import numpy as np
import pytest

from finetune import train
from finetune import trainer
from transfer import clip
from transfer import preprocess
from transfer import sources

pytestmark = pytest.mark.usefixtures('xla_cache')  # tests/conftest.py



@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _cli(*argv):
  """Runs the real entry point; returns its exit code."""
  try:
    return train.main(list(argv))
  except SystemExit as e:
    return e.code


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory, data_dir):
  """linear then full into one workdir (two CLI runs: metrics.json keeps both)."""
  workdir = str(tmp_path_factory.mktemp('ft'))
  common = ['--dataset=digits', f'--data_dir={data_dir}', '--model=random:tiny',
            f'--workdir={workdir}', '--batch_size=64', '--no-progress']
  # A linear head on random-init features needs a large lr (they are badly conditioned).
  assert _cli(*common, '--mode=linear', '--epochs=40', '--lr=1.0') == 0
  assert _cli(*common, '--mode=full', '--epochs=10', '--lr=3e-3') == 0
  with open(os.path.join(workdir, 'metrics.json')) as fh:
    return workdir, json.load(fh)


def test_metrics_schema(digits_run):
  _, m = digits_run
  assert (m['num_train'], m['num_eval'], m['num_classes']) == (1437, 360, 10)
  assert m['model']['name'] == 'random:tiny' and m['dataset']['name'] == 'digits'
  assert set(m['methods']) == {'linear', 'full'}
  for entry in m['methods'].values():
    for key in ('top1', 'top5', 'balanced_accuracy', 'per_class', 'wall_s', 'trainable_params',
                'images_per_s'):
      assert entry[key] is not None, key
    assert set(entry['per_class']) == {str(d) for d in range(10)}
  assert m['methods']['linear']['trainable_params'] == 64 * 10 + 10
  assert m['methods']['full']['trainable_params'] > 50 * m['methods']['linear']['trainable_params']


def test_full_finetune_well_above_chance(digits_run):
  _, m = digits_run
  assert m['methods']['full']['top1'] > 0.7  # chance: 0.1


def test_linear_lands_in_the_probe_band(digits_run, data_dir):
  """Cross-check with the probe's protocol on the same frozen features (CLIP paper's baseline)."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top

  _, m = digits_run
  pre = clip.load('random:tiny')
  backbone, variables = pre.vision_tower()
  embed = jax.jit(lambda x: backbone.apply(
      variables, preprocess.normalize(x, pre.preprocess)).pooler_output)
  src = sources.open_source('digits', data_dir)
  feats = {}
  for split in ('train', 'test'):
    ex = list(src.iter_examples(split))
    images = np.stack([preprocess.prepare(e.image, pre.preprocess) for e in ex])
    feats[split] = (np.asarray(embed(images)), np.array([e.label for e in ex]))
  scaler = StandardScaler().fit(feats['train'][0])
  clf = LogisticRegression(max_iter=1000).fit(scaler.transform(feats['train'][0]),
                                              feats['train'][1])
  probe_top1 = clf.score(scaler.transform(feats['test'][0]), feats['test'][1])
  linear_top1 = m['methods']['linear']['top1']
  # Same head, same features: SGD without standardisation lands a few points under L-BFGS-like
  # convergence on these ill-conditioned random features, never far off or above by luck.
  assert probe_top1 > 0.6
  assert probe_top1 - 0.15 <= linear_top1 <= probe_top1 + 0.05, (linear_top1, probe_top1)


def _resume_args(workdir, data_dir):
  return ['--dataset=digits', f'--data_dir={data_dir}', '--model=random:tiny',
          f'--workdir={workdir}', '--mode=full', '--steps=8', '--batch_size=16',
          '--limit_train=128', '--limit_eval=32', '--checkpoint_every=2', '--lr=3e-3',
          '--augment', '--no-progress']


def test_stop_resume_equals_uninterrupted(tmp_path, data_dir, capsys):
  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  assert _cli(*_resume_args(straight, data_dir)) == 0
  assert _cli(*_resume_args(interrupted, data_dir), '--stop_after=3') == 0
  assert not json.load(open(os.path.join(interrupted, 'metrics.json')))['methods']
  assert trainer.load_checkpoint(interrupted, 'full')['step'] == 3
  assert _cli(*_resume_args(interrupted, data_dir), '--resume') == 0
  a = trainer.load_checkpoint(straight, 'full')
  b = trainer.load_checkpoint(interrupted, 'full')
  assert a['step'] == b['step'] == 8
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
               a['params'], b['params'])

  # A changed hyperparameter refuses to resume …
  capsys.readouterr()
  assert _cli(*_resume_args(interrupted, data_dir), '--resume', '--lr=1e-2') == 2
  assert 'cannot --resume: lr was 0.003' in capsys.readouterr().err
  # … and so does a damaged checkpoint, in one line.
  ckpt = os.path.join(trainer.checkpoint_dir(interrupted, 'full'), '8')
  for root, _, files in os.walk(ckpt):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'not a checkpoint')
  assert _cli(*_resume_args(interrupted, data_dir), '--resume') == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: cannot read checkpoint') and '\n' not in err


@pytest.mark.parametrize('flags,message', [
    (['--mode=fast'], "unknown mode 'fast'"),
    (['--mode=last:x'], 'expected last:N'),
    (['--mode=custom'], 'mode custom needs --rules'),
    (['--num_classes=7'], '--num_classes 7 but digits has 10 classes'),
    (['--mode=custom', '--rules=[["backbone/.*", null]]'], 'match no rule: head/bias'),
    (['--batch_size=5000'], 'batch size 5000 is larger than the 1437 training examples'),
])
def test_clear_one_line_errors(tmp_path, data_dir, capsys, flags, message):
  code = _cli('--dataset=digits', f'--data_dir={data_dir}', '--model=random:tiny',
              f'--workdir={tmp_path}', '--steps=1', '--no-progress', *flags)
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert code == 2
  assert err.startswith('error: ') and message in err, err
