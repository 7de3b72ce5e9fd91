"""pipelines.predict and finetune.export through their CLIs, on runs made by the real stages."""

import glob
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from finetune import export as export_cli
from finetune import train as finetune_cli
from pipelines import embed
from pipelines import predict
from probe import train as probe_cli
from probe import zeroshot
from clip_transfer import models
from clip_transfer.protocol import rungs

pytestmark = pytest.mark.usefixtures('xla_cache')  # tests/conftest.py

MODEL = 'random:tiny'


@pytest.fixture(scope='module')
def runs(tmp_path_factory, cat_dog_folder):  # tests/conftest.py
  """A two-class image folder embedded, probed, zero-shot classified and fine-tuned (+WiSE)."""
  root = tmp_path_factory.mktemp('predict')
  data = cat_dog_folder(root / 'data', train=16, test=8)
  out = {k: str(root / k) for k in ('emb', 'probe', 'zs', 'ft')}
  embed.run([f'--dataset=folder:{data}', f'--model={MODEL}', f'--output_dir={out["emb"]}',
             '--batch_size=16'])
  probe_cli.main([f'--embeddings={out["emb"]}', f'--output_dir={out["probe"]}', '--baselines=',
                  '--no_progress', '--val_fraction=0.25'])
  zeroshot.main([f'--embeddings={out["emb"]}', f'--output_dir={out["zs"]}', '--templates=simple'])
  assert finetune_cli.main([f'--dataset=folder:{data}', f'--model={MODEL}',
                            f'--workdir={out["ft"]}', '--mode=full', '--lr=1e-3', '--steps=4',
                            '--eval_every=2', '--batch_size=8', '--wise=0.5',
                            '--val_fraction=0.25', '--no_progress']) == 0
  return data, out


def _metrics(path):
  with open(os.path.join(path, 'metrics.json')) as fh:
    return json.load(fh)


def _predict(*flags):
  return predict.run(['--batch_size=8', *flags])


def _error(capsys, fn, argv):
  with pytest.raises(SystemExit) as e:
    fn(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and err[0].startswith('error: '), err
  return err[0]


def test_probe_head_reproduces_the_probes_predictions(runs, tmp_path, capsys):
  data, out = runs
  pred = str(tmp_path / 'pred')
  flags = [f'--dataset=folder:{data}', '--splits=test', f'--head=probe:{out["probe"]}',
           f'--output_dir={pred}', '--top_k=3']
  summary = _predict(*flags)
  assert summary['counts'] == {'test': {'read': 16, 'written': 16, 'dead_lettered': 0}}
  rows = predict.read_predictions(pred, 'test')
  m = _metrics(out['probe'])
  # Example for example (both in id order), hence the same top-1.
  assert [r['prediction'] for r in rows] == m['methods']['jax']['predictions']
  assert [r['label'] for r in rows] == m['eval']['labels']
  assert np.mean([r['prediction'] == r['label'] for r in rows]) == m['methods']['jax']['top1']
  assert all(len(r['top_k_names']) == 2 and r['top_k_names'][0] == r['prediction_name']
             and abs(sum(r['top_k_probabilities']) - 1) < 1e-5 for r in rows)  # 2 classes < 3
  # Reruns: refused without --overwrite; byte-identical with it.
  files = {f: open(os.path.join(pred, f), 'rb').read() for f in os.listdir(pred)
           if f != predict.RUN_FILE}
  assert 'already holds' in _error(capsys, predict.main, flags)
  _predict(*flags, '--overwrite')
  assert files == {f: open(os.path.join(pred, f), 'rb').read() for f in os.listdir(pred)
                   if f != predict.RUN_FILE}


@pytest.mark.parametrize('mode', ['full', 'full+wise'])
def test_finetuned_model_reproduces_its_predictions(runs, tmp_path, mode):
  data, out = runs
  pred = str(tmp_path / 'pred')
  _predict(f'--dataset=folder:{data}', '--splits=test', f'--head=finetune:{out["ft"]}',
           f'--mode={mode}', f'--output_dir={pred}')
  m = _metrics(out['ft'])['methods'][mode]
  assert [r['prediction'] for r in predict.read_predictions(pred, 'test')] == m['predictions']


def test_one_program_per_rung_structure_per_process(runs, tmp_path, count_compiles,
                                                   monkeypatch):
  """A second run of a rung compiles nothing; another rung on the same model gets its own."""
  data, out = runs
  flags = [f'--dataset=folder:{data}', '--splits=test', f'--head=probe:{out["probe"]}']
  _predict(*flags, f'--output_dir={tmp_path / "a"}')
  with count_compiles('with_head') as compiles:  # clip_transfer/protocol/rungs.py
    _predict(*flags, f'--output_dir={tmp_path / "b"}')
  assert compiles.count == 0
  assert (predict.read_predictions(str(tmp_path / 'a'), 'test')
          == predict.read_predictions(str(tmp_path / 'b'), 'test'))
  # The zero-shot head from the images, in the same process: its own program, its predictions.
  _predict(f'--dataset=folder:{data}', '--splits=test', f'--head=zeroshot:{out["zs"]}',
           f'--output_dir={tmp_path / "zs"}')
  assert ([r['prediction'] for r in predict.read_predictions(str(tmp_path / 'zs'), 'test')]
          == _metrics(out['zs'])['methods']['zeroshot']['predictions'])
  # Programs kept are bounded: with room for one, the zero-shot program pushes the probe's out.
  monkeypatch.setattr(predict, '_LOGITS', {})
  monkeypatch.setattr(predict, '_LOGITS_KEPT', 1)
  _predict(*flags, f'--output_dir={tmp_path / "c1"}')
  _predict(f'--dataset=folder:{data}', '--splits=test', f'--head=zeroshot:{out["zs"]}',
           f'--output_dir={tmp_path / "zs2"}')
  with count_compiles('with_head') as compiles:
    _predict(*flags, f'--output_dir={tmp_path / "c"}')
  assert compiles.count == 1 and len(predict._LOGITS) == 1  # pylint: disable=protected-access


def test_multi_processing_writes_the_in_process_bytes(runs, tmp_path):
  """A worker in another process unpickles the handler and builds its own program (Dataflow)."""
  data, out = runs
  flags = [f'--dataset=folder:{data}', '--splits=test', f'--head=probe:{out["probe"]}']
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  _predict(*flags, f'--output_dir={a}')
  _predict(*flags, f'--output_dir={b}', '--direct_running_mode=multi_processing',
           '--direct_num_workers=1')
  files = lambda d: {f: open(os.path.join(d, f), 'rb').read() for f in sorted(os.listdir(d))
                     if f != predict.RUN_FILE}
  assert files(a) == files(b) and any(f.endswith('.parquet') for f in files(a))


def test_workers_are_shipped_the_head_not_the_metrics(runs):
  """The handler pickled into the job carries the head, not metrics.json's per-example lists."""
  from apache_beam.internal import pickler  # what Beam pickles DoFns and handlers with
  _, out = runs
  rung = predict.open_head(f'probe:{out["probe"]}', None)
  assert rung.entry['predictions'] and rung.header['eval']['labels']  # on the launcher
  shipped = pickler.loads(pickler.dumps(predict.ClassifierModelHandler(rung, MODEL, 4)))
  assert shipped._rung.entry == {} and shipped._rung.header == {}  # pylint: disable=protected-access
  pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  (got,) = shipped.load_model().forward(pixels)
  pre = models.load(MODEL)
  want = rung.logits_fn(pre)(rung.params(pre), pixels)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_stored_embeddings_need_no_backbone(runs, tmp_path):
  _, out = runs
  for run, method in ((out['zs'], 'zeroshot'), (out['probe'], 'jax')):
    pred = str(tmp_path / method)
    kind = 'zeroshot' if method == 'zeroshot' else 'probe'
    _predict(f'--embeddings={out["emb"]}', '--splits=test', f'--head={kind}:{run}',
             f'--output_dir={pred}')
    got = [r['prediction'] for r in predict.read_predictions(pred, 'test')]
    assert got == _metrics(run)['methods'][method]['predictions']


def test_zeroshot_anchored_probe_head_reproduces_its_predictions(runs, tmp_path):
  """Its head reads L2-normalised projected features: from the images and from stored ones."""
  data, out = runs
  anchored = str(tmp_path / 'anchored')
  probe_cli.main([f'--embeddings={out["emb"]}', f'--output_dir={anchored}',
                  '--method=zeroshot-anchored', f'--zeroshot={out["zs"]}', '--l2_grid=1e-3,inf',
                  '--val_fraction=0.25', '--no_progress'])
  want = _metrics(anchored)['methods']['zeroshot-anchored']['predictions']
  for i, source in enumerate((f'--dataset=folder:{data}', f'--embeddings={out["emb"]}')):
    pred = str(tmp_path / f'pred{i}')
    _predict(source, '--splits=test', f'--head=probe:{anchored}', f'--output_dir={pred}')
    assert [r['prediction'] for r in predict.read_predictions(pred, 'test')] == want, source


def test_unlabelled_folder_and_csv_with_a_corrupt_image(runs, tmp_path, write_images):
  _, out = runs
  new = tmp_path / 'new'
  write_images(str(new / 'batch'), 3, 120, seed=7)  # new/batch/<image>: no class folders
  (new / 'batch' / 'broken.png').write_bytes(b'not an image')
  pred = str(tmp_path / 'pred')
  summary = _predict(f'--dataset=folder:{new}', f'--head=probe:{out["probe"]}',
                     f'--output_dir={pred}')
  assert summary['counts'] == {'batch': {'read': 4, 'written': 3, 'dead_lettered': 1}}
  rows = predict.read_predictions(pred, 'batch')
  assert [r['id'] for r in rows] == ['batch/000.png', 'batch/001.png', 'batch/002.png']
  assert all(r['label'] is None and r['prediction_name'] in ('cat', 'dog') for r in rows)
  with open(os.path.join(pred, 'dead_letters.batch.jsonl')) as fh:
    assert json.loads(fh.read())['id'] == 'batch/broken.png'
  # A CSV naming only the images (header 'image'): the same predictions.
  manifest = tmp_path / 'new.csv'
  manifest.write_text('image\n' + ''.join(f'new/batch/{i:03d}.png\n' for i in range(3)))
  pred_csv = str(tmp_path / 'pred_csv')
  summary = _predict(f'--dataset=csv:{manifest}', f'--head=probe:{out["probe"]}',
                     f'--output_dir={pred_csv}')
  assert summary['counts'] == {'train': {'read': 3, 'written': 3, 'dead_lettered': 0}}
  got = predict.read_predictions(pred_csv, 'train')
  assert [(r['prediction'], r['label']) for r in got] == [(r['prediction'], None) for r in rows]
  # As the README reads it with pandas (the user's, not a dependency of ours): a list of the
  # Parquet files, since the folder also holds the dead letters.
  pd = pytest.importorskip('pandas')
  frame = pd.read_parquet(glob.glob(os.path.join(pred, '*.parquet')))
  assert sorted(frame['id']) == [r['id'] for r in rows]


def test_refusals_are_one_line(runs, tmp_path, capsys, write_images):
  data, out = runs
  other = str(tmp_path / 'other_probe')
  shutil.copytree(out['probe'], other)
  m = _metrics(other)
  m['model']['weights_sha256'] = '0' * 64  # a probe of some other checkpoint
  with open(os.path.join(other, 'metrics.json'), 'w') as fh:
    json.dump(m, fh)
  base = [f'--dataset=folder:{data}', '--splits=test']
  assert 'made with other weights' in _error(
      capsys, predict.main, base + [f'--head=probe:{other}', f'--output_dir={tmp_path / "a"}'])
  zoo = tmp_path / 'zoo'
  write_images(str(zoo / 'test' / 'zebra'), 1, 100, seed=3)
  assert 'classes the head does not know (zebra)' in _error(
      capsys, predict.main, [f'--dataset=folder:{zoo}', f'--head=probe:{out["probe"]}',
                             f'--output_dir={tmp_path / "b"}'])
  assert 'no such directory' in _error(
      capsys, predict.main, base + [f'--head=finetune:{tmp_path / "missing"}',
                                    f'--output_dir={tmp_path / "c"}'])
  theirs = tmp_path / 'theirs'
  theirs.mkdir()
  (theirs / 'notes.txt').write_text('mine')
  assert 'files this tool did not write' in _error(
      capsys, predict.main, base + [f'--head=probe:{out["probe"]}', f'--output_dir={theirs}'])
  assert (theirs / 'notes.txt').read_text() == 'mine'


def _our_logits(spec, images):
  import jax  # pylint: disable=g-import-not-at-top
  rung = rungs.open_rung(spec)
  pre = models.load(rung.model['name'])
  return np.asarray(jax.jit(rung.logits_fn(pre))(rung.params(pre), images))


@pytest.mark.parametrize('kind', ['finetune', 'zeroshot'])
def test_export_loads_in_pytorch_and_jax(runs, tmp_path, kind):
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top

  _, out = runs
  spec = f'finetune:{out["ft"]}' if kind == 'finetune' else f'zeroshot:{out["zs"]}'
  d = str(tmp_path / 'export')
  export_cli.main([f'--head={spec}', f'--output_dir={d}'])
  with open(os.path.join(d, 'head.json')) as fh:
    info = json.load(fh)
  assert info['class_names'] == ['cat', 'dog']
  assert info['method'] == ('full+wise' if kind == 'finetune' else 'zeroshot')
  # Images no training saw, through transformers' own processor and classes.
  images = np.random.default_rng(5).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  cls = getattr(transformers, info['transformers_class'])
  tower = cls.from_pretrained(d).eval()
  processor = transformers.CLIPImageProcessor.from_pretrained(d)
  head = load_file(os.path.join(d, 'head.safetensors'))
  with torch.no_grad():
    o = tower(**processor(images=[Image.fromarray(i) for i in images], return_tensors='pt'))
    x = o.pooler_output if kind == 'finetune' else o.image_embeds / o.image_embeds.norm(
        dim=-1, keepdim=True)
    theirs = (x @ head['weight'].T + head['bias']).numpy()
  ours = _our_logits(spec, images)
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  fn = jax.export.deserialize(open(os.path.join(d, 'logits.jax_export'), 'rb').read())
  np.testing.assert_allclose(np.asarray(fn.call(images)), ours, atol=1e-4, rtol=0)
  assert np.asarray(fn.call(images[:1])).shape == (1, 2)  # any batch size
  with open(os.path.join(d, 'README.md')) as fh:
    card = fh.read()
  assert 'validation protocol' in card and 'top-1' in card


def test_export_refuses_interrupted_and_diverged_runs(runs, tmp_path, capsys):
  _, out = runs
  work = str(tmp_path / 'ft')
  shutil.copytree(out['ft'], work)
  curve = os.path.join(work, 'checkpoints', 'full', 'lr=0.001', 'curve.json')
  with open(curve) as fh:
    record = json.load(fh)
  with open(curve, 'w') as fh:
    json.dump({**record, 'done': False}, fh)
  assert 'interrupted' in _error(capsys, export_cli.main,
                                 [f'--workdir={work}', f'--output_dir={tmp_path / "a"}'])
  m = _metrics(work)
  m['methods'] = {}  # every lr diverged: fine-tune wrote no result
  with open(os.path.join(work, 'metrics.json'), 'w') as fh:
    json.dump(m, fh)
  with open(curve, 'w') as fh:
    json.dump({**record, 'diverged_at_step': 2}, fh)
  assert 'diverged' in _error(capsys, export_cli.main, [f'--workdir={work}', '--mode=full',
                                                        f'--output_dir={tmp_path / "b"}'])
  probe = str(tmp_path / 'probe')
  shutil.copytree(out['probe'], probe)
  os.remove(os.path.join(probe, 'metrics.json'))  # written last: a probe that never finished
  assert 'interrupted' in _error(capsys, export_cli.main,
                                 [f'--head=probe:{probe}', f'--output_dir={tmp_path / "c"}'])


def test_export_missing_workdir_names_the_flag_typed(tmp_path, capsys):
  err = _error(capsys, export_cli.main, [f'--workdir={tmp_path / "missing"}',
                                         f'--output_dir={tmp_path / "out"}'])
  assert err.startswith(f'error: --workdir={tmp_path / "missing"}: no such directory'), err
  assert not (tmp_path / 'out').exists()  # refused before the output dir is claimed


def test_finetuned_head_of_another_class_count_is_refused_before_the_pipeline(runs, tmp_path,
                                                                               capsys, write_images):
  """Checked on the launcher from the checkpoint's metadata, not by the workers loading it."""
  _, out = runs
  work = str(tmp_path / 'ft')
  shutil.copytree(out['ft'], work)
  m = _metrics(work)
  m['class_names'] = ['cat', 'dog', 'zebra']  # the checkpoints' heads have 2 columns
  with open(os.path.join(work, 'metrics.json'), 'w') as fh:
    json.dump(m, fh)
  zoo = tmp_path / 'zoo'
  for name in ('cat', 'zebra'):  # classes the head's metrics.json knows: label_map passes
    write_images(str(zoo / 'test' / name), 1, 100, seed=3)
  pred = tmp_path / 'pred'
  for mode in ('full', 'full+wise'):
    err = _error(capsys, predict.main, [f'--dataset=folder:{zoo}', f'--head=finetune:{work}',
                                        f'--mode={mode}', f'--output_dir={pred}'])
    assert 'has a head of 2 classes but metrics.json records 3' in err, err
  assert not pred.exists()  # refused before the output dir was claimed or a model loaded


def test_remote_head_directories_are_refused_in_one_line(tmp_path, capsys):
  """A gs:// run directory: why it cannot be used, not 'no such directory'."""
  for spec in ('finetune:gs://bucket/ft', 'probe:gs://bucket/probe'):
    err = _error(capsys, predict.main, [f'--dataset=folder:{tmp_path}', f'--head={spec}',
                                        f'--output_dir={tmp_path / "pred"}'])
    assert err.startswith(f'error: --head={spec}: the run directory must be a local path'), err
    assert 'a gs:// directory is not supported' in err, err
    assert ('every worker' in err) == spec.startswith('finetune:'), err
  assert not (tmp_path / 'pred').exists()


def test_a_near_miss_of_our_flags_is_refused_and_beams_pass_on(tmp_path, capsys):
  base = [f'--dataset=folder:{tmp_path}', '--head=probe:x', f'--output_dir={tmp_path / "p"}']
  err = _error(capsys, predict.main, base + ['--bacth_size=8'])
  assert err == 'error: unknown flag --bacth_size; did you mean --batch_size?', err
  _, beam_args = predict.parse_args(base + ['--project=p', '--region=r', '--label=a=b'])
  assert beam_args == ['--project=p', '--region=r', '--label=a=b']  # not --label_column's prefix


def test_dataflow_dry_run_builds_the_predict_job(runs, tmp_path):
  """--runner=DataflowRunner --dry_run=True: the job is built offline, nothing is submitted."""
  try:
    import google.cloud.dataflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    if os.environ.get('CI'):  # make test installs the gcp extra
      raise
    pytest.skip("needs apache-beam[gcp]: pip install -c constraints.txt -e '.[test,gcp]'")
  data, out = runs
  pred = tmp_path / 'pred'
  setup = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'setup.py')
  summary = _predict(f'--dataset=folder:{data}', '--splits=test', f'--head=finetune:{out["ft"]}',
                     f'--output_dir={pred}', '--runner=DataflowRunner', '--dry_run=True',
                     '--project=my-project', '--region=us-central1',
                     '--temp_location=gs://my-bucket/tmp', f'--setup_file={setup}')
  assert summary['dry_run'] and os.listdir(pred) == ['.clip-transfer-output']
  top = {t.unique_name for t in summary['job'].proto_pipeline.components.transforms.values()}
  assert {'Read[test]', 'Preprocess[test]', 'RunInference', 'ToRow', 'WriteShard',
          'Finalize'} <= top, top
