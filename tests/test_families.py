"""SigLIP and DINOv2 equal their transformers references (features, logits, preprocessing).

Random weights (perturbed so that LayerScale, registers and biases are not their
init constants) saved with ``save_pretrained`` into a temp dir; no network.
float32 on CPU; tiny widths, 1–2 layers.
"""

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
