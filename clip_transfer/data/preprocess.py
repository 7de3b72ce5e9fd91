"""CLIP preprocessing, split at the host/device boundary.

Host side (``prepare``): decode, convert to RGB, resize the shortest side with
bicubic, center crop — all in ``uint8``, the way transformers'
``CLIPImageProcessor`` does it (it resizes uint8 arrays through PIL too).
Device side (``normalize``): rescale and mean/std, meant to run inside jit so
only uint8 bytes cross to the device (4x fewer than float32).

``ParallelPrepare`` runs ``prepare`` on a process-wide thread pool (PIL releases
the GIL while it decodes and resizes), results in input order, a bounded
number in flight: the pool keeps preparing while the caller waits on the device.
``fast_decode`` (opt-in) lets libjpeg decode at 1/2, 1/4 or 1/8 scale in the DCT
domain, never below the resize target, before the same exact resize and crop.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import json
import os
import threading
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from clip_transfer.errors import UserError

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
  # JPEGs decoded at reduced DCT scale before the resize (not CLIPImageProcessor's
  # pixels; recorded in metadata only when on, so default datasets' files stay unchanged).
  fast_decode: bool = False
  # 'shortest': the shortest side to `size`, aspect kept; 'squash': both sides to `size`
  # (open_clip's resize_mode='squash'). Recorded only when not the default, as fast_decode.
  resize_mode: str = 'shortest'
  # Center-crop offset (h - crop) / 2: 'floor' as transformers, 'round' as torchvision's
  # CenterCrop (open_clip); they differ by a pixel when h - crop is 3 mod 4.
  crop_offset: str = 'floor'

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
    d = dataclasses.asdict(self)
    for name in ('fast_decode', 'resize_mode', 'crop_offset'):
      if d[name] == PREPROCESS_DEFAULTS[name]:
        del d[name]
    return d

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'PreprocessConfig':
    return cls(**{**d, 'crop_size': tuple(d['crop_size']), 'mean': tuple(d['mean']),
                  'std': tuple(d['std'])})


PREPROCESS_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PreprocessConfig)}


def decode(data: bytes, draft_size: Optional[int] = None) -> np.ndarray:
  """Encoded image bytes → HWC uint8 RGB. Raises ImageError.

  ``draft_size``: a JPEG is decoded at the smallest DCT scale whose shortest
  side is still >= this (PIL's ``Image.draft``); other formats are unaffected.
  """
  if not data:
    raise ImageError('empty file (0 bytes)')
  try:
    with Image.open(io.BytesIO(data)) as img:
      w, h = img.size
      if w * h > MAX_PIXELS:
        raise ImageError(f'image too large: {w}x{h} pixels (limit {MAX_PIXELS})')
      if draft_size is not None and img.format == 'JPEG':
        nh, nw = _resize_shape(h, w, draft_size)
        # draft picks the largest reduction keeping both sides >= the request.
        img.draft('RGB', (nw, nh))
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


def _center_crop(a: np.ndarray, crop_h: int, crop_w: int, offset: str = 'floor') -> np.ndarray:
  h, w = a.shape[:2]
  if h < crop_h or w < crop_w:  # pad with zeros, centred, as transformers does
    ph, pw = max(crop_h, h), max(crop_w, w)
    padded = np.zeros((ph, pw, a.shape[2]), a.dtype)
    top, left = (ph - h) // 2, (pw - w) // 2
    padded[top:top + h, left:left + w] = a
    a, h, w = padded, ph, pw
  if offset == 'round':  # torchvision's CenterCrop: int(round(...)), ties to even
    top, left = int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))
  else:
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
  return a[top:top + crop_h, left:left + crop_w]


def prepare(image, cfg: PreprocessConfig) -> np.ndarray:
  """Image (PIL, array, or encoded bytes) → uint8 array of ``cfg.output_shape``."""
  if isinstance(image, (bytes, bytearray)):
    # fast_decode: a drafted JPEG arrives already near the target; the exact
    # resize below takes it the rest of the way.
    a = decode(image, draft_size=cfg.size if cfg.fast_decode else None)
  else:
    a = to_rgb(image)
  h, w = a.shape[:2]
  if cfg.resize_mode == 'squash':
    nh, nw = cfg.size, cfg.size
  else:
    nh, nw = _resize_shape(h, w, cfg.size)
  if (nh, nw) != (h, w):
    a = np.asarray(Image.fromarray(a).resize((nw, nh), resample=cfg.resample))
  if cfg.do_center_crop:
    a = _center_crop(a, *cfg.crop_size, cfg.crop_offset)
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


# --------------------------------------------------------------------------
# Host preprocessing on every core, feeding one model
# --------------------------------------------------------------------------

_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def host_cores() -> int:
  """Cores this process may run on (a container's or taskset's share, not the machine's)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def shared_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
  """One pool per process and size, shared by every caller (Beam runs several DoFn copies).

  Threads, not processes: PIL releases the GIL while it decodes and resizes
  (2 threads: 1.75 CPU-seconds per second here), and threads need no pickling
  and no second copy of anything.
  """
  with _POOLS_LOCK:
    if threads not in _POOLS:
      _POOLS[threads] = concurrent.futures.ThreadPoolExecutor(
          threads, thread_name_prefix='prepare')
    return _POOLS[threads]


class ParallelPrepare:
  """``prepare`` over a stream: results in input order, at most ``window`` in flight.

  ``put(tag, image)`` hands back the results that are ready, oldest first, as
  ``(tag, pixels or the exception prepare raised)``; ``drain()`` the rest. With
  ``threads == 1`` it is the plain serial loop (the reference the tests compare to);
  ``threads == 0`` means one per core of this process.
  The window lets the pool run ahead of its caller: while the caller's thread
  waits on the device for batch k, the pool prepares the next ``window`` images.
  """

  def __init__(self, cfg: PreprocessConfig, threads: int, window: int):
    self._cfg = cfg
    threads = threads or host_cores()
    self._pool = None if threads == 1 else shared_pool(threads)
    self._window = max(1, window)
    self._pending: collections.deque = collections.deque()

  def put(self, tag, image) -> list[tuple[Any, Any]]:
    return self.call(tag, prepare, image, self._cfg)

  def call(self, tag, fn, *args) -> list[tuple[Any, Any]]:
    """As ``put``, for any ``fn(*args)`` (e.g. a chunk of inputs read and prepared together)."""
    if self._pool is None:
      return [(tag, _call(fn, *args))]
    self._pending.append((tag, self._pool.submit(fn, *args)))
    out = []
    while self._pending and (len(self._pending) > self._window or self._pending[0][1].done()):
      out.append(self._pop())
    return out

  def drain(self) -> Iterator[tuple[Any, Any]]:
    while self._pending:
      yield self._pop()

  def _pop(self):
    tag, future = self._pending.popleft()
    try:
      return tag, future.result()
    except Exception as e:  # pylint: disable=broad-except  (handed to the caller)
      return tag, e


def _call(fn, *args):
  try:
    return fn(*args)
  except Exception as e:  # pylint: disable=broad-except  (handed to the caller)
    return e
