"""SigLIP and DINOv2 equal their transformers references (features, logits, preprocessing).

Random weights (perturbed so that LayerScale, registers and biases are not their
init constants) saved with ``save_pretrained`` into a temp dir; no network.
float32 on CPU; tiny widths, 1–2 layers.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from clip_transfer import models  # pylint: disable=g-import-not-at-top
from clip_transfer.data import preprocess  # pylint: disable=g-import-not-at-top
from clip_transfer.models import checkpoints  # pylint: disable=g-import-not-at-top

TOL = 1e-4


def _perturbed(model, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  return model.eval()


def _pixels(n, h, w, seed=0):
  return np.random.RandomState(seed).randn(n, h, w, 3).astype(np.float32)


def _ours(path):
  models.clear_cache()
  pre = models.load(str(path))
  tower, tower_vars = pre.vision_tower()  # the Flax guide's bind/unbind pattern
  return pre, lambda x: np.asarray(tower.apply(tower_vars, x).pooler_output)


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# (vision kwargs, text kwargs or None): heads, widths, eps, odd patch grids, vision-only.
SIGLIP_SHAPES = [
    (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
          image_size=32, patch_size=8),
     dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
          vocab_size=99, max_position_embeddings=12)),
    (dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
          image_size=28, patch_size=7, layer_norm_eps=1e-5), None),
]


@pytest.mark.parametrize('vision,text', SIGLIP_SHAPES)
def test_siglip_parity(tmp_path, vision, text):
  if text is None:
    ref = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision))
  else:
    ref = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision,
                                                             text_config=text))
  _perturbed(ref).save_pretrained(tmp_path)
  x = _pixels(3, vision['image_size'], vision['image_size'])
  with torch.no_grad():
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    if text is None:
      want = ref(pixel_values=xt).pooler_output.numpy()
    else:
      ids = torch.from_numpy(np.random.RandomState(1).randint(0, 99, (4, 12)))
      out = ref(pixel_values=xt, input_ids=ids)
      want = ref.vision_model(pixel_values=xt).pooler_output.numpy()
  pre, forward = _ours(tmp_path)
  assert (pre.family, pre.embedding_dim) == ('siglip', vision['hidden_size'])
  assert _max_err(forward(x), want) < TOL
  if text is not None:
    assert pre.projection_dim == vision['hidden_size'] and pre.has_text
    ours = pre.module.apply(pre.variables, x, ids.numpy())
    assert _max_err(ours['logits_per_image'], out.logits_per_image.numpy()) < TOL
    assert _max_err(ours['text_embeds'], out.text_embeds.numpy()) < TOL
  else:
    assert pre.projection_dim is None and not pre.has_text


# (config kwargs, input size): registers, SwiGLU, LayerScale, interpolation up/down/none.
DINOV2_SHAPES = [
    ('dinov2', dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=40,
                    patch_size=8, use_swiglu_ffn=True), 32),  # grid 5 → 4
    ('dinov2', dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=21,
                    patch_size=7, mlp_ratio=3), 21),  # grid 3, no resize
    ('dinov2', dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=3, image_size=24,
                    patch_size=8), 56),  # grid 3 → 7, upsampling
    ('dinov2_with_registers', dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   image_size=56, patch_size=8, num_register_tokens=2), 40),
    ('dinov2_with_registers', dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=24, patch_size=8, num_register_tokens=3,
                                   use_swiglu_ffn=True, layer_norm_eps=1e-5), 40),
]


@pytest.mark.parametrize('kind,config,size', DINOV2_SHAPES)
def test_dinov2_parity(tmp_path, kind, config, size):
  if kind == 'dinov2':
    ref = transformers.Dinov2Model(transformers.Dinov2Config(**config))
  else:
    ref = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**config))
  _perturbed(ref).save_pretrained(tmp_path)
  x = _pixels(2, size, size)
  with torch.no_grad():
    h = ref(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state
    skip = 1 + config.get('num_register_tokens', 0)
    want = torch.cat([h[:, 0], h[:, skip:].mean(1)], dim=1).numpy()
  pre, forward = _ours(tmp_path)
  assert (pre.family, pre.embedding_dim, pre.projection_dim) == ('dinov2', 2 * config['hidden_size'], None)
  assert _max_err(forward(x), want) < TOL


def _images():
  rng = np.random.RandomState(0)
  return [rng.randint(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((37, 53), (64, 29), (30, 30))]


def _ours_pixels(cfg, images):
  return np.asarray(preprocess.normalize(preprocess.prepare_batch(images, cfg), cfg))


def test_siglip_preprocessing_matches_the_processor(tmp_path):
  ref = transformers.SiglipImageProcessorPil(size={'height': 24, 'width': 24})
  ref.save_pretrained(tmp_path)
  from clip_transfer.models import siglip  # pylint: disable=g-import-not-at-top
  cfg = siglip.preprocess_from_dir(str(tmp_path), siglip.VisionConfig(image_size=24))
  want = ref(_images(), return_tensors='np')['pixel_values'].transpose(0, 2, 3, 1)
  assert _max_err(_ours_pixels(cfg, _images()), want) < 1e-5


def test_dinov2_preprocessing_matches_the_processor(tmp_path):
  # facebook/dinov2-*'s processor settings (shortest side 256 → crop 224), at a small scale.
  ref = transformers.BitImageProcessorPil(size={'shortest_edge': 36},
                                          crop_size={'height': 32, 'width': 32},
                                          image_mean=[0.485, 0.456, 0.406],
                                          image_std=[0.229, 0.224, 0.225])
  ref.save_pretrained(tmp_path)
  from clip_transfer.models import dinov2  # pylint: disable=g-import-not-at-top
  cfg = dinov2.preprocess_from_dir(str(tmp_path), dinov2.VisionConfig())
  want = ref(_images(), return_tensors='np')['pixel_values'].transpose(0, 2, 3, 1)
  assert _max_err(_ours_pixels(cfg, _images()), want) < 1e-5


def test_presets_load_with_their_family():
  for name, family, dim in (('random:siglip-tiny', 'siglip', 64),
                            ('random:dinov2-tiny', 'dinov2', 128)):
    pre = models.load(name)
    assert (pre.family, pre.embedding_dim) == (family, dim)
    assert (pre.text_tower() is None) == (family == 'dinov2')


# --------------------------------------------------------------------------
# Zero-shot: SigLIP's text tower, tokenizer and scores
# --------------------------------------------------------------------------

CLASSES = ['cat', 'dog', 'an airplane with a long name']


def _siglip_with_tokenizer(path, length=12):
  """A random SiglipModel and a SentencePiece SiglipTokenizer trained here, both saved."""
  spm = pytest.importorskip('sentencepiece')
  corpus = ['a photo of a cat', 'a photo of a dog', 'an airplane with a long name',
            'this is a photo of the thing', 'itap of my pet'] * 20
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_prefix=str(path / 'sp'), vocab_size=28, hard_vocab_limit=False,
      model_type='unigram', pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece='<pad>',
      eos_piece='</s>', unk_piece='<unk>', minloglevel=2)
  tok = transformers.SiglipTokenizer(vocab_file=str(path / 'sp.model'), model_max_length=length)
  common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
  model = transformers.SiglipModel(transformers.SiglipConfig(
      vision_config=dict(image_size=16, patch_size=8, **common),
      text_config=dict(vocab_size=48, max_position_embeddings=length, pad_token_id=0,
                       eos_token_id=1, **common)))
  _perturbed(model).save_pretrained(path)
  tok.save_pretrained(path)
  return model, tok


def test_siglip_zeroshot_matches_siglipmodel(tmp_path):
  from clip_transfer.models import tokenizer  # pylint: disable=g-import-not-at-top
  from probe import zeroshot  # pylint: disable=g-import-not-at-top

  ref, ref_tok = _siglip_with_tokenizer(tmp_path)
  x = _pixels(3, 16, 16)
  prompts = [f'a photo of a {c}.' for c in CLASSES]
  with torch.no_grad():
    enc = ref_tok(prompts, padding='max_length', max_length=12, truncation=True,
                  return_tensors='pt')
    out = ref(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2), input_ids=enc['input_ids'])
  models.clear_cache()
  pre = models.load(str(tmp_path))
  tok = tokenizer.load_tokenizer(str(tmp_path), pre.module.text_config)
  head = zeroshot.zeroshot_head(pre.module, pre.variables, tok, CLASSES, ['a photo of a {}.'])
  _, forward = _ours(tmp_path)
  logits = zeroshot.zeroshot_logits(forward(x), head, zeroshot.logit_scale(pre.module, pre.variables),
                                    zeroshot.logit_bias(pre.module, pre.variables))
  assert _max_err(logits, out.logits_per_image.numpy()) < TOL


@pytest.fixture(scope='module')
def family_runs(tmp_path_factory, digits_data_dir):
  """digits embedded and probed with each non-CLIP family's tiny preset."""
  from pipelines import embed  # pylint: disable=g-import-not-at-top
  from probe import train as probe_cli  # pylint: disable=g-import-not-at-top

  root, runs = tmp_path_factory.mktemp('families'), {}
  for name in ('random:siglip-tiny', 'random:dinov2-tiny'):
    emb, probe_dir = str(root / name[7:] / 'emb'), str(root / name[7:] / 'probe')
    embed.run(['--dataset=digits', f'--data_dir={digits_data_dir}', f'--model={name}',
               f'--output_dir={emb}', '--batch_size=128'])
    probe_cli.main([f'--embeddings={emb}', f'--output_dir={probe_dir}', '--baselines=',
                    '--no_progress'])
    runs[name] = emb, probe_dir
  return runs


def test_every_family_embeds_and_probes(family_runs):
  import json  # pylint: disable=g-import-not-at-top
  from clip_transfer.data import embeddings  # pylint: disable=g-import-not-at-top

  for name, (emb, probe_dir) in family_runs.items():
    pre = models.load(name)
    meta = embeddings.read_metadata(emb)['model']
    assert (meta['family'], meta['pooling']) == (pre.family, pre.pooling)
    assert meta['embedding_dim'] == pre.embedding_dim and meta['projected_dim'] == pre.projection_dim
    x, _, _ = embeddings.read_split(emb, 'test')
    assert x.shape == (360, pre.embedding_dim) and np.isfinite(x).all()
    with open(f'{probe_dir}/metrics.json') as fh:
      m = json.load(fh)
    assert m['model']['weights_sha256'] == pre.checksum() and m['methods']['jax']['top1'] > 0.3


def test_zeroshot_on_siglip_and_refused_on_dinov2(family_runs, tmp_path, capsys):
  from probe import zeroshot  # pylint: disable=g-import-not-at-top

  m = zeroshot.run_zeroshot(family_runs['random:siglip-tiny'][0], str(tmp_path / 'zs'),
                            templates='simple')
  assert m['logit_bias'] == zeroshot.logit_bias(*models.load_model('random:siglip-tiny'))
  assert 0 <= m['methods']['zeroshot']['top1'] <= 1
  assert zeroshot.load_head(str(tmp_path / 'zs')).logit_bias == m['logit_bias']
  with pytest.raises(SystemExit) as e:
    zeroshot.main([f'--embeddings={family_runs["random:dinov2-tiny"][0]}',
                   f'--output_dir={tmp_path / "zs2"}'])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1
  assert 'vision-only' in err[0] and 'probe' in err[0]


# --------------------------------------------------------------------------
# Fine-tune: the guide's pattern and every mode on each family's names
# --------------------------------------------------------------------------

@pytest.mark.parametrize('name,after', [('random:siglip-tiny', ('post_layernorm', 'head')),
                                        ('random:dinov2-tiny', ('layernorm',))])
def test_finetune_modes_mean_the_same_on_every_family(name, after):
  from finetune import groups  # pylint: disable=g-import-not-at-top
  from finetune import model as model_lib  # pylint: disable=g-import-not-at-top

  pre = models.load(name)
  model, variables = model_lib.create(pre, 3)  # Classifier(num_classes, backbone), checked
  params = variables['params']
  assert groups.num_layers(params) == 2
  tops = lambda plan: {p.split('/')[1] if p.startswith('backbone/') else p.split('/')[0]
                       for p, t in zip(groups.paths(params), jax.tree.leaves(plan.trainable)) if t}
  assert tops(groups.plan('linear', params)) == {'head'}
  assert tops(groups.plan('full', params)) == {'head', 'embeddings', 'encoder', *after}
  assert tops(groups.plan('differential', params)) == {'head', 'embeddings', 'encoder', *after}
  last1 = groups.plan('last:1', params)
  trained = {p for p, t in zip(groups.paths(params), jax.tree.leaves(last1.trainable)) if t}
  assert any('/1/' in p for p in trained) and not any('/0/' in p for p in trained)
  assert {p.split('/')[1] for p in trained if p.startswith('backbone/')} == {'encoder', *after}
  x = np.zeros((2, *pre.preprocess.output_shape), np.float32)
  assert np.all(np.asarray(model.apply(variables, x)) == 0)  # zero-initialised head


def test_siglip_zeroshot_head_init_is_its_sigmoid_logits():
  from finetune import model as model_lib  # pylint: disable=g-import-not-at-top
  from probe import zeroshot  # pylint: disable=g-import-not-at-top

  pre = models.load('random:siglip-tiny')
  head = np.random.RandomState(0).randn(3, pre.projection_dim).astype(np.float32)
  head /= np.linalg.norm(head, axis=1, keepdims=True)
  scale = zeroshot.logit_scale(pre.module, pre.variables)
  bias = zeroshot.logit_bias(pre.module, pre.variables)
  from clip_transfer.protocol import heads  # pylint: disable=g-import-not-at-top
  dense = heads.ZeroshotHead(head, scale, ['a', 'b', 'c'], ['{}'], bias).dense()
  model, variables = model_lib.create(pre, 3, head=dense, projected=True)
  x = _pixels(2, 32, 32)
  _, forward = _ours('random:siglip-tiny')
  want = zeroshot.zeroshot_logits(forward(x), head, scale, bias)
  assert _max_err(model.apply(variables, x), want) < TOL


@pytest.mark.parametrize('name', ['random:siglip-tiny', 'random:dinov2-tiny'])
def test_finetune_cli_runs_on_each_family(name, tmp_path, digits_data_dir):
  from finetune import train  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top

  argv = ['--dataset=digits', f'--data_dir={digits_data_dir}', f'--model={name}',
          f'--workdir={tmp_path}', '--mode=last:1', '--steps=2', '--batch_size=16',
          '--limit_train=64', '--limit_eval=32', '--no_progress',
          '--lr=1e-3']  # one configuration: this checks the family, not the sweep
  assert train.main(argv) in (None, 0)
  with open(tmp_path / 'metrics.json') as fh:
    m = json.load(fh)
  assert m['model']['weights_sha256'] == models.load(name).checksum()
  assert any(k.startswith('last:1') for k in m['methods'])


def test_predict_reproduces_siglip_zeroshot_from_images(family_runs, tmp_path, digits_data_dir):
  """pipelines.predict runs the SigLIP tower + zero-shot head on images: the same predictions."""
  import json  # pylint: disable=g-import-not-at-top
  from pipelines import predict  # pylint: disable=g-import-not-at-top
  from probe import zeroshot  # pylint: disable=g-import-not-at-top

  zs = str(tmp_path / 'zs')
  zeroshot.run_zeroshot(family_runs['random:siglip-tiny'][0], zs, templates='simple')
  pred = str(tmp_path / 'pred')
  predict.run(['--batch_size=64', '--dataset=digits', f'--data_dir={digits_data_dir}',
               '--splits=test', f'--head=zeroshot:{zs}', f'--output_dir={pred}'])
  with open(f'{zs}/metrics.json') as fh:
    want = json.load(fh)['methods']['zeroshot']['predictions']
  assert [r['prediction'] for r in predict.read_predictions(pred, 'test')] == want
