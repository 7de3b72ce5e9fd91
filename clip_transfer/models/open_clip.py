"""OpenCLIP checkpoints (``open_clip_config.json`` + weights) on the project's linen CLIP.

open_clip's plain ViT + text transformer is OpenAI CLIP's architecture, so its
weights map onto ``clip_transfer.models.clip.CLIP`` with a renaming: packed
``attn.in_proj_weight`` split into q/k/v, ``x @ proj`` projections kept as
Dense kernels, ``mlp.c_fc``/``c_proj`` as ``fc1``/``fc2``. The text tower pools
at the highest token id (open_clip's ``argmax`` pooling: EOT is the highest
id), which our text tower does for ``eos_token_id == tokenizer.LEGACY_EOS``.

Read: a local directory as open_clip's ``save_for_hf`` / ``push_to_hf_hub``
writes it (``open_clip_config.json``, ``open_clip_model.safetensors`` or
``open_clip_pytorch_model.bin``, and the CLIP tokenizer files), or
``hf-hub:ORG/NAME`` (downloaded with huggingface_hub). Variants our modules do
not compute (timm or HF towers, ModifiedResNet, CoCa, attention pooling,
LayerScale, custom attention blocks, …) are refused naming the config key.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from clip_transfer.data.preprocess import BICUBIC, CLIP_MEAN, CLIP_STD, PreprocessConfig
from clip_transfer.models import checkpoints
from clip_transfer.models import clip
from clip_transfer.models.checkpoints import Checkpoint, ModelLoadError
from clip_transfer.models.tokenizer import LEGACY_EOS

HUB_PREFIX = 'hf-hub:'
CONFIG_FILE = 'open_clip_config.json'
SAFETENSORS_FILE = 'open_clip_model.safetensors'
PYTORCH_FILE = 'open_clip_pytorch_model.bin'
# What push_to_hf_hub uploads beside the weights (the CLIP tokenizer, saved by transformers).
HUB_PATTERNS = [CONFIG_FILE, 'tokenizer.json', 'tokenizer_config.json', 'vocab.json',
                'merges.txt', 'special_tokens_map.json']
INTERPOLATIONS = {'bicubic': BICUBIC, 'bilinear': 2,  # PIL.Image.BILINEAR
                  'random': BICUBIC}  # 'random' is a training augmentation; open_clip evaluates bicubic

# Config keys and the values our modules compute; any other value is refused by name.
# (key, value open_clip defaults to, what the value means when refused)
_BLOCK_DEFAULTS = (  # the transformer block options both towers share
    ('act_kwargs', None, 'activation arguments'),
    ('block_type', None, 'custom attention blocks'),
    ('qk_norm', False, 'q/k LayerNorm'),
    ('scaled_cosine_attn', False, 'scaled cosine attention'),
    ('scale_heads', False, 'per-head attention scales'),
    ('scale_attn_inner', False, 'inner attention LayerNorm'),
    ('scale_attn', False, 'post-attention LayerNorm'),
    ('scale_fc', False, 'MLP LayerNorm'),
)
_VISION_DEFAULTS = (
    ('timm_model_name', None, 'a timm vision tower'),
    ('ls_init_value', None, 'LayerScale'),
    ('attentional_pool', False, 'an attentional pooler (CoCa)'),
    ('no_ln_pre', False, 'no LayerNorm before the transformer'),
    ('pos_embed_type', 'learnable', 'fixed position embeddings'),
    # With class-token pooling, final_ln_after_pool is the same function (LayerNorm is
    # per token), so it is accepted.
    ('pool_type', 'tok', 'pooling other than the class token'),
) + _BLOCK_DEFAULTS
_TEXT_DEFAULTS = (
    ('hf_model_name', None, 'a Hugging Face text tower'),
    ('ls_init_value', None, 'LayerScale'),
    ('embed_cls', False, 'an appended class token (CoCa)'),
    ('no_causal_mask', False, 'bidirectional text attention'),
    ('pool_type', 'argmax', 'pooling other than at the highest token id'),
    ('proj_bias', False, 'a text projection with bias'),
    ('proj_type', 'linear', 'a text projection other than linear'),
) + _BLOCK_DEFAULTS
_MODEL_DEFAULTS = (
    ('init_logit_bias', None, 'a sigmoid-loss logit bias (SigLIP-style)'),
    ('multimodal_cfg', None, 'a multimodal decoder (CoCa)'),
)


class OpenCLIP(clip.CLIP):
  """An OpenCLIP checkpoint on the project's linen CLIP: the same towers and param tree,
  recorded as its own family (``model.family`` in an embedding dataset's metadata).
  Datasets embedded before this class existed record ``clip`` for OpenCLIP weights;
  nothing reads the family to decide anything, so they stay valid."""

  family = 'open_clip'


def is_open_clip_dir(path: str) -> bool:
  """True for a directory open_clip's save_for_hf wrote (it holds open_clip_config.json)."""
  return os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_hub(name: str) -> Checkpoint:
  """``hf-hub:ORG/NAME`` as open_clip names hub checkpoints; fails fast offline."""
  repo_id = name[len(HUB_PREFIX):]
  import huggingface_hub  # pylint: disable=g-import-not-at-top

  try:
    # Prefer the weights that need no torch; push_to_hf_hub uploads both by default.
    for weights in (SAFETENSORS_FILE, PYTORCH_FILE):
      local = huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_PATTERNS + [weights])
      if os.path.exists(os.path.join(local, weights)):
        break
  except Exception as e:  # network, auth, missing repo: all end the same way
    raise ModelLoadError(
        f'cannot fetch {name!r} from the Hugging Face hub ({_reason(e)}). With no network, '
        'pass a local directory holding open_clip_config.json and its weights, or '
        f'{checkpoints.RANDOM_PREFIX}tiny for random weights') from None
  ckpt = read_dir(local)
  ckpt.revision = os.path.basename(os.path.normpath(local))
  return ckpt


def read_dir(path: str) -> Checkpoint:
  """An open_clip directory → (linen CLIP module, params, preprocessing)."""
  cfg = _read_json(os.path.join(path, CONFIG_FILE))
  model_cfg = cfg.get('model_cfg')
  if not isinstance(model_cfg, dict):
    raise ModelLoadError(f'{path}/{CONFIG_FILE} has no model_cfg object (not written by '
                         "open_clip's save_for_hf)")
  try:
    module = _module(model_cfg, path)
    preprocess = preprocess_config(cfg.get('preprocess_cfg') or {},
                                   module.vision_config.image_size, path)
  except (TypeError, ValueError) as e:  # a number that is not one, a list where a dict goes…
    raise ModelLoadError(f'{path}/{CONFIG_FILE}: malformed config ({_reason(e)})') from None
  state = _read_weights(path)
  prefix = 'text.' if model_cfg.get('custom_text') else ''
  flat = _to_linen(state, prefix, module.vision_config.hidden_size,
                   module.text_config.hidden_size, path)
  params = checkpoints.match(flat, clip.param_shapes(module), path)
  return Checkpoint(module, params, preprocess)


def _module(model_cfg: dict, path: str) -> OpenCLIP:
  where = f'{path}/{CONFIG_FILE}'
  vision = model_cfg.get('vision_cfg') or {}
  text = model_cfg.get('text_cfg') or {}
  if not isinstance(vision, dict) or not isinstance(text, dict):
    raise ModelLoadError(f'{where}: model_cfg.vision_cfg and text_cfg must be JSON objects')
  _refuse_unmappable(model_cfg, _MODEL_DEFAULTS, 'model_cfg', where)
  _refuse_unmappable(vision, _VISION_DEFAULTS, 'vision_cfg', where)
  _refuse_unmappable(text, _TEXT_DEFAULTS, 'text_cfg', where)
  if isinstance(vision.get('layers', 12), (list, tuple)):
    raise ModelLoadError(f'{where}: vision_cfg.layers is a list (a ModifiedResNet tower); only '
                         'ViT vision towers are supported')
  if 'embed_dim' not in model_cfg:
    raise ModelLoadError(f'{where}: model_cfg has no embed_dim')
  act = 'quick_gelu' if model_cfg.get('quick_gelu', False) else 'gelu'  # nn.GELU is exact (erf)
  image_size = _square(vision.get('image_size', 224), 'vision_cfg.image_size', where)
  patch_size = _square(vision.get('patch_size', 16), 'vision_cfg.patch_size', where)
  v_width = int(vision.get('width', 768))
  head_width = int(vision.get('head_width', 64))
  if v_width % head_width:
    raise ModelLoadError(f'{where}: vision_cfg.width {v_width} is not a multiple of '
                         f'head_width {head_width}')
  t_width = int(text.get('width', 512))
  v = clip.VisionConfig(
      hidden_size=v_width, intermediate_size=int(v_width * float(vision.get('mlp_ratio', 4.0))),
      num_hidden_layers=int(vision.get('layers', 12)), num_attention_heads=v_width // head_width,
      image_size=image_size, patch_size=patch_size, hidden_act=act,
      layer_norm_eps=_eps(vision, 'vision_cfg', where))
  t = clip.TextConfig(
      vocab_size=int(text.get('vocab_size', 49408)), hidden_size=t_width,
      intermediate_size=int(t_width * float(text.get('mlp_ratio', 4.0))),
      num_hidden_layers=int(text.get('layers', 12)), num_attention_heads=int(text.get('heads', 8)),
      max_position_embeddings=int(text.get('context_length', 77)), hidden_act=act,
      layer_norm_eps=_eps(text, 'text_cfg', where),
      # open_clip's 'argmax' pooling (the EOT token has the highest id): our text tower
      # pools at the highest id for this eos_token_id, and the tokenizer check holds it to that.
      eos_token_id=LEGACY_EOS)
  return OpenCLIP(v, t, int(model_cfg['embed_dim']))


def _refuse_unmappable(cfg: dict, defaults, section: str, where: str) -> None:
  for key, default, meaning in defaults:
    value = cfg.get(key, default)
    if value != default:
      raise ModelLoadError(f'{where}: {section}.{key}={value!r} ({meaning}) is not supported; '
                           'only the OpenAI-CLIP layout (ViT + text transformer) is')


def _square(value, key: str, where: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ModelLoadError(f'{where}: {key}={list(value)} is not square; only square inputs '
                           'are supported')
    value = value[0]
  return int(value)


def _eps(cfg: dict, section: str, where: str) -> float:
  kwargs = cfg.get('norm_kwargs') or {}
  if set(kwargs) - {'eps'}:
    raise ModelLoadError(f'{where}: {section}.norm_kwargs={kwargs!r} is not supported '
                         '(only eps)')
  return float(kwargs.get('eps', 1e-5))  # torch LayerNorm's default, open_clip's too


def preprocess_config(pp: dict, image_size: int, path: str = '') -> PreprocessConfig:
  """open_clip's ``preprocess_cfg`` (its eval transform) as our PreprocessConfig.

  'shortest': torchvision ``Resize(size)`` + ``CenterCrop(size)`` (the crop offset
  rounds, where transformers' floors); 'squash': ``Resize((size, size))``, no crop.
  Equal for RGB and grayscale inputs. Transparent and palette images differ by
  design: open_clip resizes them in their own mode, then drops alpha; we convert
  first, compositing onto white (the project's rule for every family).
  """
  where = f'{path}/{CONFIG_FILE}' if path else CONFIG_FILE
  size = pp.get('size', image_size)
  if _square(size, 'preprocess_cfg.size', where) != image_size:
    raise ModelLoadError(f'{where}: preprocess_cfg.size {size} differs from the vision tower\'s '
                         f'image_size {image_size}')
  mode = pp.get('resize_mode', 'shortest')
  if mode not in ('shortest', 'squash'):
    raise ModelLoadError(f"{where}: preprocess_cfg.resize_mode={mode!r} is not supported "
                         "('shortest' or 'squash')")
  interpolation = pp.get('interpolation', 'bicubic')
  if interpolation not in INTERPOLATIONS:
    raise ModelLoadError(f'{where}: preprocess_cfg.interpolation={interpolation!r} is not '
                         f'supported ({", ".join(INTERPOLATIONS)})')
  return PreprocessConfig(
      size=image_size, crop_size=(image_size, image_size),
      mean=_triple(pp.get('mean', CLIP_MEAN), 'mean', where),
      std=_triple(pp.get('std', CLIP_STD), 'std', where),
      resample=INTERPOLATIONS[interpolation], do_center_crop=mode == 'shortest',
      resize_mode=mode, crop_offset='round')


def _triple(v, key: str, where: str) -> tuple[float, float, float]:
  v = tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3
  if len(v) != 3:  # open_clip takes one value or one per RGB channel
    raise ModelLoadError(f'{where}: preprocess_cfg.{key} has {len(v)} values; expected 1 or 3')
  return v


def _read_json(f: str) -> dict:
  try:
    with open(f) as fh:
      cfg = json.load(fh)
  except (OSError, ValueError) as e:  # unreadable, or not JSON
    raise ModelLoadError(f'{f}: cannot read it as JSON ({_reason(e)})') from None
  if not isinstance(cfg, dict):
    raise ModelLoadError(f'{f}: expected a JSON object, got {type(cfg).__name__}')
  return cfg


def _read_weights(path: str) -> dict[str, np.ndarray]:
  st = os.path.join(path, SAFETENSORS_FILE)
  pt = os.path.join(path, PYTORCH_FILE)
  if os.path.exists(st):
    return checkpoints._read_safetensors([st])  # pylint: disable=protected-access
  if os.path.exists(pt):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ModelLoadError(f'{pt} needs PyTorch to read; install it (pip install torch==2.13.0) '
                           f'or use {SAFETENSORS_FILE}') from None
    try:
      # weights_only: a pickle may run code; only tensors are accepted.
      state = torch.load(pt, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, corrupt, or a pickle that is not only tensors
      raise ModelLoadError(f'{pt}: cannot read the weights ({_reason(e)}); the file may be '
                           'truncated: save or download it again') from None
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
      state = state['state_dict']  # open_clip training checkpoints nest it
    return {k.removeprefix('module.'): v.float().numpy() for k, v in state.items()}
  raise ModelLoadError(f'{path} has no weights: expected {SAFETENSORS_FILE} or {PYTORCH_FILE}')


# open_clip block names → our EncoderLayer's.
_BLOCK = {'ln_1': 'layer_norm1', 'ln_2': 'layer_norm2', 'attn.out_proj': 'self_attn/out_proj',
          'mlp.c_fc': 'mlp/fc1', 'mlp.c_proj': 'mlp/fc2'}
_TOP = {
    'visual.conv1.weight': 'vision_model/embeddings/patch_embedding/kernel',
    'visual.class_embedding': 'vision_model/embeddings/class_embedding',
    'visual.positional_embedding': 'vision_model/embeddings/position_embedding/embedding',
    'visual.ln_pre.weight': 'vision_model/pre_layrnorm/scale',
    'visual.ln_pre.bias': 'vision_model/pre_layrnorm/bias',
    'visual.ln_post.weight': 'vision_model/post_layernorm/scale',
    'visual.ln_post.bias': 'vision_model/post_layernorm/bias',
    'visual.proj': 'visual_projection/kernel',  # used as x @ proj: already (in, out)
    'token_embedding.weight': 'text_model/embeddings/token_embedding/embedding',
    'positional_embedding': 'text_model/embeddings/position_embedding/embedding',
    'ln_final.weight': 'text_model/final_layer_norm/scale',
    'ln_final.bias': 'text_model/final_layer_norm/bias',
    'text_projection': 'text_projection/kernel',  # x @ proj, as the vision one
    'logit_scale': 'logit_scale',
}


def _to_linen(state: dict[str, Any], text_prefix: str, v_width: int, t_width: int,
              path: str) -> dict[str, np.ndarray]:
  """open_clip state-dict names/layouts → '/'-joined linen paths/layouts of clip.CLIP."""
  flat = {}
  for key, value in state.items():
    value = np.asarray(value, np.float32)
    name = key
    if text_prefix and not key.startswith('visual.') and key != 'logit_scale':
      if not key.startswith(text_prefix):
        flat[key] = value  # not ours: match reports it among the unused tensors
        continue
      name = key[len(text_prefix):]
    if name in _TOP:
      if name == 'visual.conv1.weight':  # (out, in, kh, kw) → (kh, kw, in, out)
        value = value.transpose(2, 3, 1, 0)
      flat[_TOP[name]] = value
      continue
    tower, width = ('vision_model', v_width) if name.startswith('visual.') else ('text_model',
                                                                                   t_width)
    rest = name.removeprefix('visual.')
    parts = rest.split('.')
    if parts[:2] != ['transformer', 'resblocks'] or len(parts) < 5:
      flat[key] = value  # unknown: match names it if the module needs something missing
      continue
    layer, sub, leaf = parts[2], '.'.join(parts[3:-1]), parts[-1]
    base = f'{tower}/encoder/layers/{layer}'
    if sub == 'attn' and leaf in ('in_proj_weight', 'in_proj_bias'):
      # nn.MultiheadAttention packs q, k, v along the output axis.
      if value.shape[0] != 3 * width:
        raise ModelLoadError(f'{path}: {key} has shape {value.shape}; expected its first axis '
                             f'to be 3 x width = {3 * width}')
      for proj, part in zip(('q_proj', 'k_proj', 'v_proj'), np.split(value, 3)):
        if leaf == 'in_proj_weight':
          flat[f'{base}/self_attn/{proj}/kernel'] = np.ascontiguousarray(part.T)
        else:
          flat[f'{base}/self_attn/{proj}/bias'] = part
      continue
    if sub not in _BLOCK:
      flat[key] = value
      continue
    if leaf == 'weight':
      leaf, value = ('kernel', value.T) if sub.startswith(('attn', 'mlp')) else ('scale', value)
    flat[f'{base}/{_BLOCK[sub]}/{leaf}'] = np.ascontiguousarray(value)
  return flat


def _reason(e: Exception) -> str:
  text = str(e).strip()
  return f'{type(e).__name__}: {text.splitlines()[0][:200] if text else "no message"}'
