"""CLIP's random presets and its transformers ``save_pretrained`` directories → linen params."""

from __future__ import annotations

from typing import Any

import numpy as np

from clip_transfer.data.preprocess import PreprocessConfig
from clip_transfer.models import checkpoints
from clip_transfer.models import clip
from clip_transfer.models.checkpoints import Checkpoint

PRESETS: dict[str, dict[str, Any]] = {
    # For tests and demos: seconds on a CPU. 32x32 input, 8x8 patches.
    'tiny': dict(
        vision=clip.VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=32, patch_size=8),
        text=clip.TextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=16, eos_token_id=999),
        projection_dim=32),
    # The real ViT-B/32 shapes (openai/clip-vit-base-patch32), for benchmarks.
    'vit-b32': dict(vision=clip.VisionConfig(), text=clip.TextConfig(), projection_dim=512),
}


# transformers' CLIPVisionConfig / CLIPTextConfig defaults.
_CLIP_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                    hidden_act='quick_gelu', layer_norm_eps=1e-5)
_CLIP_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=8, max_position_embeddings=77, hidden_act='quick_gelu',
                  layer_norm_eps=1e-5, eos_token_id=49407)


def _vision_config(d: dict, where: str) -> clip.VisionConfig:
  c = checkpoints.checked(d, _CLIP_VISION, where)
  checkpoints.check_shape(where, c['hidden_size'], c['num_attention_heads'], c['image_size'],
                          c['patch_size'])
  return clip.VisionConfig(**c)


def _text_config(d: dict, where: str) -> clip.TextConfig:
  c = checkpoints.checked(d, _CLIP_TEXT, where)
  checkpoints.check_shape(where, c['hidden_size'], c['num_attention_heads'], 1, 1)
  return clip.TextConfig(**c)


def preset(name: str, seed: int) -> Checkpoint:
  """``random:NAME`` for one of ``PRESETS``."""
  p = PRESETS[name]
  module = clip.CLIP(p['vision'], p['text'], p['projection_dim'])
  return Checkpoint(module, clip.init_params(module, seed),
                    PreprocessConfig.for_image_size(p['vision'].image_size))


def read_dir(path: str, cfg: dict, kind: str) -> Checkpoint:
  """A ``clip`` / ``clip_vision_model`` save_pretrained directory."""
  where = f'{path}/config.json'
  if kind == 'clip':
    vision = _vision_config(cfg.get('vision_config'), f'{where} vision_config')
    text = _text_config(cfg.get('text_config'), f'{where} text_config')
  else:
    vision, text = _vision_config(cfg, where), None
  projection_dim = checkpoints.checked(cfg, {'projection_dim': 512}, where)['projection_dim']
  flat = checkpoints.read_weights(path, lambda state: _from_pytorch_names(state, kind))
  if 'visual_projection/kernel' not in flat:
    projection_dim = None
  module = clip.CLIP(vision, text, projection_dim,
                     logit_scale_init_value=float(cfg.get('logit_scale_init_value', 2.6592)))
  params = checkpoints.match(flat, clip.param_shapes(module), path)
  return Checkpoint(module, params, PreprocessConfig.from_dir(path, vision.image_size))


def _from_pytorch_names(state: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
  """PyTorch CLIP names/layouts → linen '/'-paths/layouts."""
  renamed = {}
  for key, value in state.items():
    parts = key.split('.')
    if parts[0] == 'clip':  # wrappers such as CLIPForImageClassification
      parts = parts[1:]
    if kind == 'clip_vision_model' and parts[0] not in ('vision_model', 'visual_projection'):
      # transformers 5 saves CLIPVisionModel without the 'vision_model.' prefix; 4.x kept it.
      parts = ['vision_model'] + parts
    renamed['.'.join(parts)] = value
  return checkpoints.linen_layout(renamed)
