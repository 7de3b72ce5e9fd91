"""finetune.train end to end on the built-in digits with random:tiny: accuracy, resume, errors."""

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from finetune import train
from finetune import checkpoints
from clip_transfer import models
from clip_transfer.data import preprocess
from clip_transfer.data import sources

pytestmark = pytest.mark.usefixtures('xla_cache')  # tests/conftest.py



@pytest.fixture(scope='module')
def data_dir(digits_data_dir):
  return digits_data_dir  # tests/conftest.py: prepared once per session, shared with other modules


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
            f'--workdir={workdir}', '--batch_size=64', '--no_progress']
  # Defaults for linear (solved exactly, as the probe); a small lr grid for full.
  assert _cli(*common, '--mode=linear') == 0
  assert _cli(*common, '--mode=full', '--epochs=6', '--lr=1e-3,3e-3') == 0
  with open(os.path.join(workdir, 'metrics.json')) as fh:
    return workdir, json.load(fh)


def test_metrics_schema(digits_run):
  _, m = digits_run
  assert (m['num_train'], m['num_eval'], m['num_classes']) == (1437, 360, 10)
  assert m['model']['name'] == 'random:tiny' and m['dataset']['name'] == 'digits'
  assert set(m['methods']) == {'linear', 'full'}
  for entry in m['methods'].values():
    for key in ('top1', 'top5', 'balanced_accuracy', 'per_class', 'wall_s', 'trainable_params',
                'top1_ci95', 'predictions', 'cost'):
      assert entry[key] is not None, key
    assert set(entry['per_class']) == {str(d) for d in range(10)}
  assert m['methods']['full']['images_per_s'] > 0
  assert m['methods']['linear']['trainable_params'] == 64 * 10 + 10
  assert m['methods']['full']['trainable_params'] > 50 * m['methods']['linear']['trainable_params']


def test_full_finetune_well_above_chance(digits_run):
  _, m = digits_run
  assert m['methods']['full']['top1'] > 0.7  # chance: 0.1


def test_full_chose_lr_and_step_on_validation(digits_run):
  _, m = digits_run
  full = m['methods']['full']
  assert full['grid'] == [1e-3, 3e-3] and set(full['curves']) == {'0.001', '0.003'}
  best = max((p['val_top1'], -p['val_loss'], float(lr), p['step'])
             for lr, curve in full['curves'].items() for p in curve)
  assert (full['selected']['lr'], full['selected']['step']) == (best[2], best[3])
  assert full['wall_s'] > sum(full['config_wall_s'].values())  # the sweep is inside the cost
  assert m['validation']['num_examples'] == m['num_train'] - m['num_fit'] > 100
  assert len(full['predictions']) == m['num_eval'] == len(m['eval']['labels'])
  lo, hi = full['top1_ci95']
  assert lo <= full['top1'] <= hi


def test_linear_agrees_with_the_probe_on_the_same_features(digits_run, data_dir):
  """`linear` and probe:jax solve one problem on one split: within 1 point (issue: 13 apart)."""
  from probe import train as probe_train  # pylint: disable=g-import-not-at-top

  _, m = digits_run
  pre = models.load('random:tiny')
  backbone, variables = pre.vision_tower()
  embed = jax.jit(lambda x: backbone.apply(
      variables, preprocess.normalize(x, pre.preprocess)).pooler_output)
  src = sources.open_source('digits', data_dir)
  split = {}
  for name in ('train', 'test'):
    ex = list(src.iter_examples(name))
    images = np.stack([preprocess.prepare(e.image, pre.preprocess) for e in ex])
    split[name] = (np.asarray(embed(images)), np.array([e.label for e in ex]), [e.id for e in ex])
  p = probe_train.train_probe_arrays(
      split['train'][0], split['train'][1], split['test'][0], split['test'][1],
      [str(d) for d in range(10)], ids_train=split['train'][2], ids_eval=split['test'][2],
      baselines=(), progress=False)
  assert p['validation'] == m['validation']  # the same held-out examples
  assert p['eval']['ids_sha256'] == m['eval']['ids_sha256']
  assert abs(p['methods']['jax']['top1'] - m['methods']['linear']['top1']) <= 0.01
  assert p['methods']['jax']['l2'] == m['methods']['linear']['selected']['l2']


def _resume_args(workdir, data_dir):
  return ['--dataset=digits', f'--data_dir={data_dir}', '--model=random:tiny',
          f'--workdir={workdir}', '--mode=full', '--steps=8', '--batch_size=16',
          '--limit_train=128', '--limit_eval=32', '--eval_every=2', '--lr=3e-3',
          '--augment', '--no_progress']


@pytest.fixture(scope='module')
def straight(tmp_path_factory, data_dir):
  """The uninterrupted run (``_resume_args``) the resume tests compare with."""
  work = str(tmp_path_factory.mktemp('straight') / 'work')
  assert _cli(*_resume_args(work, data_dir)) == 0
  return work


def test_stop_resume_equals_uninterrupted(straight, tmp_path, data_dir, capsys, caplog,
                                          monkeypatch, count_compiles):
  interrupted = str(tmp_path / 'interrupted')
  assert _cli(*_resume_args(interrupted, data_dir), '--stop_after=3') == 0
  assert not json.load(open(os.path.join(interrupted, 'metrics.json')))['methods']
  saved = checkpoints.load_checkpoint(interrupted, 'full', 3e-3)
  assert saved['step'] == 3
  assert saved['opt_state']['hyperparams'] == {'learning_rate': np.float32(3e-3),
                                               'weight_decay': np.float32(1e-4)}
  with count_compiles('train_step') as compiles:
    assert _cli(*_resume_args(interrupted, data_dir), '--resume') == 0
  assert compiles.count == 1  # the restored state fits the step compiled for a fresh one
  a = checkpoints.load_checkpoint(straight, 'full', 3e-3)
  b = checkpoints.load_checkpoint(interrupted, 'full', 3e-3)
  assert a['step'] == b['step'] == 8
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
               a['params'], b['params'])
  # Stopped before the first validation score: the resume still starts from the saved state.
  early = str(tmp_path / 'early')
  assert _cli(*_resume_args(early, data_dir), '--stop_after=1') == 0
  with caplog.at_level(logging.INFO, logger='finetune.sweep'):
    assert _cli(*_resume_args(early, data_dir), '--resume') == 0
  assert 'resumed from step 1' in caplog.text
  c = checkpoints.load_checkpoint(early, 'full', 3e-3)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
               a['params'], c['params'])
  assert (json.load(open(os.path.join(early, 'metrics.json')))['methods']['full']['top1'] ==
          json.load(open(os.path.join(straight, 'metrics.json')))['methods']['full']['top1'])

  # Checkpoints from before the lr was data hold the optimizer state without hyperparams
  # (chain(clip, multi_transform), the inner state of today's): written so here, they are
  # carried over, and the resumed run is still the uninterrupted one.
  old = str(tmp_path / 'old')
  save = checkpoints.Checkpoints.save
  monkeypatch.setattr(checkpoints.Checkpoints, 'save', lambda self, record, state, best: save(
      self, record, state.replace(opt_state=state.opt_state.inner_state), best))
  assert _cli(*_resume_args(old, data_dir), '--stop_after=3') == 0
  monkeypatch.undo()
  assert isinstance(checkpoints.load_checkpoint(old, 'full', 3e-3)['opt_state'], list)
  caplog.clear()
  with caplog.at_level(logging.INFO, logger='finetune.checkpoints'), \
      count_compiles('train_step') as compiles:
    assert _cli(*_resume_args(old, data_dir), '--resume') == 0
  assert 'an optimizer state from before the lr was data; carried over' in caplog.text
  assert compiles.count == 1
  d = checkpoints.load_checkpoint(old, 'full', 3e-3)
  assert d['step'] == 8 and 'hyperparams' in d['opt_state']
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
               a['params'], d['params'])
  assert (json.load(open(os.path.join(old, 'metrics.json')))['methods']['full']['curves'] ==
          json.load(open(os.path.join(straight, 'metrics.json')))['methods']['full']['curves'])

  # A changed hyperparameter refuses to resume …
  capsys.readouterr()
  assert _cli(*_resume_args(interrupted, data_dir), '--resume', '--weight_decay=0.5') == 2
  assert 'cannot --resume: weight_decay was 0.0001' in capsys.readouterr().err
  # … and so does a damaged checkpoint, in one line.
  ckpt = checkpoints.checkpoint_dir(interrupted, 'full', 3e-3)
  for root, _, files in os.walk(ckpt):
    for f in files:
      if f == 'curve.json':
        continue
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
    (['--mode=linear', '--wise=0.5'], '--wise does not apply: --mode linear trains only the head'),
    (['--final_fit=all'], '--final_fit must be one of fit, fit+validation'),
    (['--final_fit=fit+validation', '--mode=full', '--wise=0.5'], 'use one or the other'),
    (['--lr=nan'], '--lr values must be finite and > 0'),
    (['--lr=0'], '--lr values must be finite and > 0'),
    (['--mode=custom', '--rules=[["backbone/.*", 0], ["head/.*", 1]]'], 'multiplier > 0'),
])
def test_clear_one_line_errors(tmp_path, data_dir, capsys, flags, message):
  code = _cli('--dataset=digits', f'--data_dir={data_dir}', '--model=random:tiny',
              f'--workdir={tmp_path}', '--steps=1', '--no_progress', *flags)
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert code == 2
  assert err.startswith('error: ') and message in err, err


def test_a_diverging_lr_is_dropped_and_all_diverging_stops_in_one_line(tmp_path, data_dir,
                                                                        capsys):
  common = ['--dataset=digits', f'--data_dir={data_dir}', '--model=random:tiny', '--mode=full',
            '--steps=6', '--eval_every=2', '--batch_size=32', '--limit_train=128',
            '--limit_eval=32', '--warmup=0', '--clip_norm=0', '--log_every=1', '--no_progress']
  work = str(tmp_path / 'one')
  assert _cli(*common, f'--workdir={work}', '--lr=1e-3,1e30') == 0
  full = json.load(open(os.path.join(work, 'metrics.json')))['methods']['full']
  assert set(full['diverged']) == {'1e+30'} and full['selected']['lr'] == 1e-3
  assert np.isfinite(full['top1'])
  capsys.readouterr()
  assert _cli(*common, f'--workdir={tmp_path / "all"}', '--lr=1e30') == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith('error: ') and 'every learning rate diverged' in err


def test_resume_is_exact_after_a_sigkill_between_the_state_and_its_curve_point(
    straight, tmp_path, data_dir, xla_cache_env):
  """Killed after step 6's state was saved but before its validation point was (issue 22 #9)."""
  killed = str(tmp_path / 'killed')
  # The real CLI in a subprocess whose curve write at step 6 is replaced by SIGKILL.
  script = (
      'import os, signal, sys\n'
      'from finetune import checkpoints, train\n'
      'save_record = checkpoints.Checkpoints.save_record\n'
      'def killing(self, record):\n'
      '  if record["curve"] and record["curve"][-1]["step"] == 6:\n'
      '    os.kill(os.getpid(), signal.SIGKILL)\n'
      '  save_record(self, record)\n'
      'checkpoints.Checkpoints.save_record = killing\n'
      'sys.exit(train.main(sys.argv[1:]))\n')
  # The session's compilation cache: the subprocess reads back what ``straight`` compiled.
  env = {**os.environ, **xla_cache_env, 'PYTHONPATH': os.pathsep.join(filter(None, [
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get('PYTHONPATH')]))}
  p = subprocess.run([sys.executable, '-c', script, *_resume_args(killed, data_dir)], env=env,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == -9, p.stderr[-2000:]
  curve_file = os.path.join(checkpoints.checkpoint_dir(killed, 'full', 3e-3), 'curve.json')
  assert [q['step'] for q in json.load(open(curve_file))['curve']] == [2, 4]  # 6 was lost
  assert checkpoints.load_checkpoint(killed, 'full', 3e-3)['step'] == 6
  assert _cli(*_resume_args(killed, data_dir), '--resume') == 0
  a, b = (json.load(open(os.path.join(w, 'metrics.json')))['methods']['full']
          for w in (straight, killed))
  assert a['curves'] == b['curves'] and [q['step'] for q in b['curves']['0.003']] == [2, 4, 6, 8]
  assert a['selected'] == b['selected']
  assert (a['top1'], a['predictions']) == (b['top1'], b['predictions'])
  best_a = checkpoints.load_checkpoint(straight, 'full', 3e-3, 'best')
  best_b = checkpoints.load_checkpoint(killed, 'full', 3e-3, 'best')
  assert best_a['step'] == best_b['step'] == a['selected']['step']


def test_files_the_tool_did_not_write_under_checkpoints_are_refused_and_kept(tmp_path, data_dir,
                                                                            capsys):
  """Issue 22 #10: a user's file below checkpoints/ is never removed; the run is refused."""
  work = tmp_path / 'w'
  args = ['--dataset=digits', f'--data_dir={data_dir}', '--model=random:tiny', f'--workdir={work}',
          '--mode=full', '--steps=2', '--batch_size=16', '--limit_train=64', '--limit_eval=16',
          '--lr=1e-3', '--no_progress']
  assert _cli(*args) == 0
  notes = work / 'checkpoints' / 'full' / 'lr=0.001' / 'my_notes.txt'
  notes.write_text('mine')
  capsys.readouterr()
  assert _cli(*args) == 2
  err = capsys.readouterr().err.strip()
  assert '\n' not in err and 'holds files this tool did not write' in err
  assert 'checkpoints/full/lr=0.001/my_notes.txt' in err
  assert notes.read_text() == 'mine'
  notes.unlink()
  assert _cli(*args) == 0  # only its own files: replaced without a word


def test_default_batch_size_fits_small_data_with_a_note(tmp_path, data_dir, caplog):
  """Issue 22: the default --batch_size=64 neither refuses linear nor 40 training examples."""
  work = str(tmp_path / 'w')
  with caplog.at_level(logging.INFO, logger='finetune.trainer'):
    assert _cli('--dataset=digits', f'--data_dir={data_dir}', '--model=random:tiny',
                f'--workdir={work}', '--mode=linear,full', '--steps=2', '--lr=1e-3',
                '--limit_train=40', '--limit_eval=16', '--no_progress') == 0
  fit = json.load(open(os.path.join(work, 'metrics.json')))
  assert fit['num_fit'] < 40 and set(fit['methods']) == {'linear', 'full'}
  assert fit['methods']['full']['batch_size'] == fit['num_fit']
  assert f'--batch_size 64 is larger than the {fit["num_fit"]} fit examples' in caplog.text


def test_wise_with_a_solved_mode_is_explained(tmp_path, data_dir, caplog, count_compiles):
  work = str(tmp_path / 'w')
  with caplog.at_level(logging.INFO, logger='finetune.trainer'), \
      count_compiles('eval_step') as evals:
    assert _cli('--dataset=digits', f'--data_dir={data_dir}', '--model=random:tiny',
                f'--workdir={work}', '--mode=linear,full', '--steps=2', '--lr=1e-3',
                '--batch_size=16', '--limit_train=64', '--limit_eval=16', '--wise=0,1',
                '--no_progress') == 0
  assert '--wise applies to full only: --mode linear trains only the head' in caplog.text
  methods = json.load(open(os.path.join(work, 'metrics.json')))['methods']
  assert set(methods) == {'linear', 'full', 'full+wise'}
  assert evals.count == 1  # validation, the eval and every α of WiSE-FT: one compiled eval step


def test_weight_decay_grid_crossed_with_lr_and_chosen_on_validation(tmp_path, data_dir,
                                                                   count_compiles):
  """Issue 21: --weight_decay takes a list, crossed with --lr; the choice is recorded."""
  work = str(tmp_path / 'w')
  with count_compiles('train_step') as train_compiles, count_compiles('eval_step') as evals:
    assert _cli('--dataset=digits', f'--data_dir={data_dir}', '--model=random:tiny',
                f'--workdir={work}', '--mode=full', '--steps=4', '--eval_every=2',
                '--lr=1e-3,3e-3', '--weight_decay=0,0.5', '--batch_size=16', '--limit_train=64',
                '--limit_eval=16', '--no_progress') == 0
  # The lr and the weight decay are data in the optimizer state: the four configurations,
  # their validation scores and the final eval run one compiled train step and one eval step.
  assert (train_compiles.count, evals.count) == (1, 1)
  full = json.load(open(os.path.join(work, 'metrics.json')))['methods']['full']
  keys = {'0.001,wd=0', '0.003,wd=0', '0.001,wd=0.5', '0.003,wd=0.5'}
  assert set(full['curves']) == keys and full['weight_decay_grid'] == [0.0, 0.5]
  best = max((p['val_top1'], -p['val_loss'], -float(k.split(',')[0]),
              -float(k.split('=')[1]), p['step'])
             for k, curve in full['curves'].items() for p in curve)
  assert full['selected'] == {'lr': -best[2], 'weight_decay': -best[3], 'step': best[4]}
  assert full['weight_decay'] == full['selected']['weight_decay']
  for k in keys:
    lr, wd = float(k.split(',')[0]), float(k.split('=')[1])
    assert checkpoints.load_checkpoint(work, 'full', lr, 'latest', weight_decay=wd)['step'] == 4
  # Kernels decay only where asked: the two decays of one lr end at different weights.
  a = checkpoints.load_checkpoint(work, 'full', 1e-3, weight_decay=0.0)['params']
  b = checkpoints.load_checkpoint(work, 'full', 1e-3, weight_decay=0.5)['params']
  assert not np.allclose(a['head']['kernel'], b['head']['kernel'])


def test_final_fit_on_fit_and_validation_is_labelled_and_refits(tmp_path, data_dir,
                                                                count_compiles):
  """Issue 21: the chosen configuration trained again on fit ∪ validation, and said so."""
  work = str(tmp_path / 'w')
  common = ['--dataset=digits', f'--data_dir={data_dir}', '--model=random:tiny',
            '--mode=linear,full', '--steps=4', '--eval_every=2', '--lr=1e-3', '--batch_size=16',
            '--limit_train=96', '--limit_eval=32', '--no_progress']
  with count_compiles('train_step') as train_compiles, count_compiles('eval_step') as evals:
    assert _cli(*common, f'--workdir={work}', '--final_fit=fit+validation') == 0
  assert (train_compiles.count, evals.count) == (1, 1)  # the refit and its eval reuse them
  m = json.load(open(os.path.join(work, 'metrics.json')))
  assert m['final_fit'] == 'fit+validation'
  assert {e['final_fit'] for e in m['methods'].values()} == {'fit+validation'}
  full = m['methods']['full']
  final = checkpoints.load_checkpoint(work, 'full', 1e-3, 'final')
  best = checkpoints.load_checkpoint(work, 'full', 1e-3, 'best')
  assert final['step'] == best['step'] == full['selected']['step']
  assert not np.allclose(final['params']['head']['kernel'], best['params']['head']['kernel'])
  # The selection is the default run's; only what is scored was trained on more examples.
  plain = str(tmp_path / 'plain')
  assert _cli(*common, f'--workdir={plain}') == 0
  p = json.load(open(os.path.join(plain, 'metrics.json')))
  assert p['final_fit'] == 'fit'
  for name in ('linear', 'full'):
    assert p['methods'][name]['selected'] == m['methods'][name]['selected']
  assert (p['methods']['linear']['predictions'] != m['methods']['linear']['predictions']
          or p['methods']['linear']['top1'] != m['methods']['linear']['top1']
          or p['methods']['full']['predictions'] != full['predictions'])


def test_best_is_latest_s_files_linked_one_step_kept(tmp_path):
  """best/ is latest/'s step hard-linked in (no second Orbax save); an older best and a copy a
  crash cut short are gone; both restore the same state."""
  import flax  # pylint: disable=g-import-not-at-top

  @flax.struct.dataclass
  class State:
    step: jax.Array
    params: dict

  ckpt = checkpoints.Checkpoints(str(tmp_path / 'lr=0.1'))
  os.makedirs(ckpt.path)
  state = lambda step: State(np.int32(step), {'w': np.full((3, 4), step, np.float32)})
  ckpt.save({'curve': []}, state(2), best=True)
  ckpt.save({'curve': []}, state(4), best=False)
  os.makedirs(os.path.join(ckpt.path, checkpoints.BEST_TMP, 'default'))  # a crash's leftover
  ckpt.save({'curve': []}, state(6), best=True)
  assert os.listdir(os.path.join(ckpt.path, 'best')) == ['6']
  assert os.listdir(os.path.join(ckpt.path, 'latest')) == ['6']
  assert not os.path.exists(os.path.join(ckpt.path, checkpoints.BEST_TMP))
  for root, _, files in os.walk(os.path.join(ckpt.path, 'latest', '6')):
    for name in files:
      linked = os.path.join(ckpt.path, 'best', os.path.relpath(os.path.join(root, name),
                                                               os.path.join(ckpt.path, 'latest')))
      assert os.path.samefile(os.path.join(root, name), linked)
  for which in ('latest', 'best'):
    step, saved = checkpoints.rungs.restore_here(os.path.join(ckpt.path, which))
    assert step == 6
    np.testing.assert_array_equal(saved['params']['w'], np.full((3, 4), 6, np.float32))
