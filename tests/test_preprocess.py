"""clip_transfer.data.preprocess agrees with transformers' CLIPImageProcessor.

Host side is uint8 through PIL exactly as transformers does it, so the only
difference is float rounding in rescale/normalise: max abs error 0 to ~5e-7
here; we assert <= 1e-5.
"""

import io

import jax
import numpy as np
import pytest
from PIL import Image

from clip_transfer.data import preprocess
from clip_transfer.data.preprocess import ImageError, PreprocessConfig

transformers = pytest.importorskip('transformers')

TOL = 1e-5


def _images():
  rng = np.random.RandomState(0)
  rgb = lambda h, w: rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
  return [
      Image.fromarray(rgb(57, 83)),  # landscape, odd sizes
      Image.fromarray(rgb(120, 41)),  # portrait
      Image.fromarray(rgb(8, 8)),  # tiny: upscaled (digits-sized)
      Image.fromarray(rng.randint(0, 256, (64, 50), dtype=np.uint8), mode='L'),  # grayscale
      Image.fromarray(rng.randint(0, 256, (45, 70, 4), dtype=np.uint8), mode='RGBA'),  # alpha
      Image.fromarray(rgb(40, 40)),  # already the target size
  ]


@pytest.mark.parametrize('size,crop', [(40, (40, 40)), (32, (28, 30)), (224, (224, 224))])
def test_matches_clip_image_processor(size, crop):
  cfg = PreprocessConfig(size=size, crop_size=crop)
  ref = transformers.CLIPImageProcessor(size={'shortest_edge': size},
                                        crop_size={'height': crop[0], 'width': crop[1]})
  normalize = jax.jit(lambda x: preprocess.normalize(x, cfg))
  for image in _images():
    want = ref(images=[image], return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)
    host = preprocess.prepare(image, cfg)
    assert host.dtype == np.uint8 and host.shape == (*crop, 3)
    got = np.asarray(normalize(host[None]))[0]
    assert np.abs(got - want).max() <= TOL, (image.size, image.mode)


def test_bytes_and_arrays_agree_with_pil():
  cfg = PreprocessConfig.for_image_size(32)
  image = Image.fromarray(np.random.RandomState(1).randint(0, 256, (50, 70, 3), dtype=np.uint8))
  buf = io.BytesIO()
  image.save(buf, format='PNG')
  a = preprocess.prepare(buf.getvalue(), cfg)
  np.testing.assert_array_equal(a, preprocess.prepare(image, cfg))
  np.testing.assert_array_equal(a, preprocess.prepare(np.asarray(image), cfg))
  rgba = np.random.RandomState(3).randint(0, 256, (30, 40, 4), dtype=np.uint8)
  np.testing.assert_array_equal(preprocess.prepare(rgba, cfg),
                                preprocess.prepare(Image.fromarray(rgba, mode='RGBA'), cfg))
  gray = np.random.RandomState(2).randint(0, 256, (8, 8), dtype=np.uint8)
  g = preprocess.prepare(gray, cfg)  # HxW grayscale → RGB
  assert g.shape == (32, 32, 3) and (g[..., 0] == g[..., 2]).all()


def test_from_hf_config():
  cfg = PreprocessConfig.from_hf({'size': {'shortest_edge': 224},
                                  'crop_size': {'height': 224, 'width': 224},
                                  'image_mean': [0.5, 0.5, 0.5], 'image_std': [0.5, 0.5, 0.5]}, 224)
  assert cfg.mean == (0.5, 0.5, 0.5) and cfg.output_shape == (224, 224, 3)
  assert PreprocessConfig.from_json(cfg.to_json()) == cfg
  with pytest.raises(Exception, match='produces 256x256 images but the model expects 224x224'):
    PreprocessConfig.from_hf({'size': 256, 'crop_size': 256}, 224)


@pytest.mark.parametrize('data,reason', [
    (b'', 'empty file'),
    (b'\x89PNG\r\n\x1a\n garbage', 'cannot decode'),
    (b'GIF89a' + b'\x00' * 20, 'cannot decode'),
])
def test_bad_bytes_raise_image_error(data, reason):
  with pytest.raises(ImageError, match=reason):
    preprocess.prepare(data, PreprocessConfig.for_image_size(32))


def test_huge_image_is_refused_before_decoding(monkeypatch):
  monkeypatch.setattr(preprocess, 'MAX_PIXELS', 100)
  buf = io.BytesIO()
  Image.new('RGB', (20, 20)).save(buf, format='PNG')
  with pytest.raises(ImageError, match='too large: 20x20'):
    preprocess.decode(buf.getvalue())


def test_wrong_arrays_raise_image_error():
  cfg = PreprocessConfig.for_image_size(32)
  with pytest.raises(ImageError, match='uint8'):
    preprocess.prepare(np.zeros((8, 8, 3), np.float32), cfg)
  with pytest.raises(ImageError, match='shape'):
    preprocess.prepare(np.zeros((8, 8, 2), np.uint8), cfg)
