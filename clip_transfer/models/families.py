"""Which family a checkpoint belongs to: the one place that picks a reader (``read``).

A family is one module in ``clip_transfer.models`` holding its linen towers, its
checkpoint mapping, its preprocessing and its pooled feature. Detection:

- ``hf-hub:`` names and directories holding ``open_clip_config.json`` → OpenCLIP
  (``models.open_clip``);
- otherwise ``config.json``'s ``model_type``: ``clip`` / ``clip_vision_model``,
  ``siglip`` / ``siglip_vision_model``, ``dinov2`` / ``dinov2_with_registers``;
- ``random:<preset>`` names: each family's ``PRESETS``;
- any other name is a hub id, downloaded and detected as a directory.

The family modules hold their own mapping and call ``models.checkpoints`` for the shared
weight-file reading; only this module imports them all.
"""

from __future__ import annotations

import os
from typing import Any

from clip_transfer.models import checkpoints
from clip_transfer.models import clip
from clip_transfer.models import clip_checkpoint
from clip_transfer.models import dinov2
from clip_transfer.models import open_clip
from clip_transfer.models import siglip
from clip_transfer.models.checkpoints import RANDOM_PREFIX, Checkpoint, ModelLoadError

FAMILIES_BY_TYPE = {
    'clip': 'clip', 'clip_vision_model': 'clip',
    'siglip': 'siglip', 'siglip_vision_model': 'siglip',
    'dinov2': 'dinov2', 'dinov2_with_registers': 'dinov2',
}
# model_types we know and refuse, with the way out.
REFUSED = {
    'siglip2': ('NaFlex SigLIP 2 (variable resolution) is not supported; use a fixed-resolution '
                'SigLIP 2 checkpoint such as google/siglip2-base-patch16-224 (model_type siglip)'),
}


# What ``last:N`` partitions in every family's vision tower (regexes over the tower's own
# paths): what comes before the encoder layers (frozen with them), the numbered layer
# container, what comes after (trained with the last layers: final norms, SigLIP's MAP head).
# CLIP/OpenCLIP: embeddings, pre_layrnorm | encoder/layers/N | post_layernorm;
# SigLIP: embeddings | encoder/layers/N | post_layernorm, head;
# DINOv2: embeddings | encoder/layer/N | layernorm.
TOWER_BEFORE = '(embeddings|pre_layrnorm)'
TOWER_LAYERS = 'encoder/layers?'
TOWER_AFTER = '(post_layernorm|head|layernorm)'


# Family name → its module (``clip``'s checkpoint reading lives in ``clip_checkpoint``).
MODULES = {'clip': clip, 'siglip': siglip, 'dinov2': dinov2}
_READERS = {'clip': clip_checkpoint, 'siglip': siglip, 'dinov2': dinov2}


def read(name_or_path: str, seed: int = 0) -> Checkpoint:
  """Reads a preset, a local directory (any family) or a hub id (no cache).

  The module computes in float32; ``clip_transfer.models.load`` clones it for bf16.
  """
  if name_or_path.startswith(RANDOM_PREFIX):
    return _preset(name_or_path, seed)
  if name_or_path.startswith(open_clip.HUB_PREFIX):
    return open_clip.read_hub(name_or_path)
  path = os.path.expanduser(name_or_path)
  if os.path.isdir(path) and open_clip.is_open_clip_dir(path):
    return open_clip.read_dir(path)
  if os.path.isdir(path):
    return read_dir(path)
  if os.path.exists(path):
    raise ModelLoadError(f'{name_or_path} is a file; pass the directory holding config.json '
                         'and the weights')
  if name_or_path.startswith(('/', '.', '~')) or name_or_path.count('/') > 1:
    raise ModelLoadError(f'no such model directory: {name_or_path}')
  local, revision = checkpoints.download(name_or_path)
  ckpt = read_dir(local)
  ckpt.revision = revision
  return ckpt


def preset_names() -> list[str]:
  names = list(clip_checkpoint.PRESETS)
  for family in (siglip, dinov2):
    names += list(family.PRESETS)
  return names


def _preset(name: str, seed: int) -> Checkpoint:
  preset = name[len(RANDOM_PREFIX):]
  if preset in clip_checkpoint.PRESETS:
    return clip_checkpoint.preset(preset, seed)
  for family in (siglip, dinov2):
    if preset in family.PRESETS:
      module = family.preset_module(preset)
      return Checkpoint(module, init_params(module, seed),
                        family.default_preprocess(module.vision_config))
  raise ModelLoadError(f'unknown preset {name!r}; choose one of '
                       f'{", ".join(RANDOM_PREFIX + p for p in preset_names())}')


def read_dir(path: str) -> Checkpoint:
  """A local ``save_pretrained`` directory of any transformers family."""
  cfg = checkpoints.read_json(path)
  kind = cfg.get('model_type')
  if kind in REFUSED:
    raise ModelLoadError(f'{path}/config.json: {REFUSED[kind]}')
  if kind not in FAMILIES_BY_TYPE:
    raise ModelLoadError(
        f'{path}/config.json: model_type {kind!r} is not a model clip_transfer can load '
        f'(supported: {", ".join(FAMILIES_BY_TYPE)}, or an OpenCLIP directory)')
  return _READERS[FAMILIES_BY_TYPE[kind]].read_dir(path, cfg, kind)


def init_params(module, seed: int = 0):
  """Randomly initialised params of any family's module (deterministic in ``seed``)."""
  if isinstance(module, clip.CLIP):  # OpenCLIP's module too (a subclass)
    return clip.init_params(module, seed)
  return checkpoints.init_params(module, MODULES[module.family].dummy_inputs(module), seed)


def param_shapes(module) -> Any:
  """The param tree's shapes, without allocating it."""
  if isinstance(module, clip.CLIP):
    return clip.param_shapes(module)
  return checkpoints.param_shapes(module, MODULES[module.family].dummy_inputs(module))
