"""Reading CLIP weights into the linen tree: random presets, save_pretrained directories, hub ids.

``read`` does the work (no cache); ``clip_transfer.models.load`` is what callers use
(one load per process and name, the checksum, the vision tower).

Weights formats: ``model.safetensors`` (single or sharded) and
``flax_model.msgpack`` need no torch; ``pytorch_model.bin`` needs torch.
PyTorch tensors are renamed/transposed into the linen tree of
``clip_transfer.models.clip.CLIP`` and checked leaf by leaf against the config's shapes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import flax
import jax.numpy as jnp
import numpy as np

from clip_transfer.models import clip
from clip_transfer.errors import UserError
from clip_transfer.data.preprocess import PreprocessConfig

RANDOM_PREFIX = 'random:'

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

WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'flax_model.msgpack',
                'pytorch_model.bin')

log = logging.getLogger(__name__)


class ModelLoadError(UserError):
  """A model that cannot be loaded; the message names the way out."""


@dataclasses.dataclass
class Checkpoint:
  """What ``read`` returns: the module, its params and the preprocessing it expects."""

  module: clip.CLIP
  params: dict
  preprocess: PreprocessConfig
  revision: Optional[str] = None  # hub commit, when downloaded


def read(name_or_path: str, seed: int = 0) -> Checkpoint:
  """Reads a preset, a local save_pretrained directory or a hub id (no cache).

  The module computes in float32; ``clip_transfer.models.load`` clones it for bf16.
  """
  from clip_transfer.models import open_clip  # pylint: disable=g-import-not-at-top  (imports this module)

  if name_or_path.startswith(RANDOM_PREFIX):
    return _load_preset(name_or_path, seed)
  if name_or_path.startswith(open_clip.HUB_PREFIX):
    return open_clip.read_hub(name_or_path)
  path = os.path.expanduser(name_or_path)
  if os.path.isdir(path) and open_clip.is_open_clip_dir(path):
    return open_clip.read_dir(path)
  if os.path.isdir(path):
    return _load_dir(path)
  if os.path.exists(path):
    raise ModelLoadError(f'{name_or_path} is a file; pass the directory holding config.json '
                         'and the weights')
  if name_or_path.startswith(('/', '.', '~')) or name_or_path.count('/') > 1:
    raise ModelLoadError(f'no such model directory: {name_or_path}')
  local, revision = _download(name_or_path)
  ckpt = _load_dir(local)
  ckpt.revision = revision
  return ckpt


def _load_preset(name: str, seed: int) -> Checkpoint:
  preset = name[len(RANDOM_PREFIX):]
  if preset not in PRESETS:
    raise ModelLoadError(f'unknown preset {name!r}; choose one of '
                         f'{", ".join(RANDOM_PREFIX + p for p in PRESETS)}')
  p = PRESETS[preset]
  module = clip.CLIP(p['vision'], p['text'], p['projection_dim'])
  params = clip.init_params(module, seed)
  return Checkpoint(module, params, PreprocessConfig.for_image_size(p['vision'].image_size))


def _download(repo_id: str) -> tuple[str, Optional[str]]:
  """Fetches config + weights from the hub; fails fast and clearly offline."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top

  fix = ('With no network, pass a local directory written by save_pretrained, or '
         f'{RANDOM_PREFIX}tiny / {RANDOM_PREFIX}vit-b32 for random weights.')
  patterns = ['config.json', 'preprocessor_config.json']
  try:
    # Prefer formats that need no torch; fall back to pytorch_model.bin.
    for weights in (['model.safetensors', 'model.safetensors.index.json',
                     'model-*.safetensors'], ['flax_model.msgpack'], ['pytorch_model.bin']):
      local = huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns + weights)
      if any(os.path.exists(os.path.join(local, w)) for w in WEIGHT_FILES):
        break
  except Exception as e:  # network, auth, missing repo: all end the same way
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ModelLoadError(f'cannot fetch {repo_id!r} from the Hugging Face hub '
                         f'({type(e).__name__}: {reason[:200]}). {fix}') from None
  return local, os.path.basename(os.path.normpath(local))


def _read_config(path: str) -> tuple[dict, str]:
  f = os.path.join(path, 'config.json')
  if not os.path.exists(f):
    raise ModelLoadError(f'{path} has no config.json (not a save_pretrained directory)')
  try:
    with open(f) as fh:
      cfg = json.load(fh)
  except (OSError, ValueError) as e:  # unreadable, or not JSON
    raise ModelLoadError(f'{f}: cannot read it as JSON ({type(e).__name__}: '
                         f'{str(e).splitlines()[0][:200]})') from None
  if not isinstance(cfg, dict):
    raise ModelLoadError(f'{f}: expected a JSON object, got {type(cfg).__name__}')
  kind = cfg.get('model_type')
  if kind not in ('clip', 'clip_vision_model'):
    raise ModelLoadError(f'{path}/config.json: model_type {kind!r} is not a CLIP model '
                         "('clip' or 'clip_vision_model')")
  return cfg, kind


def _vision_config(d: dict) -> clip.VisionConfig:
  import transformers  # pylint: disable=g-import-not-at-top

  c = transformers.CLIPVisionConfig(**d)
  return clip.VisionConfig(
      hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
      num_channels=c.num_channels, image_size=c.image_size, patch_size=c.patch_size,
      hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps)


def _text_config(d: dict) -> clip.TextConfig:
  import transformers  # pylint: disable=g-import-not-at-top

  c = transformers.CLIPTextConfig(**d)
  return clip.TextConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size,
      intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
      num_attention_heads=c.num_attention_heads,
      max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act,
      layer_norm_eps=c.layer_norm_eps, eos_token_id=c.eos_token_id)


def _load_dir(path: str) -> Checkpoint:
  cfg, kind = _read_config(path)
  flat = _read_weights(path, kind)  # '/'-joined linen paths → float32 arrays
  has_projection = 'visual_projection/kernel' in flat
  if kind == 'clip':
    vision = _vision_config(cfg.get('vision_config') or {})
    text = _text_config(cfg.get('text_config') or {})
    projection_dim = int(cfg.get('projection_dim', 512)) if has_projection else None
  else:
    vision = _vision_config(cfg)
    text = None
    projection_dim = int(cfg.get('projection_dim', 512)) if has_projection else None
  module = clip.CLIP(vision, text, projection_dim,
                     logit_scale_init_value=float(cfg.get('logit_scale_init_value', 2.6592)))
  params = _match(flat, clip.param_shapes(module), path)
  return Checkpoint(module, params, PreprocessConfig.from_dir(path, vision.image_size))


def _read_weights(path: str, kind: str) -> dict[str, np.ndarray]:
  st = os.path.join(path, 'model.safetensors')
  index = os.path.join(path, 'model.safetensors.index.json')
  msgpack = os.path.join(path, 'flax_model.msgpack')
  pt = os.path.join(path, 'pytorch_model.bin')
  if os.path.exists(st) or os.path.exists(index):
    files = [st]
    if not os.path.exists(st):
      with open(index) as fh:
        files = sorted({os.path.join(path, f) for f in json.load(fh)['weight_map'].values()})
    return _from_pytorch_names(_read_safetensors(files), kind)
  if os.path.exists(msgpack):
    with open(msgpack, 'rb') as fh:
      tree = flax.serialization.msgpack_restore(fh.read())
    flat = flax.traverse_util.flatten_dict(tree, sep='/')
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}
  if os.path.exists(pt):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ModelLoadError(
          f'{pt} needs PyTorch to read; install it (pip install torch==2.13.0) or re-save '
          'the model with safe_serialization=True (model.safetensors)') from None
    state = torch.load(pt, map_location='cpu', weights_only=True)
    return _from_pytorch_names({k: v.float().numpy() for k, v in state.items()}, kind)
  raise ModelLoadError(f'{path} has no weights: expected one of {", ".join(WEIGHT_FILES)}')


def _read_safetensors(files: list[str]) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  out = {}
  for f in files:
    try:
      # framework='flax' reads bfloat16 too (numpy has no bfloat16).
      with safe_open(f, framework='flax') as fh:
        for k in fh.keys():
          out[k] = np.asarray(fh.get_tensor(k).astype(jnp.float32))
    except Exception as e:  # truncated or corrupt file (safetensors raises its own types)
      raise ModelLoadError(f'{f}: cannot read the weights ({type(e).__name__}: '
                           f'{(str(e).splitlines() or [""])[0][:200]}); the file may be '
                           'truncated: save or download it again') from None
  return out


def _from_pytorch_names(state: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
  """PyTorch CLIP names/layouts → linen '/'-paths/layouts."""
  flat = {}
  for key, value in state.items():
    parts = key.split('.')
    if parts[-1] == 'position_ids':  # a buffer, not a parameter
      continue
    if parts[0] == 'clip':  # wrappers such as CLIPForImageClassification
      parts = parts[1:]
    if kind == 'clip_vision_model' and parts[0] not in ('vision_model', 'visual_projection'):
      # transformers 5 saves CLIPVisionModel without the 'vision_model.' prefix; 4.x kept it.
      parts = ['vision_model'] + parts
    mod, leaf = parts[:-1], parts[-1]
    if leaf == 'weight':
      if value.ndim == 4:  # conv (out, in, kh, kw) → (kh, kw, in, out)
        leaf, value = 'kernel', value.transpose(2, 3, 1, 0)
      elif mod and mod[-1].endswith('embedding'):
        leaf = 'embedding'
      elif value.ndim == 2:  # Linear (out, in) → Dense (in, out)
        leaf, value = 'kernel', value.T
      else:  # LayerNorm
        leaf = 'scale'
    flat['/'.join(mod + [leaf])] = np.ascontiguousarray(value, np.float32)
  return flat


def _match(flat: dict[str, np.ndarray], shapes, path: str) -> dict:
  """Checks the checkpoint against the config's tree; returns the nested params."""
  expected = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes), sep='/')
  missing = sorted(set(expected) - set(flat))
  if missing:
    raise ModelLoadError(
        f'{path}: checkpoint lacks {len(missing)} parameter(s) the config needs, first '
        f'{missing[0]!r} (shape {tuple(expected[missing[0]].shape)})')
  for k, s in expected.items():
    if s.shape == () and flat[k].size == 1:  # scalars are saved as (1,) or ()
      flat[k] = flat[k].reshape(())
    if tuple(flat[k].shape) != tuple(s.shape):
      raise ModelLoadError(f'{path}: parameter {k!r} has shape {tuple(flat[k].shape)} in the '
                           f'checkpoint but the config expects {tuple(s.shape)}')
  extra = sorted(set(flat) - set(expected))
  if extra:
    log.warning('%s: ignoring %d checkpoint tensor(s) CLIP does not use, e.g. %s', path,
                len(extra), extra[0])
  return flax.traverse_util.unflatten_dict(
      {tuple(k.split('/')): jnp.asarray(flat[k]) for k in expected})
