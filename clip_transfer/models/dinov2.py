"""DINOv2 (transformers ``dinov2``, ``dinov2_with_registers``): linen vision tower, vision-only.

What differs from CLIP's tower (read from transformers' ``modeling_dinov2.py`` and
``modeling_dinov2_with_registers.py``):

- a class token and learned position embeddings for ``image_size`` (518 in the
  released checkpoints), *interpolated* to the input's patch grid exactly as
  transformers does it: bicubic, ``align_corners=False``, torch's cubic kernel
  (a = -0.75) for ``dinov2``; the anti-aliased variant (PIL's a = -0.5, widened
  kernel when shrinking) for ``dinov2_with_registers``;
- register tokens inserted after the class token (registers only);
- blocks with LayerScale on both branches and a GELU MLP or a SwiGLU FFN
  (``weights_in`` packs gate and up; their halves in that order);
- a final ``layernorm``; the pooled feature is the DINOv2 paper's linear-eval
  feature: class token ‖ mean of the patch tokens (registers excluded), 2·hidden.

The param tree mirrors the checkpoint names (``encoder/layer/N/attention/
attention/query`` …), so weights convert with the generic rules.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_transfer.models import clip

Dtype = Any
FAMILY = 'dinov2'
POOLING = 'class token ‖ mean patch token after the final layernorm'
MODEL_TYPES = ('dinov2', 'dinov2_with_registers')
# The released checkpoints' processor (BitImageProcessor): shortest side 256, crop 224, ImageNet stats.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RESIZE, CROP = 256, 224


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  mlp_ratio: float = 4
  num_channels: int = 3
  image_size: int = 518  # the position embeddings' grid; inputs may differ (interpolated)
  patch_size: int = 14
  hidden_act: str = 'gelu'
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True
  use_swiglu_ffn: bool = False
  num_register_tokens: int = 0  # > 0: dinov2_with_registers
  antialias: bool = False  # how position embeddings are resized (True for registers)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def intermediate_size(self) -> int:
    hidden = int(self.hidden_size * self.mlp_ratio)
    if self.use_swiglu_ffn:  # two thirds, rounded up to a multiple of 8, as transformers does
      hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    return hidden


# --------------------------------------------------------------------------
# torch.nn.functional.interpolate(mode='bicubic', align_corners=False) as matrices
# --------------------------------------------------------------------------


def _cubic(x, a):
  x = np.abs(x)
  return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@functools.lru_cache(maxsize=None)
def resize_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
  """(n_out, n_in) weights of torch's 1-D bicubic resize (align_corners=False, size given)."""
  scale = n_in / n_out
  w = np.zeros((n_out, n_in), np.float64)
  if not antialias:
    # upsample_bicubic2d: source = (i + 0.5)·scale − 0.5, taps at floor−1 … floor+2,
    # indices clamped to the border, a = −0.75.
    for i in range(n_out):
      src = (i + 0.5) * scale - 0.5
      f = int(np.floor(src))
      t = src - f
      for k, d in zip(range(f - 1, f + 3), (1 + t, t, 1 - t, 2 - t)):
        w[i, min(max(k, 0), n_in - 1)] += _cubic(d, -0.75)
    return w
  # _upsample_bicubic2d_aa (PIL's resampling): support 2·max(scale, 1), a = −0.5, taps
  # outside the input dropped and the rest renormalised.
  support = 2.0 * max(scale, 1.0)
  inv = 1.0 / max(scale, 1.0)
  for i in range(n_out):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), n_in)
    taps = _cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
    w[i, lo:hi] = taps / taps.sum()
  return w


def interpolate_grid(pos, grid_in: int, out_hw: tuple[int, int], antialias: bool):
  """(grid_in², D) position embeddings → (h·w, D), as transformers resizes them (in float32)."""
  d = pos.shape[-1]
  wh = jnp.asarray(resize_matrix(grid_in, out_hw[0], antialias), jnp.float32)
  ww = jnp.asarray(resize_matrix(grid_in, out_hw[1], antialias), jnp.float32)
  p = pos.astype(jnp.float32).reshape(grid_in, grid_in, d)
  hp = jax.lax.Precision.HIGHEST  # exact weights: no reduced-precision matmul passes
  p = jnp.einsum('hi,ijd->hjd', wh, p, precision=hp)
  p = jnp.einsum('wj,hjd->hwd', ww, p, precision=hp)
  return p.reshape(-1, d).astype(pos.dtype)


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------


class Embeddings(nn.Module):
  config: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    init = nn.initializers.truncated_normal(0.02)
    cls = self.param('cls_token', init, (1, 1, c.hidden_size))
    pos = self.param('position_embeddings', init, (1, c.num_patches + 1, c.hidden_size))
    patches = PatchEmbeddings(c, self.dtype, name='patch_embeddings')(pixel_values)
    b, gh, gw, _ = patches.shape
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, c.hidden_size)),
                         patches.reshape(b, gh * gw, c.hidden_size)], axis=1)
    grid = int(c.num_patches ** 0.5)
    if gh * gw == c.num_patches and gh == gw:  # transformers skips the resize then too
      x = x + pos.astype(x.dtype)
    else:
      patch_pos = interpolate_grid(pos[0, 1:], grid, (gh, gw), c.antialias)
      x = x + jnp.concatenate([pos[0, :1], patch_pos])[None].astype(x.dtype)
    if c.num_register_tokens:
      reg = self.param('register_tokens', nn.initializers.zeros,
                       (1, c.num_register_tokens, c.hidden_size))
      x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg.astype(x.dtype), (b, *reg.shape[1:])),
                           x[:, 1:]], axis=1)
    return x


class PatchEmbeddings(nn.Module):
  config: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    return nn.Conv(c.hidden_size, (c.patch_size, c.patch_size),
                   strides=(c.patch_size, c.patch_size), padding='VALID', dtype=self.dtype,
                   name='projection')(pixel_values.astype(self.dtype))


class SelfAttention(nn.Module):
  config: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    b, l, d = x.shape
    h = c.num_attention_heads
    dense = lambda name: nn.Dense(d, use_bias=c.qkv_bias, dtype=self.dtype, name=name)
    q, k, v = (dense(n)(x).reshape(b, l, h, d // h) for n in ('query', 'key', 'value'))
    return clip.dot_product_attention(q, k, v, scale=(d // h) ** -0.5)


class Attention(nn.Module):
  config: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = SelfAttention(self.config, self.dtype, name='attention')(x)
    return _Output(self.config.hidden_size, self.dtype, name='output')(x)


class _Output(nn.Module):
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, dtype=self.dtype, name='dense')(x)


class LayerScale(nn.Module):
  @nn.compact
  def __call__(self, x):
    lam = self.param('lambda1', nn.initializers.ones, (x.shape[-1],))
    return x * lam.astype(x.dtype)


class SwiGLU(nn.Module):
  config: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    gate_up = nn.Dense(2 * c.intermediate_size, dtype=self.dtype, name='weights_in')(x)
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return nn.Dense(c.hidden_size, dtype=self.dtype, name='weights_out')(jax.nn.silu(gate) * up)


class Layer(nn.Module):
  config: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    ln = lambda name: nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name=name)
    x = x + LayerScale(name='layer_scale1')(Attention(c, self.dtype, name='attention')(ln('norm1')(x)))
    if c.use_swiglu_ffn:
      mlp = SwiGLU(c, self.dtype, name='mlp')
    else:
      mlp = clip.MLP(c.intermediate_size, c.hidden_act, self.dtype, name='mlp')
    return x + LayerScale(name='layer_scale2')(mlp(ln('norm2')(x)))


class _LayerList(nn.Module):
  """'layer/0', 'layer/1', …: the checkpoint's ``encoder.layer.N`` names."""

  config: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.config.num_hidden_layers):
      x = Layer(self.config, self.dtype, name=str(i))(x)
    return x


class VisionTransformer(nn.Module):
  """The DINOv2 tower. Input: NHWC pixels, already normalised, any size (position embeddings
  are interpolated to its patch grid)."""

  config: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values) -> clip.VisionOutput:
    c = self.config
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != c.num_channels:
      raise ValueError(f'vision tower expects NHWC input with {c.num_channels} channels, got '
                       f'{tuple(pixel_values.shape)}')
    x = Embeddings(c, self.dtype, name='embeddings')(pixel_values)
    x = _EncoderNamed(c, self.dtype, name='encoder')(x)
    x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name='layernorm')(x)
    patches = x[:, 1 + c.num_register_tokens:]
    pooled = jnp.concatenate([x[:, 0], patches.mean(axis=1)], axis=-1)
    return clip.VisionOutput(last_hidden_state=x, pooler_output=pooled)


class _EncoderNamed(nn.Module):
  config: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _LayerList(self.config, self.dtype, name='layer')(x)


class DINOv2(nn.Module):
  """DINOv2 with ``vision_model`` in ``setup()`` and no text tower (``text_model`` is None)."""

  vision_config: VisionConfig
  dtype: Dtype = jnp.float32

  family = FAMILY
  pooling = POOLING
  text_config = None
  projection_dim = None

  def setup(self):
    self.vision_model = VisionTransformer(self.vision_config, self.dtype)
    self.text_model = None

  def __call__(self, pixel_values):
    return self.vision_model(pixel_values)


def dummy_inputs(module: DINOv2, batch: int = 1):
  # One patch is enough to create every param (the position embeddings' shape comes from
  # the config), and far cheaper than a 518x518 image.
  v = module.vision_config
  return (jnp.zeros((batch, v.patch_size, v.patch_size, v.num_channels), jnp.float32),)


# --------------------------------------------------------------------------
# Presets, checkpoints, preprocessing
# --------------------------------------------------------------------------

PRESETS = {
    # Tests and demos: seconds on a CPU. Position embeddings for a 5x5 grid, inputs
    # cropped to 32 (4x4 patches): every forward interpolates, as the released models do.
    'dinov2-tiny': dict(vision=VisionConfig(hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, mlp_ratio=2, image_size=40,
                                            patch_size=8), resize=36, crop=32),
    # facebook/dinov2-base's shapes (518 grid, 224 inputs), for benchmarks.
    'dinov2-b14': dict(vision=VisionConfig(), resize=RESIZE, crop=CROP),
}

# transformers' Dinov2Config defaults.
_VISION = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4.0,
               num_channels=3, image_size=224, patch_size=14, hidden_act='gelu',
               layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False, num_register_tokens=0)


def preset_module(name: str) -> DINOv2:
  return DINOv2(PRESETS[name]['vision'])


def default_preprocess(vision: VisionConfig):
  """The released checkpoints' BitImageProcessor: shortest side 256, crop 224 (ImageNet stats)."""
  from clip_transfer.data.preprocess import PreprocessConfig  # pylint: disable=g-import-not-at-top
  resize, crop = RESIZE, CROP
  for p in PRESETS.values():
    if p['vision'] == vision:
      resize, crop = p['resize'], p['crop']
  return PreprocessConfig(size=resize, crop_size=(crop, crop), mean=MEAN, std=STD)


def preprocess_from_dir(path: str, vision: VisionConfig):
  """``preprocessor_config.json`` (BitImageProcessor fields) or the released defaults."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from clip_transfer.data.preprocess import PreprocessConfig  # pylint: disable=g-import-not-at-top
  from clip_transfer.models.checkpoints import ModelLoadError  # pylint: disable=g-import-not-at-top

  f = os.path.join(path, 'preprocessor_config.json')
  if not os.path.exists(f):
    return default_preprocess(vision)
  try:
    with open(f) as fh:
      d = json.load(fh)
    crop = d.get('crop_size', {'height': CROP, 'width': CROP})
    crop = (crop['height'], crop['width']) if isinstance(crop, dict) else (crop, crop)
    # Any crop works (the position embeddings are interpolated); from_hf checks the rest.
    return PreprocessConfig.from_hf(
        {'size': {'shortest_edge': RESIZE}, 'image_mean': MEAN, 'image_std': STD, **d},
        int(crop[0]))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ModelLoadError(f'{f}: not a DINOv2 image processor config ({type(e).__name__}: '
                         f'{str(e)[:200]})') from None


def torch_names(state: dict, kind: str) -> dict:  # pylint: disable=unused-argument
  """Checkpoint names → this module's: the ``vision_model`` prefix; transformers-5 names back
  to the released ones (``q_proj`` → ``attention.query`` …, gate/up → packed ``weights_in``)."""
  import numpy as np  # pylint: disable=redefined-outer-name,g-import-not-at-top
  renames = (('.attention.q_proj.', '.attention.attention.query.'),
             ('.attention.k_proj.', '.attention.attention.key.'),
             ('.attention.v_proj.', '.attention.attention.value.'),
             ('.attention.o_proj.', '.attention.output.dense.'),
             ('.mlp.down_proj.', '.mlp.weights_out.'), ('layers.', 'encoder.layer.'))
  out, gate_up = {}, {}
  for key, value in state.items():
    for prefix in ('dinov2.', 'dinov2_with_registers.'):  # *ForImageClassification wrappers
      if key.startswith(prefix):
        key = key[len(prefix):]
    if key.startswith('classifier.') or key == 'embeddings.mask_token':
      continue  # a classification head and the masked-modelling token: unused for features
    for a, b in renames:
      if a in key and not (a == 'layers.' and not key.startswith('layers.')):
        key = key.replace(a, b)
    for part in ('gate_proj', 'up_proj'):
      if f'.mlp.{part}.' in key:
        base, leaf = key.split(f'.mlp.{part}.')
        gate_up.setdefault((base, leaf), {})[part] = value
        break
    else:
      out['vision_model.' + key] = value
  for (base, leaf), d in gate_up.items():
    if len(d) == 2:
      out[f'vision_model.{base}.mlp.weights_in.{leaf}'] = np.concatenate(
          [d['gate_proj'], d['up_proj']])
  return out


def to_torch_names(tensors: dict, vision: VisionConfig) -> dict:
  """``torch_names`` inverted, for a Dinov2Model / Dinov2WithRegistersModel directory: our
  (PyTorch-layout) ``vision_model.*`` names → the released checkpoints' names (which
  transformers reads in every version), plus the unused ``mask_token`` (zeros) the classes
  declare. ``torch_names(to_torch_names(x, v), kind) == x`` (tested)."""
  out = {key.removeprefix('vision_model.'): value for key, value in tensors.items()}
  out['embeddings.mask_token'] = np.zeros((1, vision.hidden_size), np.float32)
  return out


def read_dir(path: str, cfg: dict, kind: str):
  from clip_transfer.models import checkpoints  # pylint: disable=g-import-not-at-top

  where = f'{path}/config.json'
  v = checkpoints.checked(cfg, _VISION, where)
  for key in ('image_size', 'patch_size'):
    if isinstance(cfg.get(key), (list, tuple)):
      raise checkpoints.ModelLoadError(f'{where}: a non-square {key} is not supported')
  checkpoints.check_shape(where, v['hidden_size'], v['num_attention_heads'], v['image_size'],
                          v['patch_size'])
  if kind == 'dinov2':
    v['num_register_tokens'] = 0
  vision = VisionConfig(**v, antialias=kind == 'dinov2_with_registers')
  module = DINOv2(vision)
  flat = checkpoints.read_weights(
      path, lambda state: checkpoints.linen_layout(torch_names(state, kind)))
  params = checkpoints.match(flat, checkpoints.param_shapes(module, dummy_inputs(module)), path)
  return checkpoints.Checkpoint(module, params, preprocess_from_dir(path, vision))
