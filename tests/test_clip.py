"""Parity of clip_transfer.models.loading with transformers' PyTorch CLIPModel, and the guide's flow.

Random weights saved with save_pretrained into a temp dir; no network. fp32 on CPU,
max abs errors seen here are ~1e-6 (logits ~2e-6); we assert <= 1e-4.
"""

import json
import os
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from clip_transfer.models import clip_checkpoint, families  # pylint: disable=g-import-not-at-top
from clip_transfer import models  # pylint: disable=g-import-not-at-top
from clip_transfer.models import clip  # pylint: disable=g-import-not-at-top

TOL = 1e-4
VOCAB = 99
EOS = 98  # inside the tiny vocabulary, so pooling picks the real EOS position


def _config(act):
  # 3 heads of 16 and an odd MLP width: nothing square or power-of-two to hide a transpose.
  common = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=3, hidden_act=act)
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=VOCAB, max_position_embeddings=12, eos_token_id=EOS,
                       bos_token_id=VOCAB - 2, pad_token_id=1, **common),
      vision_config=dict(image_size=30, patch_size=6, **common),
      projection_dim=24)


def _save(model, path, **kw):
  model.save_pretrained(path, **kw)
  return str(path)


def _inputs(seed=0):
  rng = np.random.RandomState(seed)
  pixels = rng.randn(3, 30, 30, 3).astype(np.float32)
  ids = rng.randint(2, VOCAB - 2, size=(2, 12))
  ids[0, 7], ids[1, 11] = EOS, EOS  # EOS at different positions
  mask = np.ones_like(ids)
  mask[0, 8:] = 0  # padding after the first sequence's EOS
  return pixels, ids, mask


def _torch_outputs(model, pixels, ids, mask):
  nchw = torch.tensor(pixels.transpose(0, 3, 1, 2))
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=nchw)
    # transformers 5 puts the *projected* features in vision_model_output; ask the tower itself.
    pooled = model.vision_model(pixel_values=nchw).pooler_output
  return {'pooler_output': pooled.numpy(),
          'image_embeds': out.image_embeds.numpy(), 'text_embeds': out.text_embeds.numpy(),
          'logits_per_image': out.logits_per_image.numpy()}


def _flax_outputs(module, variables, pixels, ids, mask):
  out = module.apply(variables, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
  pooled = module.apply(variables, jnp.asarray(pixels),
                        method=lambda m, x: m.vision_model(x).pooler_output)
  return {'pooler_output': np.asarray(pooled), 'image_embeds': np.asarray(out['image_embeds']),
          'text_embeds': np.asarray(out['text_embeds']),
          'logits_per_image': np.asarray(out['logits_per_image'])}


def _assert_close(ours, ref):
  for k in ref:
    err = float(np.abs(ours[k] - ref[k]).max())
    assert err <= TOL, f'{k}: max abs error {err}'


@pytest.mark.parametrize('act', ['quick_gelu', 'gelu'])
def test_full_model_parity_safetensors(tmp_path, act):
  torch.manual_seed(0)
  ref_model = transformers.CLIPModel(_config(act)).eval()
  path = _save(ref_model, tmp_path)
  assert os.path.exists(os.path.join(path, 'model.safetensors'))
  module, variables = models.load_model(path)
  assert module.vision_config.hidden_act == act
  inputs = _inputs()
  _assert_close(_flax_outputs(module, variables, *inputs), _torch_outputs(ref_model, *inputs))


def test_vision_only_checkpoint(tmp_path):
  torch.manual_seed(1)
  ref = transformers.CLIPVisionModel(_config('quick_gelu').vision_config).eval()
  module, variables = models.load_model(_save(ref, tmp_path))
  assert module.text_config is None and module.projection_dim is None
  pixels = _inputs()[0]
  with torch.no_grad():
    want = ref(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
  backbone, backbone_vars = module.bind(variables).vision_model.unbind()
  got = backbone.apply(backbone_vars, jnp.asarray(pixels))
  assert float(np.abs(np.asarray(got.pooler_output) - want.pooler_output.numpy()).max()) <= TOL
  assert float(np.abs(np.asarray(got.last_hidden_state)
                      - want.last_hidden_state.numpy()).max()) <= TOL


def test_msgpack_and_pytorch_bin_paths(tmp_path):
  torch.manual_seed(2)
  ref_model = transformers.CLIPModel(_config('quick_gelu')).eval()
  st_dir = _save(ref_model, tmp_path / 'st')
  _, variables = models.load_model(st_dir)
  # flax_model.msgpack in the old HF Flax layout (our tree mirrors it), no safetensors beside it.
  mp_dir = tmp_path / 'msgpack'
  mp_dir.mkdir()
  (mp_dir / 'config.json').write_text((tmp_path / 'st' / 'config.json').read_text())
  (mp_dir / 'flax_model.msgpack').write_bytes(
      flax.serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, variables['params'])))
  # pytorch_model.bin, the legacy format (needs torch).
  pt_dir = tmp_path / 'pt'
  pt_dir.mkdir()
  (pt_dir / 'config.json').write_text((tmp_path / 'st' / 'config.json').read_text())
  torch.save(ref_model.state_dict(), pt_dir / 'pytorch_model.bin')
  inputs = _inputs(3)
  want = _torch_outputs(ref_model, *inputs)
  for d in (mp_dir, pt_dir):
    module, v = models.load_model(str(d))
    _assert_close(_flax_outputs(module, v, *inputs), want)


def test_guide_flow_classifier(tmp_path):
  """The Flax transfer-learning guide, step by step, on our CLIP."""
  module, variables = models.load_model('random:tiny')
  vision_model, vision_model_vars = module.bind(variables).vision_model.unbind()
  model = clip.Classifier(num_classes=5, backbone=vision_model)
  x = jnp.zeros((2, 32, 32, 3))  # NHWC
  params = model.init(jax.random.PRNGKey(1), x)['params']
  params = flax.core.unfreeze(params)
  params['backbone'] = vision_model_vars['params']
  # The transferred tree has exactly the shapes the classifier initialised.
  init_shapes = jax.tree_util.tree_map(jnp.shape, model.init(jax.random.PRNGKey(1), x)['params'])
  assert jax.tree_util.tree_map(jnp.shape, params) == flax.core.unfreeze(init_shapes)
  # Give the zero-initialised head some weights so the check is not trivially zero.
  params['head']['kernel'] = jax.random.normal(jax.random.PRNGKey(2), (64, 5))
  pixels = jax.random.normal(jax.random.PRNGKey(3), (2, 32, 32, 3))
  logits = model.apply({'params': params}, pixels)
  pooled = vision_model.apply(vision_model_vars, pixels).pooler_output
  want = pooled @ params['head']['kernel'] + params['head']['bias']
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-5)
  # The head starts at zero, as the guide's kernel_init=nn.zeros says.
  head0 = model.init(jax.random.PRNGKey(1), x)['params']['head']['kernel']
  assert not np.asarray(head0).any()


def test_random_presets_are_deterministic():
  a, b = families.read('random:tiny'), families.read('random:tiny')  # no cache
  assert models.params_checksum(a.params) == models.params_checksum(b.params)
  assert models.load('random:tiny') is models.load('random:tiny')  # one load per process
  assert models.load('random:tiny').checksum() == models.params_checksum(a.params)
  shapes = clip.param_shapes(a.module)
  assert shapes['vision_model']['embeddings']['patch_embedding']['kernel'].shape == (8, 8, 3, 64)


def test_vit_b32_preset_shapes():
  """random:vit-b32 has openai/clip-vit-base-patch32's parameter shapes (no allocation)."""
  p = clip_checkpoint.PRESETS['vit-b32']
  module = clip.CLIP(p['vision'], p['text'], p['projection_dim'])
  flat = flax.traverse_util.flatten_dict(clip.param_shapes(module), sep='/')
  n_vision = sum(int(np.prod(s.shape)) for k, s in flat.items() if k.startswith('vision_model/'))
  assert n_vision == 87_456_000  # CLIPVisionModel(ViT-B/32).num_parameters()
  assert flat['vision_model/embeddings/patch_embedding/kernel'].shape == (32, 32, 3, 768)
  assert flat['visual_projection/kernel'].shape == (768, 512)


def test_bf16_compute_keeps_fp32_params():
  pre = models.load('random:tiny', dtype=jnp.bfloat16)
  # Params stay float32 and are shared with the float32 load: one copy per name.
  assert pre.variables is models.load('random:tiny').variables
  assert pre.checksum() == models.load('random:tiny').checksum()
  backbone, bvars = pre.vision_tower()
  out = backbone.apply(bvars, jnp.zeros((1, 32, 32, 3)))
  assert out.pooler_output.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(bvars))


def test_wrong_input_shape_is_a_clear_error():
  module, variables = models.load_model('random:tiny')
  with pytest.raises(ValueError, match=r'NHWC input of shape \(B, 32, 32, 3\)'):
    module.apply(variables, jnp.zeros((1, 3, 32, 32)),
                 method=lambda m, x: m.vision_model(x))
