"""probe.train through its entry points, on embedding datasets the tests write."""

import json
import os

import numpy as np
import pytest

import probe
from probe import core, train
from clip_transfer.data import embeddings
from clip_transfer.protocol import linear
from clip_transfer.protocol import validation
from clip_transfer.errors import UserError

META = {'model': {'name': 'random:tiny', 'checksum': 'abc'}, 'source': {'name': 'test'}}


def _write(path, splits, class_names):
  """Writes {split: (x, y)} as an embedding dataset; ids are '<split>/<index>'."""
  embeddings.write_dataset(
      str(path), {s: [(f'{s}/{i:05d}', x[i], int(y[i])) for i in range(len(y))]
                  for s, (x, y) in splits.items()}, class_names, META)
  return str(path)


def _run_cli(argv, capsys):
  train.main(argv)
  return capsys.readouterr()


def _separable(n, dim, num_classes, seed):
  """Classes on orthogonal axes with a wide margin: a linear head can get every example."""
  rng = np.random.default_rng(seed)
  y = np.arange(n) % num_classes
  x = rng.normal(scale=0.3, size=(n, dim))
  x[np.arange(n), y] += 5.0
  return x.astype(np.float32), y


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
  """The digits pixels (a fixed real set) through python -m probe.train, once per module."""
  from sklearn.datasets import load_digits
  d = load_digits()
  x, y = d.data.astype(np.float32), d.target
  split = validation.split([str(i) for i in range(len(y))], y, 0.2, 0)
  fit, ev = split.fit, split.val
  tmp = tmp_path_factory.mktemp('digits')
  ds = _write(tmp / 'emb', {'train': (x[fit], y[fit]), 'test': (x[ev], y[ev])},
              [str(i) for i in range(10)])
  out = str(tmp / 'out')
  train.main([f'--embeddings={ds}', f'--output_dir={out}', '--shots=1,5', '--seeds=2'])
  with open(os.path.join(out, 'metrics.json')) as f:
    return json.load(f), out, x[ev], y[ev]


def test_separable_features_give_100_percent_for_both_methods(tmp_path, capsys):
  x, y = _separable(120, 6, 4, 0)
  xe, ye = _separable(40, 6, 4, 1)
  ds = _write(tmp_path / 'emb', {'train': (x, y), 'test': (xe, ye)}, ['a', 'b', 'c', 'd'])
  out = _run_cli([f'--embeddings={ds}', f'--output_dir={tmp_path / "out"}'], capsys).out
  m = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
  for method in ('jax', 'sklearn'):
    assert m['methods'][method]['top1'] == 1.0
    assert m['methods'][method]['balanced_accuracy'] == 1.0
    assert m['methods'][method]['top5'] is None  # 4 classes
    assert m['methods'][method]['per_class'] == {'a': 1.0, 'b': 1.0, 'c': 1.0, 'd': 1.0}
    assert m['methods'][method]['wall_s'] > 0 and m['methods'][method]['l2'] in core.DEFAULT_L2_GRID
    assert method in out  # the summary table
  assert (m['num_train'], m['num_eval'], m['dim'], m['num_classes']) == (120, 40, 6, 4)
  assert m['metadata']['model'] == META['model']  # carried from the embedding dataset
  assert m['metadata']['counts']['train']['written'] == 120


def test_adam_solver_separates_too():
  x, y = _separable(120, 6, 4, 0)
  m = train.train_probe_arrays(x, y, x, y, list('abcd'), solver='adam', baselines=(),
                               progress=False)
  assert m['methods']['jax']['top1'] == 1.0 and m['methods']['jax']['solver'] == 'adam' and 'sklearn' not in m['methods']


def test_digits_jax_matches_sklearn_within_half_a_point(digits_run):
  m = digits_run[0]
  assert m['methods']['jax']['top5'] is not None
  assert m['methods']['jax']['top1'] > 0.9
  assert abs(m['methods']['jax']['top1'] - m['methods']['sklearn']['top1']) <= 0.005
  # Same objective at the same L2 (C = 1/(N*l2)): the sweeps agree on validation.
  for l2, s in m['methods']['jax']['sweep'].items():
    assert abs(s['val_top1'] - m['methods']['sklearn']['sweep'][l2]['val_top1']) <= 0.01


def test_saved_head_reloads_and_reproduces_eval_predictions(digits_run):
  m, out, x_eval, y_eval = digits_run
  head = probe.load_head(out)
  pred = probe.predict(out, x_eval)
  assert head.class_names == [str(i) for i in range(10)] and head.l2 == m['methods']['jax']['l2']
  assert np.mean(pred == y_eval) == pytest.approx(m['methods']['jax']['top1'], abs=1e-9)
  for c in range(10):
    assert np.mean(pred[y_eval == c] == c) == pytest.approx(m['methods']['jax']['per_class'][str(c)])
  # The Flax head applied to the saved params gives the same logits.
  z = (x_eval - head.mean) / head.std
  flax_logits = linear.make_head(10).apply({'params': head.params()}, z)
  np.testing.assert_allclose(np.asarray(flax_logits), head.logits(x_eval), rtol=1e-4, atol=1e-4)
  with pytest.raises(UserError, match='do not fit this head'):
    probe.predict(head, x_eval[:, :10])


def test_few_shot_fits_on_k_per_class_only(digits_run):
  m = digits_run[0]
  for k in (1, 5):
    for method in ('jax', 'sklearn'):
      e = m['methods'][f'{method}_{k}shot']
      assert e['shots'] == k and e['seeds'] == 2 and len(e['runs']) == 2
      assert all(r['num_fit'] == 10 * k for r in e['runs'])
      assert 0 < e['top1'] <= 1 and e['top1_std'] >= 0
  assert m['methods']['jax_5shot']['top1'] > m['methods']['jax_1shot']['top1']


def _noisy(n, dim, num_classes, signal, seed):
  rng = np.random.default_rng(seed)
  y = np.arange(n) % num_classes
  means = rng.normal(size=(num_classes, dim)) * signal
  return (means[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def test_chosen_l2_responds_to_the_data():
  # Few examples, many dimensions, weak signal: overfitting is the risk.
  xs, ys = _noisy(40, 60, 2, 0.15, 0)
  # Many examples, few dimensions, classes far apart: weak regularisation is best.
  xl, yl = _noisy(2000, 5, 2, 3.0, 1)
  small = train.train_probe_arrays(xs, ys, xs, ys, ['a', 'b'], val_fraction=0.5, progress=False)
  large = train.train_probe_arrays(xl, yl, xl, yl, ['a', 'b'], progress=False)
  for method in ('jax', 'sklearn'):
    assert small['methods'][method]['l2'] > large['methods'][method]['l2'], method


def test_eval_data_is_never_used_for_selection():
  x, y = _noisy(40, 60, 2, 0.15, 0)
  xe, ye = _noisy(30, 60, 2, 0.15, 5)
  rng = np.random.default_rng(0)
  a = train.train_probe_arrays(x, y, xe, ye, ['a', 'b'], val_fraction=0.5, progress=False)
  # Different eval features and shuffled labels: the sweep must not notice.
  b = train.train_probe_arrays(x, y, rng.normal(size=xe.shape), rng.permutation(ye), ['a', 'b'],
                               val_fraction=0.5, progress=False)
  for method in ('jax', 'sklearn'):
    assert a['methods'][method]['sweep'] == b['methods'][method]['sweep']
    assert a['methods'][method]['l2'] == b['methods'][method]['l2']


# --- errors: one clear line each --------------------------------------------------------------


def _cli_error(argv, capsys):
  with pytest.raises(SystemExit) as e:
    train.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith('error: ')
  return err


def test_not_an_embedding_dataset(tmp_path, capsys):
  (tmp_path / 'x.txt').write_text('hello')
  err = _cli_error([f'--embeddings={tmp_path}', f'--output_dir={tmp_path / "o"}'], capsys)
  assert 'not an embedding dataset' in err


@pytest.fixture(scope='module')
def small_ds(tmp_path_factory):
  x, y = _separable(12, 4, 2, 0)
  return _write(tmp_path_factory.mktemp('small') / 'emb', {'train': (x, y), 'test': (x, y)},
                ['a', 'b'])


def test_missing_split(small_ds, tmp_path, capsys):
  err = _cli_error([f'--embeddings={small_ds}', f'--output_dir={tmp_path}',
                    '--eval_split=validation'], capsys)
  assert "no split 'validation'" in err


def test_nan_embeddings_name_the_example(tmp_path, capsys):
  x, y = _separable(12, 4, 2, 0)
  x[7, 2] = np.nan
  ds = _write(tmp_path / 'emb', {'train': (x, y), 'test': (x, y)}, ['a', 'b'])
  err = _cli_error([f'--embeddings={ds}', f'--output_dir={tmp_path / "o"}'], capsys)
  assert 'NaN or inf' in err and 'train/00007' in err


def test_one_class_train_split(tmp_path, capsys):
  x, _ = _separable(12, 4, 2, 0)
  y = np.zeros(12, np.int64)
  ds = _write(tmp_path / 'emb', {'train': (x, y), 'test': (x, y)}, ['a', 'b'])
  err = _cli_error([f'--embeddings={ds}', f'--output_dir={tmp_path / "o"}'], capsys)
  assert 'single class' in err


@pytest.mark.parametrize('case, match', [
    ('width', 'width differs between splits'),
    ('label', 'out of range for 2 classes'),
    ('empty', "split 'test' is empty"),
    ('inf', 'NaN or inf'),
])
def test_array_errors(case, match):
  x, y = _separable(12, 4, 2, 0)
  xe, ye = x.copy(), y.copy()
  if case == 'width':
    xe = xe[:, :3]
  elif case == 'label':
    ye[3] = 2
  elif case == 'empty':
    xe, ye = xe[:0], ye[:0]
  elif case == 'inf':
    xe[0, 0] = np.inf
  with pytest.raises(UserError, match=match):
    train.train_probe_arrays(x, y, xe, ye, ['a', 'b'], progress=False)


def test_bad_flags(small_ds, tmp_path, capsys):
  base = [f'--embeddings={small_ds}', f'--output_dir={tmp_path}']
  assert 'positive numbers' in _cli_error(base + ['--l2_grid=0.1,-1'], capsys)
  assert 'unknown baseline' in _cli_error(base + ['--baselines=svm'], capsys)
  assert 'both' in _cli_error(base + ['--eval_split=train'], capsys)
  assert 'no validation examples' in _cli_error(base + ['--val_fraction=0'], capsys)


def test_bad_shots_are_refused_before_any_fit(small_ds, tmp_path, capsys):
  base = [f'--embeddings={small_ds}', f'--output_dir={tmp_path / "o"}']
  assert 'positive integers' in _cli_error(base + ['--shots=0'], capsys)
  assert 'positive integers' in _cli_error(base + ['--shots=-1'], capsys)
  assert 'has only' in _cli_error(base + ['--shots=50'], capsys)  # 6 per class in small_ds
  assert not (tmp_path / 'o' / 'metrics.json').exists()


def test_every_accuracy_has_an_interval_and_predictions(digits_run):
  m, _, _, y_eval = digits_run
  assert len(m['eval']['labels']) == m['num_eval'] == len(y_eval)
  assert m['validation']['num_examples'] > 0 and len(m['validation']['ids_sha256']) == 64
  assert m['final_fit'] == 'fit'
  for name, e in m['methods'].items():
    lo, hi = e['top1_ci95']
    assert lo <= e['top1'] <= hi and hi - lo < 0.2, name
    lo, hi = e['balanced_accuracy_ci95']
    assert lo <= e['balanced_accuracy'] <= hi, name
    if 'shots' not in e:
      assert len(e['predictions']) == m['num_eval']
      correct = np.mean(np.asarray(e['predictions']) == np.asarray(m['eval']['labels']))
      assert correct == pytest.approx(e['top1'])


def test_true_few_shot_selection_sees_only_the_shots(monkeypatch):
  """The code that picks a few-shot L2 receives the k x C shots and nothing else."""
  x, y = _noisy(400, 8, 4, 0.8, 0)
  xe, ye = _noisy(80, 8, 4, 0.8, 1)
  train_rows = {r.tobytes() for r in x}
  seen = []
  real = core.cv_select_l2

  def spy(method, x_shots, y_shots, num_classes, l2s):
    seen.append((method.name, len(x_shots), {r.tobytes() for r in x_shots}, np.bincount(y_shots)))
    return real(method, x_shots, y_shots, num_classes, l2s)

  monkeypatch.setattr(core, 'cv_select_l2', spy)
  m = train.train_probe_arrays(x, y, xe, ye, list('abcd'), shots=(1, 3), seeds=2, progress=False)
  assert len(seen) == 2 * 2 * 2  # 2 sizes x 2 seeds x 2 methods
  for name, n, rows, per_class in seen:
    assert n in (4, 12) and set(per_class) == {n // 4}  # k per class, nothing more
    assert rows <= train_rows  # training examples only (never eval, never extra labels)
  for k in (1, 3):
    assert m['methods'][f'jax_{k}shot']['selection'] == 'within-shots'
    assert all(r['num_fit'] == 4 * k for r in m['methods'][f'jax_{k}shot']['runs'])
  # k=1: the documented rule (the grid's largest L2), whatever the data.
  assert m['methods']['jax_1shot']['l2'] == [max(core.DEFAULT_L2_GRID)] * 2


def test_few_shot_on_the_validation_split_is_labelled(monkeypatch):
  x, y = _noisy(400, 8, 4, 0.8, 0)
  called = []
  monkeypatch.setattr(core, 'cv_select_l2', lambda *a: called.append(a))
  m = train.train_probe_arrays(x, y, x, y, list('abcd'), shots=(2,), seeds=1, baselines=(),
                               few_shot_selection='validation', progress=False)
  assert not called and m['methods']['jax_2shot']['selection'] == 'validation'


def test_validation_split_is_by_id_whatever_the_order():
  ids = [f'img{i:03d}' for i in range(60)]
  y = np.arange(60) % 3
  a = validation.split(ids, y, 0.2, 7)
  perm = np.random.default_rng(0).permutation(60)
  b = validation.split([ids[i] for i in perm], y[perm], 0.2, 7)
  assert sorted(ids[i] for i in a.val) == sorted(ids[perm[i]] for i in b.val)
  assert a.record == b.record and a.record['num_examples'] == 12
  assert validation.split(ids, y, 0.2, 8).record['ids_sha256'] != a.record['ids_sha256']
