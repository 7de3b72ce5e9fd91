"""SigLIP (transformers ``siglip``, also fixed-resolution SigLIP 2): linen towers, weights, preprocessing.

The encoder blocks are CLIP's (the same pre-LN layer and parameter names, see
``clip_transfer.models.clip``), used bidirectionally in both towers. What differs:

- vision: patch embedding with a bias and no class token; ``post_layernorm`` on
  every token; the pooled feature is the attention-pool (MAP) ``head``: a learned
  ``probe`` query attending over the tokens (``torch.nn.MultiheadAttention``, its
  packed ``in_proj`` split into q/k/v here), then LayerNorm + MLP with a residual;
- text: no causal mask, the *last* token's state (``final_layer_norm``) through a
  ``head`` Dense; prompts are padded to the full length;
- scores: ``sigmoid(exp(logit_scale) · cos + logit_bias)``.

The param tree mirrors the PyTorch names, so a checkpoint converts with the
generic rules in ``clip_transfer.models.checkpoints``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_transfer.models import clip

Dtype = Any
FAMILY = 'siglip'
POOLING = 'attention-pool (MAP) head over post_layernorm tokens'
MODEL_TYPES = ('siglip', 'siglip_vision_model')
# Processor defaults (SiglipImageProcessor): resize to the square, no crop, mean/std 0.5.
MEAN = STD = (0.5, 0.5, 0.5)


# CLIP's config fields (clip.VisionConfig / TextConfig) with SigLIP's defaults, plus what
# only SigLIP's text tower has.
@dataclasses.dataclass(frozen=True)
class VisionConfig(clip.VisionConfig):
  patch_size: int = 16
  hidden_act: str = 'gelu_pytorch_tanh'
  layer_norm_eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class TextConfig(clip.TextConfig):
  vocab_size: int = 32000
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_attention_heads: int = 12
  max_position_embeddings: int = 64
  hidden_act: str = 'gelu_pytorch_tanh'
  layer_norm_eps: float = 1e-6
  eos_token_id: int = 1
  projection_size: int = 768
  pad_token_id: int = 1

  pools_at = 'last'  # the text tower pools at the last position (max-length padding)


class VisionEmbeddings(nn.Module):
  config: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size),
                      strides=(c.patch_size, c.patch_size), padding='VALID',
                      dtype=self.dtype, name='patch_embedding')(pixel_values.astype(self.dtype))
    b = patches.shape[0]
    patches = patches.reshape(b, -1, c.hidden_size)
    pos = nn.Embed(c.num_patches, c.hidden_size, name='position_embedding')(
        jnp.arange(c.num_patches))
    return patches + pos[None].astype(patches.dtype)


class PoolingAttention(nn.Module):
  """``torch.nn.MultiheadAttention(probe, x, x)`` with the packed in_proj split into q/k/v."""

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, x):
    b, l, d = x.shape
    h = self.num_heads
    dense = lambda name: nn.Dense(d, dtype=self.dtype, name=name)
    q = dense('q_proj')(query) * ((d // h) ** -0.5)
    k, v = dense('k_proj')(x), dense('v_proj')(x)
    q = q.reshape(b, -1, h, d // h)
    k, v = (t.reshape(b, l, h, d // h) for t in (k, v))
    return dense('out_proj')(clip.dot_product_attention(q, k, v))


class PoolingHead(nn.Module):
  """The MAP head: one learned query attends over the tokens; LN + MLP with a residual."""

  config: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    probe = self.param('probe', nn.initializers.normal(0.02), (1, 1, c.hidden_size))
    query = jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, c.hidden_size))
    h = PoolingAttention(c.num_attention_heads, self.dtype, name='attention')(query, x)
    y = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name='layernorm')(h)
    h = h + clip.MLP(c.intermediate_size, c.hidden_act, self.dtype, name='mlp')(y)
    return h[:, 0]


class VisionTransformer(nn.Module):
  """The SigLIP vision tower. Input: NHWC pixels, already normalised."""

  config: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values) -> clip.VisionOutput:
    c = self.config
    clip.check_input(pixel_values, c)
    x = VisionEmbeddings(c, self.dtype, name='embeddings')(pixel_values)
    x = clip.Encoder(c, self.dtype, name='encoder')(x)
    x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name='post_layernorm')(x)
    pooled = PoolingHead(c, self.dtype, name='head')(x)
    return clip.VisionOutput(last_hidden_state=x, pooler_output=pooled)


class TextTransformer(nn.Module):
  config: TextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None) -> clip.TextOutput:
    c = self.config
    x = clip.TextEmbeddings(c, name='embeddings')(input_ids).astype(self.dtype)
    mask = None
    if attention_mask is not None:
      mask = attention_mask[:, None, None, :].astype(bool)
    x = clip.Encoder(c, self.dtype, name='encoder')(x, mask)  # bidirectional, unlike CLIP
    x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name='final_layer_norm')(x)
    # The last position, padding or not: SigLIP was trained on max-length padded text.
    pooled = nn.Dense(c.projection_size, dtype=self.dtype, name='head')(x[:, -1])
    return clip.TextOutput(last_hidden_state=x, pooler_output=pooled)


class SigLIP(nn.Module):
  """SigLIP with ``vision_model`` and ``text_model`` (None when vision-only) in ``setup()``."""

  vision_config: VisionConfig
  text_config: Optional[TextConfig] = None
  dtype: Dtype = jnp.float32

  family = FAMILY
  pooling = POOLING

  def setup(self):
    self.vision_model = VisionTransformer(self.vision_config, self.dtype)
    if self.text_config is not None:
      self.text_model = TextTransformer(self.text_config, self.dtype)
      self.logit_scale = self.param('logit_scale', nn.initializers.constant(jnp.log(10.0)), ())
      self.logit_bias = self.param('logit_bias', nn.initializers.constant(-10.0), ())
    else:
      self.text_model = None

  @property
  def projection_dim(self) -> Optional[int]:
    """The shared image-text space (the pooled image feature itself); None when vision-only."""
    return None if self.text_config is None else self.text_config.projection_size

  def project_image(self, pooled):
    """SigLIP's image embedding is the pooled feature (no separate projection)."""
    return pooled

  def get_image_features(self, pixel_values):
    return self.vision_model(pixel_values).pooler_output

  def get_text_features(self, input_ids, attention_mask=None):
    if self.text_model is None:
      raise ValueError('this checkpoint has no text tower')
    return self.text_model(input_ids, attention_mask).pooler_output

  def logit_params(self):
    """(logit_scale, logit_bias): scores are sigmoid(exp(scale) · cos + bias)."""
    return self.logit_scale, self.logit_bias

  def __call__(self, pixel_values, input_ids=None, attention_mask=None):
    """Returns dict(image_embeds, text_embeds, logits_per_image, logits_per_text)."""
    image = self.get_image_features(pixel_values)
    if input_ids is None:
      return {'image_embeds': image}
    text = self.get_text_features(input_ids, attention_mask)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    logits_per_text = text @ image.T * jnp.exp(self.logit_scale) + self.logit_bias
    return {'image_embeds': image, 'text_embeds': text,
            'logits_per_image': logits_per_text.T, 'logits_per_text': logits_per_text}


def dummy_inputs(module: SigLIP, batch: int = 1):
  v = module.vision_config
  pixels = jnp.zeros((batch, v.image_size, v.image_size, v.num_channels), jnp.float32)
  if module.text_config is None:
    return (pixels,)
  return (pixels, jnp.zeros((batch, module.text_config.max_position_embeddings), jnp.int32))


# --------------------------------------------------------------------------
# Presets, checkpoints, preprocessing
# --------------------------------------------------------------------------

PRESETS = {
    # Tests and demos: seconds on a CPU (32x32 input, 8x8 patches).
    'siglip-tiny': dict(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, image_size=32, patch_size=8),
        text=TextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=16, projection_size=64, pad_token_id=999,
                        eos_token_id=999)),  # the generated byte-level tokenizer's EOS/pad
    # google/siglip-base-patch16-224's shapes, for benchmarks.
    'siglip-b16': dict(vision=VisionConfig(), text=TextConfig()),
}

# transformers' SiglipVisionConfig / SiglipTextConfig defaults.
_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
               hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6)
_TEXT = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
             num_attention_heads=12, max_position_embeddings=64, hidden_act='gelu_pytorch_tanh',
             layer_norm_eps=1e-6, projection_size=0, pad_token_id=1, eos_token_id=1)


def preset_module(name: str) -> SigLIP:
  p = PRESETS[name]
  return SigLIP(p['vision'], p['text'])


def default_preprocess(vision: VisionConfig):
  """SiglipImageProcessor's defaults at the model's resolution."""
  from clip_transfer.data.preprocess import PreprocessConfig  # pylint: disable=g-import-not-at-top
  s = vision.image_size
  return PreprocessConfig(size=s, crop_size=(s, s), mean=MEAN, std=STD, do_center_crop=False,
                          resize_mode='squash')


def preprocess_from_dir(path: str, vision: VisionConfig):
  """``preprocessor_config.json`` (SiglipImageProcessor fields) or the defaults."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from clip_transfer.models.checkpoints import ModelLoadError  # pylint: disable=g-import-not-at-top

  cfg = default_preprocess(vision)
  f = os.path.join(path, 'preprocessor_config.json')
  if not os.path.exists(f):
    return cfg
  try:
    with open(f) as fh:
      d = json.load(fh)
    size = d.get('size', {'height': vision.image_size, 'width': vision.image_size})
    if isinstance(size, dict):
      size = (int(size['height']), int(size['width']))
    else:
      size = (int(size), int(size))
    cfg = dataclasses.replace(
        cfg, size=size[0], crop_size=size,
        mean=tuple(float(m) for m in d.get('image_mean', MEAN)),
        std=tuple(float(s) for s in d.get('image_std', STD)),
        resample=int(d.get('resample', cfg.resample)),
        rescale_factor=float(d.get('rescale_factor', cfg.rescale_factor)))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ModelLoadError(f'{f}: not a SigLIP image processor config ({type(e).__name__}: '
                         f'{str(e)[:200]})') from None
  if size != (vision.image_size, vision.image_size) or not d.get('do_resize', True):
    raise ModelLoadError(f'{f}: the processor makes {size[0]}x{size[1]} images but the model '
                         f'expects {vision.image_size}x{vision.image_size}')
  return cfg


def torch_names(state: dict, kind: str) -> dict:
  """SigLIP's PyTorch names → this module's: vision prefix, the MAP head's packed in_proj split."""
  out = {}
  for key, value in state.items():
    if kind == 'siglip_vision_model' and not key.startswith('vision_model.'):
      key = 'vision_model.' + key  # SiglipVisionModel saves without the prefix
    if key.endswith('head.attention.in_proj_weight') or key.endswith('head.attention.in_proj_bias'):
      base, leaf = key.rsplit('.in_proj_', 1)
      for name, part in zip(_IN_PROJ, _split3(value)):
        out[f'{base}.{name}.{leaf}'] = part
      continue
    out[key] = value
  return out


def to_torch_names(tensors: dict) -> dict:
  """``torch_names`` inverted, for a SiglipVisionModel directory: our (PyTorch-layout)
  ``vision_model.*`` names → the class's own (no prefix), the MAP head's q/k/v packed back
  into ``in_proj``. ``torch_names(to_torch_names(x), 'siglip_vision_model') == x`` (tested)."""
  out, packed = {}, {}
  for key, value in tensors.items():
    key = key.removeprefix('vision_model.')
    base, _, rest = key.rpartition('.attention.')
    if base.endswith('head') and rest.split('.')[0] in _IN_PROJ:
      name, leaf = rest.split('.')
      packed.setdefault(f'{base}.attention.in_proj_{leaf}', {})[name] = value
      continue
    out[key] = value
  for key, parts in packed.items():
    out[key] = np.concatenate([parts[n] for n in _IN_PROJ])
  return out


_IN_PROJ = ('q_proj', 'k_proj', 'v_proj')  # in_proj's thirds, in order (both directions)


def _split3(a):
  n = a.shape[0] // 3
  return a[:n], a[n:2 * n], a[2 * n:]


def read_dir(path: str, cfg: dict, kind: str):
  from clip_transfer.models import checkpoints  # pylint: disable=g-import-not-at-top

  where = f'{path}/config.json'
  if kind == 'siglip':
    vd, td = cfg.get('vision_config'), cfg.get('text_config')
    if td is None:
      td = {}
  else:
    vd, td = cfg, None
  if kind == 'siglip' and vd is None:
    vd = {}
  if not isinstance(vd, dict) or (td is not None and not isinstance(td, dict)):
    raise checkpoints.ModelLoadError(f'{where}: vision_config / text_config must be objects')
  use_head = vd.get('vision_use_head', True)
  if use_head is not True:
    raise checkpoints.ModelLoadError(
        f'{where}: vision_use_head={use_head!r}: this checkpoint has no attention-pool head, '
        'the feature clip_transfer pools; use a SigLIP checkpoint with its head')
  v = checkpoints.checked(vd, _VISION, f'{where} vision_config')
  checkpoints.check_shape(where, v['hidden_size'], v['num_attention_heads'], v['image_size'],
                          v['patch_size'])
  vision = VisionConfig(**v)
  text = None
  if td is not None:
    t = checkpoints.checked(td, _TEXT, f'{where} text_config')
    checkpoints.check_shape(where, t['hidden_size'], t['num_attention_heads'], 1, 1)
    t['projection_size'] = t['projection_size'] or t['hidden_size']
    if t['projection_size'] != vision.hidden_size:
      raise checkpoints.ModelLoadError(
          f'{where}: text projection_size {t["projection_size"]} differs from the vision '
          f'hidden_size {vision.hidden_size}: the two towers do not share a space')
    text = TextConfig(**t)
  module = SigLIP(vision, text)
  flat = checkpoints.read_weights(
      path, lambda state: checkpoints.linen_layout(torch_names(state, kind)))
  params = checkpoints.match(flat, checkpoints.param_shapes(module, dummy_inputs(module)), path)
  return checkpoints.Checkpoint(module, params, preprocess_from_dir(path, vision))
