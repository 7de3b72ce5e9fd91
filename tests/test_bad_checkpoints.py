"""Bad checkpoints of every family fail in one line (issue 18; issue 22 #12 and #13)."""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from safetensors import numpy as st  # pylint: disable=g-import-not-at-top

from clip_transfer.models import families  # pylint: disable=g-import-not-at-top
from clip_transfer.models.checkpoints import ModelLoadError  # pylint: disable=g-import-not-at-top

TINY = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
            image_size=16, patch_size=8)


def _smoke(model):
  """The real entry point; returns (returncode, stderr lines)."""
  p = subprocess.run([sys.executable, '-m', 'clip_transfer.smoke', f'--model={model}'],
                     capture_output=True, text=True, timeout=300)
  return p.returncode, p.stderr.strip().splitlines()


def _one_line(path):
  with pytest.raises(ModelLoadError) as e:
    families.read(str(path))
  assert '\n' not in str(e.value)
  return str(e.value)


def _save(kind, path):
  if kind == 'siglip':
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY)).save_pretrained(path)
    return 'encoder.layers.0.mlp.fc1.weight'
  if kind == 'dinov2':
    cfg = {k: v for k, v in TINY.items() if k != 'intermediate_size'}
    transformers.Dinov2Model(transformers.Dinov2Config(**cfg)).save_pretrained(path)
    return 'encoder.layer.0.attention.attention.query.weight'
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY)).save_pretrained(path)
  return 'encoder.layers.0.mlp.fc1.weight'  # transformers 5 saves it without 'vision_model.'


@pytest.mark.parametrize('kind', ['clip', 'siglip', 'dinov2'])
def test_missing_wrong_shape_unknown_type_truncated(tmp_path, kind):
  key = _save(kind, tmp_path)
  weights = tmp_path / 'model.safetensors'
  good = st.load_file(weights)
  st.save_file({k: v for k, v in good.items() if k != key}, weights)
  assert 'lacks 1 parameter(s)' in _one_line(tmp_path)
  st.save_file({**good, key: good[key][:, :3].copy()}, weights)
  msg = _one_line(tmp_path)
  assert 'has shape' in msg and 'the config expects' in msg
  data = st.save({**good})
  weights.write_bytes(data[:len(data) // 2])
  assert 'cannot read the weights' in _one_line(tmp_path)
  cfg = json.loads((tmp_path / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**cfg, 'model_type': f'{kind}_xl'}))
  assert f"model_type '{kind}_xl' is not a model clip_transfer can load" in _one_line(tmp_path)


def test_siglip2_naflex_is_refused_naming_a_fixed_resolution_one(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'siglip2'}))
  assert 'google/siglip2-base-patch16-224' in _one_line(tmp_path)


class _Evil:
  """Pickles to a call of os.system: loading the file with pickle would run it."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_malicious_pytorch_bin_is_one_line_and_never_run(tmp_path):
  _save('clip', tmp_path)
  os.remove(tmp_path / 'model.safetensors')
  marker = tmp_path / 'pwned'
  torch.save({'vision_model.post_layernorm.weight': _Evil(marker)}, tmp_path / 'pytorch_model.bin')
  code, err = _smoke(tmp_path)
  assert code == 2 and len(err) == 1, err
  assert 'not loaded' in err[0] and 'safetensors' in err[0]
  assert 'weights_only=False' not in err[0] and not marker.exists()


# issue 22 #13: absurd or invalid values, refused before anything is built.
BAD_CONFIGS = [
    ({'num_hidden_layers': 10 ** 6}, 'num_hidden_layers must be an integer in [1, 256]'),
    ({'image_size': 10 ** 6}, 'image_size must be an integer in [1, 4096]'),
    ({'hidden_size': -32}, 'hidden_size must be an integer in [1, 16384]'),
    ({'hidden_size': 'abc'}, "hidden_size must be an integer, got 'abc'"),
    ({'patch_size': 0}, 'patch_size must be an integer in [1, 256]'),
    ({'layer_norm_eps': -1}, 'layer_norm_eps must be a number'),
    ({'num_attention_heads': 3}, 'not divisible by num_attention_heads 3'),
    ({'hidden_act': 'swish2'}, 'hidden_act must be one of'),
    ({'num_hidden_layers': 100}, 'describes'),  # in range, but not these weights
]


@pytest.mark.parametrize('kind', ['clip', 'siglip', 'dinov2'])
def test_absurd_configs_are_one_line(tmp_path, kind):
  _save(kind, tmp_path)
  cfg = json.loads((tmp_path / 'config.json').read_text())
  for change, want in BAD_CONFIGS:
    (tmp_path / 'config.json').write_text(json.dumps({**cfg, **change}))
    assert want in _one_line(tmp_path), change


def test_absurd_config_through_the_cli(tmp_path, capsys):
  from clip_transfer import smoke  # pylint: disable=g-import-not-at-top
  _save('siglip', tmp_path)
  cfg = json.loads((tmp_path / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**cfg, 'num_hidden_layers': 10 ** 6}))
  capsys.readouterr()  # save_pretrained's progress bar
  with pytest.raises(SystemExit) as e:  # in-process (a real process: the pickle test above)
    smoke.main([f'--model={tmp_path}'])
  code, err = e.value.code, capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and 'num_hidden_layers must be an integer' in err[0], err


def test_tokenizer_cleans_text_as_clip_does():
  from clip_transfer.models import tokenizer  # pylint: disable=g-import-not-at-top
  assert tokenizer.clean_text('  cats &amp; dogs\n\tin  a&nbsp;row ') == 'cats & dogs in a row'
  assert tokenizer.clean_text('&amp;lt;') == '<'  # unescaped twice, as the original does
  tok = tokenizer.load_tokenizer('random:tiny')
  ids, _ = tok(['cats &amp; dogs', 'cats   & dogs'])
  assert (ids[0] == ids[1]).all()
