"""The transfer ladder's rungs that start from another stage: LP-FT, zero-shot init, WiSE-FT."""

import json
import os

import jax
import numpy as np
import pytest

from finetune import model as model_lib
from finetune import train as finetune_cli
from finetune import config as config_lib
from finetune import head_init as head_init_lib
from probe import train as probe_cli
from probe import zeroshot
from clip_transfer import models
from clip_transfer.data import embeddings
from clip_transfer.data import preprocess
from clip_transfer.data import sources

pytestmark = pytest.mark.usefixtures('xla_cache')  # tests/conftest.py

MODEL = 'random:tiny'


@pytest.fixture(scope='module')
def ladder(tmp_path_factory, tiny_digits_embeddings):
  """digits embedded once (with projected features; tests/conftest.py), probed, zero-shot
  classified."""
  root = tmp_path_factory.mktemp('ladder')
  emb = tiny_digits_embeddings[0]  # MODEL's, read only
  probe_dir, zs_dir = str(root / 'probe'), str(root / 'zeroshot')
  probe_cli.main([f'--embeddings={emb}', f'--output_dir={probe_dir}', '--baselines=',
                  '--no_progress'])
  zeroshot.main([f'--embeddings={emb}', f'--output_dir={zs_dir}', '--templates=simple'])
  return emb, probe_dir, zs_dir


def _metrics(path):
  with open(os.path.join(path, 'metrics.json')) as fh:
    return json.load(fh)


def _step0_logits(digits_data_dir, head_init):
  """The initialised classifier (no training step) applied to the digits test images."""
  pre = models.load(MODEL)
  config = config_lib.Config(dataset='digits', data_dir=digits_data_dir, model=MODEL,
                             head_init=head_init)
  src = sources.open_source('digits', digits_data_dir)
  head, projected = head_init_lib.initial_head(config, pre, src.class_names)
  model, variables = model_lib.create(pre, 10, head=head, projected=projected)
  ex = sorted(src.iter_examples('test'), key=lambda e: e.id)
  images = np.stack([preprocess.prepare(e.image, pre.preprocess) for e in ex])
  apply = jax.jit(lambda v, x: model.apply(v, preprocess.normalize(x, pre.preprocess)))
  return np.asarray(apply(variables, images)), [e.id for e in ex]


def test_lpft_starts_from_the_probe(ladder, digits_data_dir):
  emb, probe_dir, _ = ladder
  logits, ids = _step0_logits(digits_data_dir, f'probe:{probe_dir}')
  x, _, emb_ids = embeddings.read_split(emb, 'test')
  by_id = dict(zip(emb_ids, x))
  from probe import load_head  # pylint: disable=g-import-not-at-top
  want = load_head(probe_dir).logits(np.stack([by_id[i] for i in ids]))
  np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-4)
  m = _metrics(probe_dir)
  assert logits.argmax(-1).tolist() == m['methods']['jax']['predictions']


def test_lpft_starts_from_the_zeroshot_anchored_probe(ladder, digits_data_dir, tmp_path):
  """The anchored probe's head reads normalised projected features; fine-tune starts from it there."""
  emb, _, zs_dir = ladder
  out = str(tmp_path / 'anchored')
  probe_cli.main([f'--embeddings={emb}', f'--output_dir={out}', '--method=zeroshot-anchored',
                  f'--zeroshot={zs_dir}', '--l2_grid=1e-3,inf', '--no_progress'])
  logits, ids = _step0_logits(digits_data_dir, f'probe:{out}')
  x, _, emb_ids = embeddings.read_split(emb, 'test', feature='projected')
  by_id = dict(zip(emb_ids, x))
  from probe import load_head  # pylint: disable=g-import-not-at-top
  want = load_head(out).logits(np.stack([by_id[i] for i in ids]))
  np.testing.assert_allclose(logits, want, atol=1e-3, rtol=1e-4)
  assert logits.argmax(-1).tolist() == _metrics(out)['methods']['zeroshot-anchored']['predictions']


def test_zeroshot_head_starts_at_the_zeroshot_classifier(ladder, digits_data_dir):
  _, _, zs_dir = ladder
  logits, _ = _step0_logits(digits_data_dir, f'zeroshot:{zs_dir}')
  m = _metrics(zs_dir)['methods']['zeroshot']
  assert np.mean(logits.argmax(-1) == np.asarray(_metrics(zs_dir)['eval']['labels'])) == m['top1']
  assert logits.argmax(-1).tolist() == m['predictions']


def test_lpft_with_wise_ft_through_the_cli(ladder, digits_data_dir, tmp_path):
  _, probe_dir, _ = ladder
  work = str(tmp_path / 'ft')
  assert finetune_cli.main(['--dataset=digits', f'--data_dir={digits_data_dir}',
                            f'--model={MODEL}', f'--workdir={work}', '--mode=full',
                            f'--head_init=probe:{probe_dir}', '--lr=1e-3', '--steps=20',
                            '--eval_every=10', '--batch_size=64', '--wise=0,0.5,1',
                            '--no_progress']) == 0
  m = _metrics(work)
  base, wise = m['methods']['full@probe'], m['methods']['full@probe+wise']
  assert base['head_init'] == f'probe:{probe_dir}'
  curve = base['wise']
  assert curve['alphas'] == [0.0, 0.5, 1.0] and curve['selected_alpha'] in curve['alphas']
  # α = 0 is the starting model: the probe's head on the pretrained backbone.
  assert curve['eval_top1'][0] == _metrics(probe_dir)['methods']['jax']['top1']
  assert curve['eval_top1'][2] == base['top1']  # α = 1 is the fine-tuned model
  chosen = curve['alphas'].index(curve['selected_alpha'])
  assert wise['top1'] == curve['eval_top1'][chosen] and 'wise' not in wise
  assert curve['val_top1'][chosen] == max(curve['val_top1'])


def test_head_init_from_other_weights_is_refused(ladder, digits_data_dir, tmp_path, capsys):
  import shutil  # pylint: disable=g-import-not-at-top
  _, probe_dir, _ = ladder
  other = str(tmp_path / 'other_probe')
  shutil.copytree(probe_dir, other)
  m = _metrics(other)
  m['model']['weights_sha256'] = '0' * 64  # a probe of some other checkpoint
  with open(os.path.join(other, 'metrics.json'), 'w') as fh:
    json.dump(m, fh)
  code = None
  try:
    finetune_cli.main(['--dataset=digits', f'--data_dir={digits_data_dir}', f'--model={MODEL}',
                       f'--workdir={tmp_path / "ft"}', '--mode=full', f'--head_init=probe:{other}',
                       '--steps=1', '--no_progress'])
  except SystemExit as e:
    code = e.code
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert code == 2 and 'made with other weights' in err
