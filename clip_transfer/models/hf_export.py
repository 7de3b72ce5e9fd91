"""Our params → a Hugging Face ``save_pretrained`` directory: the inverse of ``checkpoints``.

``save_vision(pretrained, vision_params, out_dir, projection=None)`` writes
``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` that
transformers' PyTorch classes load (``CLIPVisionModel``, or
``CLIPVisionModelWithProjection`` when a projection is given). No torch is needed:
the tensors are renamed and transposed back with numpy and written with safetensors.

One exporter per family, registered by the linen module's class name in
``EXPORTERS`` (a subclass, such as OpenCLIP's, uses its base's); a new family adds its
own (the reading side lives beside it in ``checkpoints``).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import flax
import numpy as np

from clip_transfer.errors import UserError


def linen_to_pytorch(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """'/'-joined linen paths → PyTorch names/layouts: ``clip_checkpoint._from_pytorch_names`` inverted."""
  out = {}
  for path, value in flat.items():
    *mod, leaf = path.split('/')
    value = np.asarray(value, np.float32)
    if leaf == 'kernel':
      if value.ndim == 4:  # conv (kh, kw, in, out) → (out, in, kh, kw)
        value = value.transpose(3, 2, 0, 1)
      else:  # Dense (in, out) → Linear (out, in)
        value = value.T
      leaf = 'weight'
    elif leaf in ('scale', 'embedding'):  # LayerNorm scale, nn.Embed table
      leaf = 'weight'
    out['.'.join(mod + [leaf])] = np.ascontiguousarray(value)
  return out


def _preprocessor_json(cfg) -> dict:
  """CLIPImageProcessor's fields for our PreprocessConfig (``PreprocessConfig.from_hf`` inverted)."""
  return {'image_processor_type': 'CLIPImageProcessor', 'do_convert_rgb': True,
          'do_resize': True, 'size': {'shortest_edge': int(cfg.size)}, 'resample': int(cfg.resample),
          'do_center_crop': bool(cfg.do_center_crop),
          'crop_size': {'height': int(cfg.crop_size[0]), 'width': int(cfg.crop_size[1])},
          'do_rescale': True, 'rescale_factor': float(cfg.rescale_factor), 'do_normalize': True,
          'image_mean': [float(m) for m in cfg.mean], 'image_std': [float(s) for s in cfg.std]}


def _save_clip_vision(pretrained, vision_params, out_dir: str,
                      projection: Optional[np.ndarray]) -> str:
  import transformers  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  v = pretrained.module.vision_config
  arch = 'CLIPVisionModelWithProjection' if projection is not None else 'CLIPVisionModel'
  config = transformers.CLIPVisionConfig(
      hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
      num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
      num_channels=v.num_channels, image_size=v.image_size, patch_size=v.patch_size,
      hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps,
      projection_dim=(projection.shape[1] if projection is not None
                      else pretrained.module.projection_dim or 512))
  config.architectures = [arch]
  config.save_pretrained(out_dir)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(vision_params), sep='/')
  tensors = linen_to_pytorch({k: np.asarray(a) for k, a in flat.items()})
  if projection is not None:
    # CLIPVisionModelWithProjection nests the tower under vision_model (CLIPVisionModel does not).
    tensors = {f'vision_model.{k}': a for k, a in tensors.items()}
    tensors['visual_projection.weight'] = np.ascontiguousarray(np.asarray(projection,
                                                                          np.float32).T)
  save_file(tensors, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
  with open(os.path.join(out_dir, 'preprocessor_config.json'), 'w') as fh:
    json.dump(_preprocessor_json(pretrained.preprocess), fh, indent=1)
  return arch


def _vision_tensors(vision_params) -> dict[str, np.ndarray]:
  """The tower's params under the ``vision_model.*`` PyTorch names ``checkpoints`` reads."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(vision_params), sep='/')
  return {f'vision_model.{k}': a for k, a in
          linen_to_pytorch({k: np.asarray(a) for k, a in flat.items()}).items()}


def _write(out_dir: str, config, tensors: dict, preprocessor: dict) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  config.save_pretrained(out_dir)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
            os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
  with open(os.path.join(out_dir, 'preprocessor_config.json'), 'w') as fh:
    json.dump(preprocessor, fh, indent=1)


def _no_projection(family: str, projection) -> None:
  if projection is not None:  # these families' projected feature is the pooled one itself
    raise UserError(f'no Hugging Face export for a projection on {family} models')


def _save_siglip_vision(pretrained, vision_params, out_dir: str,
                        projection: Optional[np.ndarray]) -> str:
  import transformers  # pylint: disable=g-import-not-at-top
  from clip_transfer.models import siglip  # pylint: disable=g-import-not-at-top

  _no_projection('SigLIP', projection)
  v = pretrained.module.vision_config
  config = transformers.SiglipVisionConfig(
      hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
      num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
      num_channels=v.num_channels, image_size=v.image_size, patch_size=v.patch_size,
      hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps)
  config.architectures = ['SiglipVisionModel']
  cfg = pretrained.preprocess
  if cfg.resize_mode != 'squash' or cfg.do_center_crop:
    raise UserError('no Hugging Face export for a SigLIP model with a resize-and-crop '
                    'preprocessing (SiglipImageProcessor resizes to the square)')
  # SiglipImageProcessor (``siglip.preprocess_from_dir`` inverted): resize to the square, no crop.
  h, w = (int(s) for s in cfg.crop_size)
  preprocessor = {'image_processor_type': 'SiglipImageProcessor', 'do_convert_rgb': True,
                  'do_resize': True, 'size': {'height': h, 'width': w},
                  'resample': int(cfg.resample), 'do_rescale': True,
                  'rescale_factor': float(cfg.rescale_factor), 'do_normalize': True,
                  'image_mean': [float(m) for m in cfg.mean],
                  'image_std': [float(s) for s in cfg.std]}
  _write(out_dir, config, siglip.to_torch_names(_vision_tensors(vision_params)), preprocessor)
  return 'SiglipVisionModel'


def _save_dinov2_vision(pretrained, vision_params, out_dir: str,
                        projection: Optional[np.ndarray]) -> str:
  import transformers  # pylint: disable=g-import-not-at-top
  from clip_transfer.models import dinov2  # pylint: disable=g-import-not-at-top

  _no_projection('DINOv2', projection)
  v = pretrained.module.vision_config
  # Dinov2WithRegistersConfig validates mlp_ratio as an int (our reader gives 4.0).
  ratio = int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else float(v.mlp_ratio)
  common = dict(hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers,
                num_attention_heads=v.num_attention_heads, mlp_ratio=ratio,
                num_channels=v.num_channels, image_size=v.image_size, patch_size=v.patch_size,
                hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps, qkv_bias=v.qkv_bias,
                use_swiglu_ffn=v.use_swiglu_ffn)
  if v.num_register_tokens:  # registers come with the anti-aliased position resize (read_dir)
    arch = 'Dinov2WithRegistersModel'
    config = transformers.Dinov2WithRegistersConfig(
        **common, num_register_tokens=v.num_register_tokens)
  else:
    arch = 'Dinov2Model'
    config = transformers.Dinov2Config(**common)
  config.architectures = [arch]
  # BitImageProcessor: CLIPImageProcessor's fields (shortest side, centre crop).
  preprocessor = {**_preprocessor_json(pretrained.preprocess),
                  'image_processor_type': 'BitImageProcessor'}
  _write(out_dir, config, dinov2.to_torch_names(_vision_tensors(vision_params), v), preprocessor)
  return arch


# Linen module class name → its exporter(pretrained, vision params, out_dir, projection) → class.
EXPORTERS: dict[str, Callable[..., str]] = {'CLIP': _save_clip_vision,
                                            'SigLIP': _save_siglip_vision,
                                            'DINOv2': _save_dinov2_vision}
# Linen module class name → (the transformers image processor class, the Python lines that
# make the feature ``x`` our head reads from the tower's output ``out``; ``{registers}`` is
# the first patch token's index: 1 + the register count).
USAGE = {
    'CLIP': ('CLIPImageProcessor', {'embedding': 'x = out.pooler_output',
                                    'projected': 'x = out.image_embeds\n'
                                                 'x = x / x.norm(dim=-1, keepdim=True)'}),
    'SigLIP': ('SiglipImageProcessor', {
        'embedding': 'x = out.pooler_output  # the attention-pool (MAP) head\'s output',
        'projected': 'x = out.pooler_output  # SigLIP\'s image embedding is the pooled feature\n'
                     'x = x / x.norm(dim=-1, keepdim=True)'}),
    'DINOv2': ('BitImageProcessor', {
        'embedding': '# last_hidden_state is already after the final LayerNorm; the feature is\n'
                     '# the class token ‖ the mean of the patch tokens (registers excluded),\n'
                     '# not out.pooler_output (the class token alone).\n'
                     'h = out.last_hidden_state\n'
                     'x = torch.cat([h[:, 0], h[:, {first_patch}:].mean(dim=1)], dim=-1)'}),
}


def _registered(module, table: dict):
  """The entry for the module's class or its nearest registered base (OpenCLIP → CLIP's)."""
  for cls in type(module).__mro__:
    if cls.__name__ in table:
      return table[cls.__name__]
  return None


def usage(pretrained, feature: str) -> tuple[str, str]:
  """(processor class, the lines computing the head's input ``x`` from ``out = tower(...)``)."""
  processor, lines = _registered(pretrained.module, USAGE)
  first = 1 + getattr(pretrained.module.vision_config, 'num_register_tokens', 0)
  return processor, lines[feature].replace('{first_patch}', str(first))


def save_vision(pretrained, vision_params, out_dir: str,
                projection: Optional[np.ndarray] = None) -> str:
  """Writes the vision tower as a save_pretrained directory; returns the transformers class."""
  exporter = _registered(pretrained.module, EXPORTERS)
  if exporter is None:
    raise UserError(f'no Hugging Face export for {type(pretrained.module).__name__} models yet '
                    f'(have: {", ".join(EXPORTERS)})')
  return exporter(pretrained, vision_params, out_dir, projection)
