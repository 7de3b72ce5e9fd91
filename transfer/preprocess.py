"""CLIP preprocessing, split at the host/device boundary.

Host side (``prepare``): decode, convert to RGB, resize the shortest side with
bicubic, center crop — all in ``uint8``, the way transformers'
``CLIPImageProcessor`` does it (it resizes uint8 arrays through PIL too).
Device side (``normalize``): rescale and mean/std, meant to run inside jit so
only uint8 bytes cross to the device (4x fewer than float32).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from transfer.errors import UserError

# OpenAI CLIP's statistics (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.BICUBIC, the value HF configs store as "resample"

# Decoding refuses images above this many pixels (PIL's decompression-bomb
# guard is a warning below 2x this value); such inputs are dead-lettered.
MAX_PIXELS = 89_478_485


class ImageError(ValueError):
  """An input image that cannot be decoded or preprocessed."""


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """How pixels are prepared for a model; recorded with every embedding dataset."""

  size: int = 224  # shortest side after resize
  crop_size: tuple[int, int] = (224, 224)  # (height, width)
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  resample: int = BICUBIC
  rescale_factor: float = 1 / 255
  do_center_crop: bool = True

  @classmethod
  def for_image_size(cls, image_size: int) -> 'PreprocessConfig':
    """CLIP defaults at a model's input resolution."""
    return cls(size=image_size, crop_size=(image_size, image_size))

  @classmethod
  def from_hf(cls, d: dict[str, Any], image_size: int) -> 'PreprocessConfig':
    """From a ``preprocessor_config.json`` dict (CLIPImageProcessor fields)."""
    size = d.get('size', image_size)
    if isinstance(size, dict):
      size = size.get('shortest_edge', size.get('height', image_size))
    crop = d.get('crop_size', size)
    if isinstance(crop, dict):
      crop = (crop['height'], crop['width'])
    elif isinstance(crop, int):
      crop = (crop, crop)
    cfg = cls(
        size=int(size),
        crop_size=tuple(int(c) for c in crop),
        mean=tuple(float(m) for m in d.get('image_mean', CLIP_MEAN)),
        std=tuple(float(s) for s in d.get('image_std', CLIP_STD)),
        resample=int(d.get('resample', BICUBIC)),
        rescale_factor=float(d.get('rescale_factor', 1 / 255)),
        do_center_crop=bool(d.get('do_center_crop', True)),
    )
    out = cfg.crop_size if cfg.do_center_crop else (cfg.size, cfg.size)
    if out != (image_size, image_size):
      raise UserError(
          f'preprocessor config produces {out[0]}x{out[1]} images but the model '
          f'expects {image_size}x{image_size}')
    return cfg

  @classmethod
  def from_dir(cls, path: str, image_size: int) -> 'PreprocessConfig':
    f = os.path.join(path, 'preprocessor_config.json')
    if not os.path.exists(f):
      return cls.for_image_size(image_size)
    with open(f) as fh:
      return cls.from_hf(json.load(fh), image_size)

  @property
  def output_shape(self) -> tuple[int, int, int]:
    """(H, W, 3) of a prepared image."""
    if self.do_center_crop:
      return (*self.crop_size, 3)
    return (self.size, self.size, 3)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'PreprocessConfig':
    return cls(**{**d, 'crop_size': tuple(d['crop_size']), 'mean': tuple(d['mean']),
                  'std': tuple(d['std'])})


def decode(data: bytes) -> np.ndarray:
  """Encoded image bytes → HWC uint8 RGB. Raises ImageError."""
  if not data:
    raise ImageError('empty file (0 bytes)')
  try:
    with Image.open(io.BytesIO(data)) as img:
      w, h = img.size
      if w * h > MAX_PIXELS:
        raise ImageError(f'image too large: {w}x{h} pixels (limit {MAX_PIXELS})')
      return to_rgb(img)
  except ImageError:
    raise
  except Image.DecompressionBombError as e:
    raise ImageError(f'image too large: {e}') from None
  except Exception as e:  # PIL raises many types for corrupt data.
    raise ImageError(f'cannot decode image: {type(e).__name__}: {e}') from None


def to_rgb(image) -> np.ndarray:
  """PIL image or array (HW, HW1, HW3, HW4) → HWC uint8 RGB.

  Grayscale is repeated to 3 channels; transparency is composited onto white,
  as transformers' ``convert_to_rgb`` does.
  """
  if isinstance(image, Image.Image):
    if 'A' in image.getbands() or image.info.get('transparency') is not None:
      image = image.convert('RGBA')
      white = Image.new('RGBA', image.size, (255, 255, 255, 255))
      image = Image.alpha_composite(white, image)
    if image.mode != 'RGB':
      image = image.convert('RGB')
    return np.asarray(image, dtype=np.uint8)
  a = np.asarray(image)
  if a.dtype != np.uint8:
    raise ImageError(f'expected uint8 pixels, got {a.dtype}')
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
    raise ImageError(f'expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {a.shape}')
  if a.shape[0] == 0 or a.shape[1] == 0:
    raise ImageError(f'empty image of shape {a.shape}')
  if a.shape[-1] == 1:
    a = np.repeat(a, 3, axis=-1)
  elif a.shape[-1] == 4:  # composite onto white, rounding as transformers does
    alpha = a[..., 3:4] / 255
    a = np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return np.ascontiguousarray(a)


def _resize_shape(h: int, w: int, size: int) -> tuple[int, int]:
  # transformers' get_resize_output_image_size(default_to_square=False).
  short, long = (h, w) if h <= w else (w, h)
  new_short, new_long = size, int(size * long / short)
  return (new_short, new_long) if h <= w else (new_long, new_short)


def _center_crop(a: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
  h, w = a.shape[:2]
  if h < crop_h or w < crop_w:  # pad with zeros, centred, as transformers does
    ph, pw = max(crop_h, h), max(crop_w, w)
    padded = np.zeros((ph, pw, a.shape[2]), a.dtype)
    top, left = (ph - h) // 2, (pw - w) // 2
    padded[top:top + h, left:left + w] = a
    a, h, w = padded, ph, pw
  top, left = (h - crop_h) // 2, (w - crop_w) // 2
  return a[top:top + crop_h, left:left + crop_w]


def prepare(image, cfg: PreprocessConfig) -> np.ndarray:
  """Image (PIL, array, or encoded bytes) → uint8 array of ``cfg.output_shape``."""
  a = decode(image) if isinstance(image, (bytes, bytearray)) else to_rgb(image)
  h, w = a.shape[:2]
  nh, nw = _resize_shape(h, w, cfg.size)
  if (nh, nw) != (h, w):
    a = np.asarray(Image.fromarray(a).resize((nw, nh), resample=cfg.resample))
  if cfg.do_center_crop:
    a = _center_crop(a, *cfg.crop_size)
  return np.ascontiguousarray(a)


def normalize(pixels, cfg: PreprocessConfig):
  """uint8 NHWC → float32 model input. Pure jnp: call it inside jit."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  x = pixels.astype(jnp.float32) * jnp.float32(cfg.rescale_factor)
  mean = jnp.asarray(cfg.mean, jnp.float32)
  std = jnp.asarray(cfg.std, jnp.float32)
  return (x - mean) / std


def prepare_batch(images: Sequence, cfg: PreprocessConfig) -> np.ndarray:
  return np.stack([prepare(im, cfg) for im in images])
