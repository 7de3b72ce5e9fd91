"""The weight-file reading every family shares: files → '/'-joined linen paths → checked params.

Which reader a name or directory needs is decided in ``clip_transfer.models.families``
(``families.read``); each family module holds its own config parsing and name mapping and
calls this module for what they share: the hub download, ``config.json`` reading and range
checks, weights files, PyTorch → linen layouts, the shape check against the module's tree.
``clip_transfer.models.load`` is what callers use (cache, checksum, vision tower).

Weights formats: ``model.safetensors`` (single or sharded) and
``flax_model.msgpack`` need no torch; ``pytorch_model.bin`` needs torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from clip_transfer.models import clip
from clip_transfer.errors import UserError
from clip_transfer.data.preprocess import PreprocessConfig

RANDOM_PREFIX = 'random:'

WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'flax_model.msgpack',
                'pytorch_model.bin')

log = logging.getLogger(__name__)


class ModelLoadError(UserError):
  """A model that cannot be loaded; the message names the way out."""


@dataclasses.dataclass
class Checkpoint:
  """What a family's reader returns: the module, its params and the preprocessing it expects."""

  module: Any  # a family's linen module (clip.CLIP, siglip.SigLIP, dinov2.DINOv2)
  params: dict
  preprocess: PreprocessConfig
  revision: Optional[str] = None  # hub commit, when downloaded


def download(repo_id: str) -> tuple[str, Optional[str]]:
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


def init_params(module, inputs, seed: int = 0, method=None):
  """Randomly initialised params of ``module`` called on ``inputs`` (deterministic in ``seed``)."""
  init = jax.jit(lambda rng: module.init(rng, *inputs, method=method))
  return init(jax.random.PRNGKey(seed))['params']


def param_shapes(module, inputs, method=None) -> Any:
  """The param tree's shapes, without allocating it."""
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs, method=method))['params']


def read_json(path: str, name: str = 'config.json') -> dict:
  """A directory's JSON object file, or a one-line ModelLoadError."""
  f = os.path.join(path, name)
  if not os.path.exists(f):
    raise ModelLoadError(f'{path} has no {name} (not a save_pretrained directory)')
  try:
    with open(f) as fh:
      cfg = json.load(fh)
  except (OSError, ValueError) as e:  # unreadable, or not JSON
    raise ModelLoadError(f'{f}: cannot read it as JSON ({type(e).__name__}: '
                         f'{str(e).splitlines()[0][:200]})') from None
  if not isinstance(cfg, dict):
    raise ModelLoadError(f'{f}: expected a JSON object, got {type(cfg).__name__}')
  return cfg


# --------------------------------------------------------------------------
# Config checks (issue 22 #13): types and ranges before anything is built, so an
# absurd config is one line, not an OverflowError or minutes of allocation.
# --------------------------------------------------------------------------

# Upper bounds well above every released model (ViT-22B: 48 layers, width 6144).
LIMITS = {
    'hidden_size': 16384, 'intermediate_size': 65536, 'num_hidden_layers': 256,
    'num_attention_heads': 256, 'num_channels': 16, 'image_size': 4096, 'patch_size': 256,
    'vocab_size': 1 << 20, 'max_position_embeddings': 16384, 'projection_dim': 16384,
    'projection_size': 16384, 'num_register_tokens': 64,
}
ZERO_OK = ('num_register_tokens', 'eos_token_id', 'pad_token_id')
FLOAT_LIMITS = {'layer_norm_eps': (0.0, 1.0), 'mlp_ratio': (0.0, 64.0)}


def checked(d: Any, defaults: dict[str, Any], where: str) -> dict[str, Any]:
  """``defaults`` overlaid with ``d``'s values of those keys, each checked for type and range."""
  if d is None:
    d = {}
  if not isinstance(d, dict):
    raise ModelLoadError(f'{where}: expected a JSON object, got {type(d).__name__}')
  out = dict(defaults)
  for key, default in defaults.items():
    if key not in d or d[key] is None:
      continue
    v = d[key]
    bad = lambda want: ModelLoadError(f'{where}: {key} must be {want}, got {v!r}')
    if isinstance(default, bool):
      if not isinstance(v, bool):
        raise bad('true or false')
    elif isinstance(default, int):
      if isinstance(v, bool) or not isinstance(v, int):
        raise bad('an integer')
      lo, hi = (0 if key in ZERO_OK else 1), LIMITS.get(key, 1 << 30)
      if not lo <= v <= hi:
        raise bad(f'an integer in [{lo}, {hi}]')
    elif isinstance(default, float):
      lo, hi = FLOAT_LIMITS.get(key, (0.0, 1.0))
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v <= hi:
        raise bad(f'a number in ({lo}, {hi}]')
      v = float(v)
    elif isinstance(default, str):
      if not isinstance(v, str):
        raise bad('a string')
      if key == 'hidden_act' and v not in clip.ACTIVATIONS:
        raise bad(f'one of {", ".join(sorted(clip.ACTIVATIONS))}')
    out[key] = v
  return out


def check_shape(where: str, hidden_size: int, num_attention_heads: int, image_size: int,
                patch_size: int) -> None:
  """Relations between fields the ranges cannot say."""
  if hidden_size % num_attention_heads:
    raise ModelLoadError(f'{where}: hidden_size {hidden_size} is not divisible by '
                         f'num_attention_heads {num_attention_heads}')
  if patch_size > image_size:
    raise ModelLoadError(f'{where}: patch_size {patch_size} is larger than image_size '
                         f'{image_size}')


def read_weights(path: str, rename) -> dict[str, np.ndarray]:
  """The weights file's tensors as '/'-joined linen paths (``rename``: PyTorch names → those)."""
  st = os.path.join(path, 'model.safetensors')
  index = os.path.join(path, 'model.safetensors.index.json')
  msgpack = os.path.join(path, 'flax_model.msgpack')
  pt = os.path.join(path, 'pytorch_model.bin')
  if os.path.exists(st) or os.path.exists(index):
    files = [st]
    if not os.path.exists(st):
      with open(index) as fh:
        files = sorted({os.path.join(path, f) for f in json.load(fh)['weight_map'].values()})
    return rename(_read_safetensors(files))
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
    state = _torch_load(pt, torch)
    return rename({k: v.float().numpy() for k, v in state.items()})
  raise ModelLoadError(f'{path} has no weights: expected one of {", ".join(WEIGHT_FILES)}')


def _torch_load(pt: str, torch):
  """``torch.load`` with only tensors allowed; a file holding code is refused in one line."""
  import pickle  # pylint: disable=g-import-not-at-top

  try:
    state = torch.load(pt, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError:
    # Never repeat torch's advice to pass weights_only=False: that runs the file's code.
    raise ModelLoadError(
        f'{pt} holds Python objects other than tensors (code that would run on loading); it '
        'was not loaded. Use a model.safetensors file (save_pretrained(..., '
        'safe_serialization=True)) from a source you trust') from None
  except Exception as e:  # truncated or not a torch file
    raise ModelLoadError(f'{pt}: cannot read the weights ({type(e).__name__}: '
                         f'{(str(e).splitlines() or [""])[0][:200]}); the file may be '
                         'truncated: save or download it again') from None
  if not isinstance(state, dict) or not all(hasattr(v, 'numpy') for v in state.values()):
    raise ModelLoadError(f'{pt} does not hold a state dict of tensors')
  return state


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


def linen_layout(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """PyTorch names/layouts → linen '/'-paths/layouts, the rules every family shares.

  ``weight`` becomes a conv or Dense ``kernel`` (transposed), an ``embedding``
  (modules named ``*embedding``) or a LayerNorm ``scale``; other leaves keep
  their names (``bias``, ``cls_token``, ``lambda1`` …).
  """
  flat = {}
  for key, value in state.items():
    parts = key.split('.')
    if parts[-1] == 'position_ids':  # a buffer, not a parameter
      continue
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


def match(flat: dict[str, np.ndarray], shapes, path: str, ignore: tuple[str, ...] = ()) -> dict:
  """Checks the checkpoint against the config's tree; returns the nested params."""
  expected = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes), sep='/')
  want = sum(int(np.prod(s.shape)) for s in expected.values())
  have = sum(int(v.size) for k, v in flat.items() if k not in ignore)
  if want > 4 * have:  # issue 22 #13: a config far bigger than its weights
    raise ModelLoadError(f'{path}: config.json describes {want:,} parameters but the weights '
                         f'file holds {have:,}; the config does not belong to these weights')
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
  extra = sorted(set(flat) - set(expected) - set(ignore))
  if extra:
    log.warning('%s: ignoring %d checkpoint tensor(s) the model does not use, e.g. %s', path,
                len(extra), extra[0])
  return flax.traverse_util.unflatten_dict(
      {tuple(k.split('/')): jnp.asarray(flat[k]) for k in expected})


