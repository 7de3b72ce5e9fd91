"""Loading errors are one clear line through the real entry point, never a hang."""

import json
import os
import subprocess
import sys

import pytest

from clip_transfer.models import families
from clip_transfer.models.checkpoints import ModelLoadError


def _smoke(model, **env):
  """Runs the smoke entry point; returns (returncode, stderr)."""
  full_env = {**os.environ, **env}
  p = subprocess.run([sys.executable, '-m', 'clip_transfer.smoke', f'--model={model}'],
                     capture_output=True, text=True, env=full_env, timeout=120)
  return p.returncode, p.stderr


def test_unknown_preset():
  with pytest.raises(ModelLoadError, match="unknown preset 'random:huge'.*random:tiny"):
    families.read('random:huge')


def test_hub_id_offline_fails_fast_with_the_way_out(tmp_path):
  # An unreachable endpoint on loopback: refused at once, as with no network.
  code, err = _smoke('openai/clip-vit-base-patch32', HF_ENDPOINT='http://127.0.0.1:9',
                     HF_HOME=str(tmp_path / 'hf'))
  assert code == 2
  assert 'Traceback' not in err
  line = err.strip().splitlines()[-1]
  assert line.startswith('error: cannot fetch')
  assert 'local directory' in line and 'random:tiny' in line


def test_directory_without_weights(tmp_path, capsys):
  from clip_transfer import smoke  # pylint: disable=g-import-not-at-top
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'clip'}))
  with pytest.raises(SystemExit) as e:  # the entry point in-process: its one line, exit 2
    smoke.main([f'--model={tmp_path}'])
  code, err = e.value.code, capsys.readouterr().err
  assert code == 2 and 'Traceback' not in err
  assert 'has no weights' in err and 'model.safetensors' in err


def test_directory_without_config(tmp_path):
  with pytest.raises(ModelLoadError, match='no config.json'):
    families.read(str(tmp_path))


def test_missing_path():
  with pytest.raises(ModelLoadError, match='no such model directory'):
    families.read('./does/not/exist')


def test_not_a_clip_config(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'bert'}))
  with pytest.raises(ModelLoadError, match="model_type 'bert' is not a model clip_transfer can load"):
    families.read(str(tmp_path))


def test_shape_mismatch_names_parameter_and_shapes(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=16, patch_size=8)
  transformers.CLIPVisionModel(cfg).save_pretrained(tmp_path)
  config = json.loads((tmp_path / 'config.json').read_text())
  config['intermediate_size'] = 44
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ModelLoadError,
                     match=r"'vision_model/encoder/layers/0/mlp/fc1/bias' has shape \(40,\) "
                           r'in the checkpoint but the config expects \(44,\)'):
    families.read(str(tmp_path))


def test_pytorch_bin_without_torch_says_what_to_install(tmp_path, monkeypatch):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'clip_vision_model'}))
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not read')
  monkeypatch.setitem(sys.modules, 'torch', None)  # import torch now raises ImportError
  with pytest.raises(ModelLoadError, match=r'needs PyTorch.*pip install torch==2.13.0'):
    families.read(str(tmp_path))


def test_malformed_config_and_truncated_weights_are_one_line(tmp_path):
  transformers = pytest.importorskip('transformers')
  cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=16, patch_size=8)
  transformers.CLIPVisionModel(cfg).save_pretrained(tmp_path)
  weights = tmp_path / 'model.safetensors'
  data = weights.read_bytes()
  weights.write_bytes(data[:len(data) // 2])
  with pytest.raises(ModelLoadError, match='cannot read the weights') as e:
    families.read(str(tmp_path))
  assert '\n' not in str(e.value)
  (tmp_path / 'config.json').write_text('{"model_type": "clip_vision_model",')
  with pytest.raises(ModelLoadError, match='cannot read it as JSON') as e:
    families.read(str(tmp_path))
  assert '\n' not in str(e.value)
