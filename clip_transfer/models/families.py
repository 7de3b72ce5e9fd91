"""Which family a checkpoint belongs to, and what every family shares (init, shapes).

A family is one module in ``clip_transfer.models`` holding its linen towers, its
checkpoint mapping, its preprocessing and its pooled feature. Detection:

- ``open_clip_config.json`` in the directory → OpenCLIP (``models.open_clip``; dispatched
  by ``checkpoints.read`` before this module is asked);
- otherwise ``config.json``'s ``model_type``: ``clip`` / ``clip_vision_model``,
  ``siglip`` / ``siglip_vision_model``, ``dinov2`` / ``dinov2_with_registers``;
- ``random:<preset>`` names: each family's ``PRESETS``.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax

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


class _Modules:
  """Family name → its module, imported on first use (the modules import this one)."""

  def __getitem__(self, name: str):
    return importlib.import_module(f'clip_transfer.models.{name}')

  def values(self):
    return [self[n] for n in ('siglip', 'dinov2')]


# Families with PRESETS and a ``read_dir`` of their own (CLIP's live in checkpoints.py).
FAMILIES = _Modules()


def preset_names() -> list[str]:
  from clip_transfer.models import checkpoints  # pylint: disable=g-import-not-at-top
  names = list(checkpoints.PRESETS)
  for family in FAMILIES.values():
    names += list(family.PRESETS)
  return names


def read_dir(path: str):
  """A local ``save_pretrained`` directory of any transformers family → ``checkpoints.Checkpoint``."""
  from clip_transfer.models import checkpoints  # pylint: disable=g-import-not-at-top

  cfg = checkpoints.read_json(path)
  kind = cfg.get('model_type')
  if kind in REFUSED:
    raise checkpoints.ModelLoadError(f'{path}/config.json: {REFUSED[kind]}')
  if kind not in FAMILIES_BY_TYPE:
    raise checkpoints.ModelLoadError(
        f'{path}/config.json: model_type {kind!r} is not a model clip_transfer can load '
        f'(supported: {", ".join(FAMILIES_BY_TYPE)}, or an OpenCLIP directory)')
  if FAMILIES_BY_TYPE[kind] == 'clip':
    return checkpoints.load_clip_dir(path, cfg, kind)
  return FAMILIES[FAMILIES_BY_TYPE[kind]].read_dir(path, cfg, kind)


def _module_lib(module):
  return importlib.import_module(f'clip_transfer.models.{module.family}')


def _init(module, rng):
  lib = _module_lib(module)
  if module.family == 'clip':
    return module.init(rng, *lib.dummy_inputs(module), method=lib._init_all)  # pylint: disable=protected-access
  return module.init(rng, *lib.dummy_inputs(module))


def init_params(module, seed: int = 0):
  """Randomly initialised params of any family's module (deterministic in ``seed``)."""
  return jax.jit(lambda rng: _init(module, rng))(jax.random.PRNGKey(seed))['params']


def param_shapes(module) -> Any:
  """The param tree's shapes, without allocating it."""
  return jax.eval_shape(lambda: _init(module, jax.random.PRNGKey(0)))['params']
