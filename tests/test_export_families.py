"""finetune.export for SigLIP and DINOv2: a probe head on a tiny random model, exported through
the CLI, loaded with transformers' PyTorch classes and the jax.export file, logits compared
with ours on images no training saw."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from finetune import export as export_cli
from pipelines import embed
from probe import train as probe_cli
from clip_transfer import models
from clip_transfer.data import preprocess
from clip_transfer.models import dinov2, families, hf_export, siglip
from clip_transfer.protocol import rungs

pytestmark = pytest.mark.usefixtures('xla_cache')  # tests/conftest.py


@pytest.mark.parametrize('model,arch,processor', [
    ('random:siglip-tiny', 'SiglipVisionModel', 'SiglipImageProcessor'),
    ('random:dinov2-tiny', 'Dinov2Model', 'BitImageProcessor')])
def test_probe_export_loads_in_pytorch_and_jax(tmp_path, cat_dog_folder, model, arch, processor):
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top

  emb, probe, d = (str(tmp_path / k) for k in ('emb', 'probe', 'export'))
  data = cat_dog_folder(tmp_path / 'data', train=8, test=2)  # tests/conftest.py
  embed.run([f'--dataset=folder:{data}', f'--model={model}',
             f'--output_dir={emb}', '--batch_size=16'])
  probe_cli.main([f'--embeddings={emb}', f'--output_dir={probe}', '--baselines=',
                  '--no_progress', '--val_fraction=0.25'])
  export_cli.main([f'--head=probe:{probe}', f'--output_dir={d}'])
  with open(os.path.join(d, 'head.json')) as fh:
    info = json.load(fh)
  assert info['class_names'] == ['cat', 'dog'] and info['transformers_class'] == arch
  with open(os.path.join(d, 'config.json')) as fh:
    assert json.load(fh)['architectures'] == [arch]
  with open(os.path.join(d, 'preprocessor_config.json')) as fh:
    assert json.load(fh)['image_processor_type'] == processor

  # Images no training saw, through transformers' own processor and classes, the feature
  # computed exactly as the model card tells a PyTorch user to.
  images = np.random.default_rng(5).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  tower, loading = getattr(transformers, arch).from_pretrained(d, output_loading_info=True)
  assert not any(loading.values()), loading  # every tensor named as the class expects
  proc = getattr(transformers, processor).from_pretrained(d)
  head = load_file(os.path.join(d, 'head.safetensors'))
  with open(os.path.join(d, 'README.md')) as fh:
    card = fh.read()
  assert info['feature'] in card.replace('\n  ', '\n')
  with torch.no_grad():
    out = tower.eval()(**proc(images=[Image.fromarray(i) for i in images], return_tensors='pt'))
    scope = {'out': out, 'torch': torch}
    exec(info['feature'], scope)  # pylint: disable=exec-used
    theirs = (scope['x'] @ head['weight'].T + head['bias']).numpy()

  spec = f'probe:{probe}'
  rung = rungs.open_rung(spec)
  pre = models.load(rung.model['name'])
  # Ours: our host preprocessing (dinov2-tiny resizes 32 → 36, crops 32), then the model.
  pixels = preprocess.prepare_batch(list(images), pre.preprocess)
  ours = np.asarray(jax.jit(rung.logits_fn(pre))(rung.params(pre), pixels))
  assert ours.shape == (5, 2) and np.ptp(ours) > 0
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  fn = jax.export.deserialize(open(os.path.join(d, 'logits.jax_export'), 'rb').read())
  np.testing.assert_allclose(np.asarray(fn.call(pixels)), ours, atol=1e-4, rtol=0)
  assert np.asarray(fn.call(pixels[:1])).shape == (1, 2)  # any batch size


@pytest.mark.parametrize('module,kind', [
    (siglip.preset_module('siglip-tiny'), 'siglip_vision_model'),
    (dinov2.DINOv2(dinov2.VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=16, patch_size=8, use_swiglu_ffn=True,
                                       num_register_tokens=2)), 'dinov2_with_registers')])
def test_export_names_invert_the_readers(module, kind):
  """Each family's ``to_torch_names`` is its ``torch_names`` backwards, on every param."""
  import flax  # pylint: disable=g-import-not-at-top
  from clip_transfer.models import checkpoints  # pylint: disable=g-import-not-at-top
  shapes = flax.traverse_util.flatten_dict(families.param_shapes(module)['vision_model'],
                                           sep='/')
  params = {k: np.random.default_rng(i).normal(size=s.shape).astype(np.float32)
            for i, (k, s) in enumerate(sorted(shapes.items()))}
  nested = flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in params.items()})
  tensors = hf_export._vision_tensors(nested)  # pylint: disable=protected-access
  if module.family == 'siglip':
    torch_side, family = siglip.to_torch_names(tensors), siglip
  else:
    torch_side, family = dinov2.to_torch_names(tensors, module.vision_config), dinov2
  assert not any(k.startswith('vision_model.') for k in torch_side)
  back = checkpoints.linen_layout(family.torch_names(torch_side, kind))
  assert sorted(back) == sorted(f'vision_model/{k}' for k in params)
  for k, v in params.items():
    np.testing.assert_array_equal(np.asarray(back[f'vision_model/{k}']), v)


@pytest.mark.parametrize('arch', ['SiglipVisionModel', 'Dinov2WithRegistersModel'])
def test_reference_checkpoint_survives_read_and_export(tmp_path, arch):
  """A transformers save_pretrained tower, read by clip_transfer and exported again, is the
  same tensors (registers and SwiGLU included): nothing renamed, transposed or dropped."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  common = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                patch_size=8)
  if arch == 'SiglipVisionModel':
    config = transformers.SiglipVisionConfig(intermediate_size=48, **common)
  else:
    config = transformers.Dinov2WithRegistersConfig(num_register_tokens=2, use_swiglu_ffn=True,
                                                    **common)
  ref = getattr(transformers, arch)(config).eval()
  src, dst = str(tmp_path / 'src'), str(tmp_path / 'dst')
  ref.save_pretrained(src)
  pre = models.load(src)
  _, variables = pre.vision_tower()
  assert hf_export.save_vision(pre, variables['params'], dst) == arch
  back = getattr(transformers, arch).from_pretrained(dst).eval()
  theirs, ours = ref.state_dict(), back.state_dict()
  assert sorted(theirs) == sorted(ours)
  for k, v in theirs.items():
    if k != 'embeddings.mask_token':  # unused for features; exported as zeros
      np.testing.assert_array_equal(ours[k].numpy(), v.numpy(), err_msg=k)
  pixels = torch.randn(2, 3, 16, 16)
  with torch.no_grad():
    np.testing.assert_array_equal(back(pixel_values=pixels).last_hidden_state.numpy(),
                                  ref(pixel_values=pixels).last_hidden_state.numpy())
