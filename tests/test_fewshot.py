"""The zero-shot-anchored probe, --final_fit and few-shot draws by id, through probe.train."""

import json
import os

import numpy as np
import pytest

import probe
from probe import train
from clip_transfer.data import embeddings
from clip_transfer.protocol import heads
from clip_transfer.protocol import linear
from clip_transfer.protocol import methods
from clip_transfer.protocol import metrics as metrics_lib
from clip_transfer.protocol import validation

SHA = 'ab' * 32
NAMES = ['a', 'b', 'c', 'd', 'e']


def _synthetic(seed, n_train, n_eval, num_classes=5, dim=16, text_noise=1.5, img_noise=3.0):
  """Projected features around class means, and text embeddings that point near them.

  The text embeddings are the means plus noise: a zero-shot head that is good
  but imperfect (well above chance, well below what labels can reach).
  """
  rng = np.random.default_rng(seed)
  mu = rng.normal(size=(num_classes, dim))
  mu /= np.linalg.norm(mu, axis=1, keepdims=True)
  text = mu + text_noise * rng.normal(size=mu.shape) / np.sqrt(dim)
  text /= np.linalg.norm(text, axis=1, keepdims=True)

  def draw(n):
    y = np.arange(n) % num_classes
    return (mu[y] + img_noise * rng.normal(size=(n, dim)) / np.sqrt(dim)).astype(np.float32), y

  zs = heads.ZeroshotHead(text.astype(np.float32), float(np.log(100.0)),
                          NAMES[:num_classes], ['a photo of a {}.'])
  return draw(n_train), draw(n_eval), zs


def _zeroshot_pred(zs, x):
  kernel, bias = zs.dense()
  return np.argmax(linear.l2_normalize(x) @ kernel + bias, axis=1)


def test_anchored_beats_zero_shot_at_one_shot_and_the_plain_probe_at_every_k():
  (x, y), (xe, ye), zs = _synthetic(0, 200, 500)
  zs_top1 = float(np.mean(_zeroshot_pred(zs, xe) == ye))
  shots = (1, 2, 4, 8)
  # 30% held out: 60 validation examples, so the full-data choice is not a coin toss.
  # max_iter: the same budget for both methods, enough for these 16-d problems, keeps it quick.
  common = dict(shots=shots, seeds=2, val_fraction=0.3, max_iter=300, progress=False)
  anchored = train.train_probe_arrays(x, y, xe, ye, NAMES, method='zeroshot-anchored',
                                      zeroshot_head=zs, **common)['methods']
  plain = train.train_probe_arrays(x, y, xe, ye, NAMES, baselines=(), **common)['methods']
  assert 0.3 < zs_top1 < 0.7  # good but imperfect: chance is 0.2
  # Within noise: two binomial standard errors of a mean over 2 x 500 predictions.
  noise = 2 * np.sqrt(0.25 / (2 * len(ye)))
  assert anchored['zeroshot-anchored_1shot']['top1'] >= zs_top1 - noise
  for k in shots:
    a, p = anchored[f'zeroshot-anchored_{k}shot'], plain[f'jax_{k}shot']
    assert a['top1'] >= p['top1'] - noise, (k, a['top1'], p['top1'])
  # k = 1: the documented rule, the grid's largest penalty (inf: zero-shot itself).
  assert anchored['zeroshot-anchored_1shot']['l2'] == ['inf'] * 2
  assert anchored['zeroshot-anchored_1shot']['top1'] == pytest.approx(zs_top1)
  # With more labels the anchored head moves off zero-shot, and gains.
  assert anchored['zeroshot-anchored_8shot']['top1'] > zs_top1 + noise
  assert anchored['zeroshot-anchored']['top1'] > zs_top1 + noise


def test_a_large_penalty_reproduces_zero_shot_predictions_exactly():
  (x, y), (xe, _), zs = _synthetic(1, 100, 300)
  method = methods.AnchoredMethod(anchor=zs.head.T, scale=float(np.exp(zs.logit_scale)))
  std = method.standardizer(x)
  fitted, info = method.fit_grid(std(x), y, len(NAMES), [1e-3, 1e6, float('inf')])
  want = _zeroshot_pred(zs, xe)
  for i in (1, 2):
    assert np.array_equal(np.argmax(method.logits(fitted, i, std(xe), len(NAMES)), axis=1), want)
  # inf is no solve at all: zero-shot's own logits.
  np.testing.assert_allclose(method.logits(fitted, 2, std(xe), len(NAMES)),
                             linear.l2_normalize(xe) @ zs.dense()[0], rtol=1e-5, atol=1e-4)
  assert info['n_iter'][2] == 0 and all(info['converged'])
  # A small penalty moves away from zero-shot.
  assert not np.array_equal(np.argmax(method.logits(fitted, 0, std(xe), len(NAMES)), axis=1), want)


def test_few_shot_draws_are_by_id_whatever_the_order():
  ids = [f'img{i:03d}' for i in range(60)]
  y = np.arange(60) % 3
  perm = np.random.default_rng(0).permutation(60)
  for k in (1, 4):
    a = validation.few_shot(ids, y, k, 7)
    b = validation.few_shot([ids[i] for i in perm], y[perm], k, 7)
    assert sorted(ids[i] for i in a) == sorted(ids[perm[i]] for i in b)
    assert np.array_equal(np.bincount(y[a]), [k] * 3)
  # The 4-shot draw holds the 1-shot one; another seed draws others.
  assert set(validation.few_shot(ids, y, 1, 7)) <= set(validation.few_shot(ids, y, 4, 7))
  assert set(validation.few_shot(ids, y, 4, 8)) != set(validation.few_shot(ids, y, 4, 7))


# --- through python -m probe.train -------------------------------------------------------


def _dataset(path, splits, projected=True, sha=SHA):
  """{split: (projected, labels)}; the pooled embedding is a fixed random projection of it."""
  w = np.random.default_rng(9).normal(size=(16, 12)).astype(np.float32)
  rows = {s: [(f'{s}/{i:04d}', x[i] @ w, int(y[i])) + ((x[i],) if projected else ())
              for i in range(len(y))] for s, (x, y) in splits.items()}
  embeddings.write_dataset(str(path), rows, NAMES,
                           {'model': {'name': 'random:tiny', 'params_sha256': sha},
                            'source': {'name': 'synthetic', 'spec': 'synthetic'}})
  return str(path)


def _zeroshot_dir(path, zs, sha=SHA, dataset='synthetic'):
  os.makedirs(path, exist_ok=True)
  zs.save(str(path))
  m = metrics_lib.header('zeroshot', dataset={'spec': dataset, 'name': dataset, 'version': None,
                                              'train_split': None, 'eval_split': 'test'},
                         model={'name': 'random:tiny', 'weights_sha256': sha},
                         class_names=zs.class_names, num_train=0, num_eval=0)
  m['methods']['zeroshot'] = {'top1': 0.5}
  metrics_lib.write(str(path), m)
  return str(path)


@pytest.fixture(scope='module')
def synthetic_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('anchored')
  (x, y), (xe, ye), zs = _synthetic(2, 150, 100)
  ds = _dataset(tmp / 'emb', {'train': (x, y), 'test': (xe, ye)})
  zs_dir = _zeroshot_dir(tmp / 'zs', zs)
  out = tmp / 'out'
  train.main([f'--embeddings={ds}', f'--output_dir={out}', '--method=zeroshot-anchored',
              f'--zeroshot={zs_dir}', '--shots=1,2', '--seeds=2', '--final_fit=fit+validation',
              '--no_progress'])
  m = json.loads((out / 'metrics.json').read_text())
  return m, str(out), ds, zs_dir, zs, (xe, ye)


def test_cli_anchored_run_records_and_saves_its_head(synthetic_run):
  m, out, _, zs_dir, zs, (xe, ye) = synthetic_run
  e = m['methods']['zeroshot-anchored']
  assert m['method'] == 'zeroshot-anchored' and m['feature'] == 'projected (L2-normalised)'
  assert m['final_fit'] == e['final_fit'] == 'fit+validation' and 'refit' in e['cost']
  assert m['l2_grid'] == [1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0, 100.0, 'inf']
  assert m['zeroshot']['dir'] == zs_dir and set(m['methods']) == {
      'zeroshot-anchored', 'zeroshot-anchored_1shot', 'zeroshot-anchored_2shot'}  # no baseline
  for k in (1, 2):
    runs = m['methods'][f'zeroshot-anchored_{k}shot']['runs']
    assert [r['num_fit'] for r in runs] == [5 * k] * 2 and len(runs[0]['predictions']) == 100
    assert runs[0]['draw_sha256'] != runs[1]['draw_sha256']
  # The saved head reads projected features (normalised inside) and gives the metrics' predictions.
  head = probe.load_head(out)
  assert head.feature == 'projected' and head.class_names == NAMES
  order = validation.eval_order([f'test/{i:04d}' for i in range(len(ye))])
  assert probe.predict(head, xe[order]).tolist() == e['predictions']
  # Fine-tune's --head_init=probe:DIR folds it into a head on normalised projected features.
  kernel, bias = head.folded()
  np.testing.assert_allclose(linear.l2_normalize(xe) @ kernel + bias, head.logits(xe), atol=1e-3)


def test_cli_final_fit_refits_on_fit_and_validation(synthetic_run):
  m, _, ds, _, _, _ = synthetic_run
  x, y, _ = embeddings.read_split(ds, 'train')
  xe, ye, _ = embeddings.read_split(ds, 'test')
  kw = dict(baselines=(), l2_grid=(1e-3, 1.0), progress=False)
  fit = train.train_probe_arrays(x, y, xe, ye, NAMES, **kw)
  both = train.train_probe_arrays(x, y, xe, ye, NAMES, final_fit='fit+validation', **kw)
  assert fit['final_fit'] == 'fit' and both['final_fit'] == 'fit+validation'
  # Same sweep and choice; another final model.
  assert fit['methods']['jax']['sweep'] == both['methods']['jax']['sweep']
  assert fit['methods']['jax']['l2'] == both['methods']['jax']['l2']
  assert fit['methods']['jax']['predictions'] != both['methods']['jax']['predictions']


def _error(argv, capsys):
  with pytest.raises(SystemExit) as e:
    train.main(argv)
  err = capsys.readouterr().err
  assert e.value.code == 2 and 'Traceback' not in err and err.startswith('error: '), err
  assert len(err.strip().splitlines()) == 1, err
  return err


def test_cli_refusals(synthetic_run, tmp_path, capsys):
  _, _, ds, zs_dir, zs, _ = synthetic_run
  base = [f'--embeddings={ds}', f'--output_dir={tmp_path / "o"}']
  anchored = base + ['--method=zeroshot-anchored']
  assert 'needs --zeroshot' in _error(anchored, capsys)
  assert 'drop --zeroshot' in _error(base + [f'--zeroshot={zs_dir}'], capsys)
  assert 'plain probe' in _error(anchored + [f'--zeroshot={zs_dir}', '--baselines=sklearn'],
                                 capsys)
  assert 'positive numbers' in _error(base + ['--l2_grid=1,inf'], capsys)
  # A vision-only model's dataset has no projected feature (nor a text tower to anchor at).
  (x, y), _, _ = _synthetic(3, 20, 10)
  vision = _dataset(tmp_path / 'vision', {'train': (x, y), 'test': (x, y)}, projected=False)
  assert 'vision-only' in _error([f'--embeddings={vision}', f'--output_dir={tmp_path / "o"}',
                                  '--method=zeroshot-anchored', f'--zeroshot={zs_dir}'], capsys)
  # A zero-shot head from other weights, or for other classes.
  other = _zeroshot_dir(tmp_path / 'other_weights', zs, sha='cd' * 32)
  assert 'other weights' in _error(anchored + [f'--zeroshot={other}'], capsys)
  four = heads.ZeroshotHead(zs.head[:4], zs.logit_scale, NAMES[:4], zs.templates)
  other = _zeroshot_dir(tmp_path / 'other_classes', four)
  assert 'classifies 4 classes' in _error(anchored + [f'--zeroshot={other}'], capsys)
  renamed = heads.ZeroshotHead(zs.head, zs.logit_scale, list('vwxyz'), zs.templates)
  other = _zeroshot_dir(tmp_path / 'other_dataset', renamed, dataset='cifar10')
  assert 'classifies 5 classes' in _error(anchored + [f'--zeroshot={other}'], capsys)
  assert not (tmp_path / 'o' / 'metrics.json').exists()


# --- report.compare: the anchored rung on the ladder and in the few-shot table ----------------


def _report_runs(tmp_path):
  """A zero-shot, a plain-probe and an anchored-probe metrics.json on the same 200 eval examples."""
  labels = np.arange(200) % 5
  rng = np.random.default_rng(0)

  def preds(accuracy):  # right on a random `accuracy` share of the examples, wrong elsewhere
    right = rng.random(200) < accuracy
    return np.where(right, labels, (labels + 1) % 5)

  def entry(p, **extra):
    return {**metrics_lib.classification(np.eye(5)[p], labels, NAMES), 'wall_s': 1.0,
            'trainable_params': 85, **extra}

  def few(p_by_seed, draws):
    correct = np.mean([p == labels for p in p_by_seed], axis=0)
    return {'shots': 1, 'seeds': 2, 'selection': 'within-shots', 'top1': float(correct.mean()),
            'top1_std': 0.01, **metrics_lib.summarise(correct, labels, NAMES),
            'runs': [{'predictions': p.tolist(), 'draw_sha256': d} for p, d in zip(p_by_seed, draws)]}

  def header(stage, **kw):
    h = metrics_lib.header(stage, dataset={'spec': 's', 'name': 's', 'version': None,
                                           'train_split': 'train', 'eval_split': 'test'},
                           model={'name': 'random:tiny', 'weights_sha256': SHA},
                           class_names=NAMES, num_train=100, num_eval=200,
                           eval={'ids_sha256': 'e' * 64, 'labels': labels.tolist()}, **kw)
    if stage == 'probe':
      h['validation'] = {'fraction': 0.1, 'seed': 0, 'num_examples': 10, 'ids_sha256': 'v' * 64}
    return h

  zs = header('zeroshot')
  zs_pred = preds(0.6)
  zs['methods']['zeroshot'] = entry(zs_pred)
  plain = header('probe', final_fit='fit')
  plain['methods'] = {'jax': entry(preds(0.9)),
                      'jax_1shot': few([preds(0.2), preds(0.2)], ['d0', 'd1'])}
  anchored = header('probe', final_fit='fit+validation')
  anchored['methods'] = {  # at 1 shot the anchored probe stays at zero-shot (its k=1 rule)
      'zeroshot-anchored': entry(preds(0.9), final_fit='fit+validation'),
      'zeroshot-anchored_1shot': few([zs_pred, zs_pred], ['d0', 'd1'])}
  for name, m in (('zeroshot', zs), ('probe', plain), ('anchored', anchored)):
    os.makedirs(tmp_path / name)
    metrics_lib.write(str(tmp_path / name), m)
  return str(tmp_path)


def test_report_puts_the_anchored_probe_beside_the_plain_probe_and_zero_shot(tmp_path):
  from report import compare  # pylint: disable=g-import-not-at-top
  md = compare.compare([_report_runs(tmp_path / 'run')], str(tmp_path / 'out'))
  main, few = md.split('## Few-shot')
  names = [l.split('|')[1].strip() for l in main.splitlines()
           if l.startswith('| ') and not l.startswith('| method')]
  # The ladder: zero-shot, the plain probe, the anchored one (its refit labelled).
  assert names == ['zeroshot:zeroshot', 'probe:jax',
                   'probe:zeroshot-anchored [fit+validation]']
  rows = {l.split('|')[1].strip(): [c.strip() for c in l.split('|')[2:-1]]
          for l in few.splitlines() if l.startswith('| ') and not l.startswith('| method')}
  assert rows['zeroshot:zeroshot'][:3] == ['0', '—', 'no labels']
  # 1 shot: the plain probe is worse than zero-shot; the anchored one is not, and beats the
  # plain probe paired on the same draws.
  assert rows['probe:jax'][6].endswith('worse') and rows['probe:jax'][7] == '(reference)'
  assert rows['probe:zeroshot-anchored'][6].endswith('no detectable difference')
  assert rows['probe:zeroshot-anchored'][7].startswith('+0.')
  assert rows['probe:zeroshot-anchored'][7].endswith('better')
  assert os.path.getsize(tmp_path / 'out' / 'report.png') > 5000


def test_paired_difference_of_seed_means_is_a_sign_test_over_examples():
  from clip_transfer.protocol import stats  # pylint: disable=g-import-not-at-top
  a = np.array([1.0, 0.5, 0.5, 0.0, 1.0, 1.0])  # fraction of seeds right, per example
  b = np.array([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
  d = stats.paired_difference(a, b)
  assert d['diff'] == pytest.approx(np.mean(a - b))
  assert (d['only_a'], d['only_b']) == (3, 1)  # examples where a is ahead / behind
  assert d['mcnemar_p'] == stats.mcnemar_exact(3, 1)
  assert d['ci95'][0] <= d['diff'] <= d['ci95'][1]
  # 0/1 inputs keep McNemar's path: the same numbers either way.
  binary = stats.paired_difference(a == 1, b == 1)
  assert binary['diff'] == pytest.approx(np.mean((a == 1).astype(float) - (b == 1)))


def test_few_shot_curves_pair_with_their_own_backbones_zero_shot(tmp_path):
  """A second backbone's zero-shot (here perfect) never stands in for the first one's."""
  from report import compare  # pylint: disable=g-import-not-at-top
  run = _report_runs(tmp_path / 'run')
  labels = np.arange(200) % 5
  other = metrics_lib.header('zeroshot', dataset={'spec': 's', 'name': 's', 'version': None,
                                                  'train_split': 'train', 'eval_split': 'test'},
                             model={'name': 'random:siglip-tiny', 'weights_sha256': '0' * 64},
                             class_names=NAMES, num_train=100, num_eval=200,
                             eval={'ids_sha256': 'e' * 64, 'labels': labels.tolist()})
  other['methods']['zeroshot'] = {**metrics_lib.classification(np.eye(5)[labels], labels, NAMES),
                                  'wall_s': 1.0, 'trainable_params': 0}
  os.makedirs(tmp_path / 'b2' / 'zeroshot')
  metrics_lib.write(str(tmp_path / 'b2' / 'zeroshot'), other)
  alone = compare.compare([run], str(tmp_path / 'out1')).split('## Few-shot')[1]
  both = compare.compare([run, str(tmp_path / 'b2')], str(tmp_path / 'out2')).split('## Few-shot')[1]
  delta = lambda md, name: next(l.split('|')[8].strip() for l in md.splitlines()
                                if l.startswith(f'| {name} | 1 |'))
  # The plain probe's 1-shot Δ against zero-shot is the same with the other backbone beside it.
  assert delta(both, 'probe:jax on random:tiny (' + SHA[:8] + ')') == delta(alone, 'probe:jax')
  assert '| zeroshot:zeroshot on random:siglip-tiny (00000000) | 0 |' in both
