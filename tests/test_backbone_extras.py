"""Backbone odds and ends (issue #18): OpenCLIP recorded as its own family."""

import importlib.util

import numpy as np
import pytest

from clip_transfer import models

torch = pytest.importorskip('torch')


@pytest.mark.skipif(importlib.util.find_spec('open_clip') is None,
                    reason='open_clip_torch is not installed')
def test_open_clip_checkpoint_is_recorded_as_open_clip(tmp_path, digits_data_dir):
  from pipelines import embed  # pylint: disable=g-import-not-at-top
  from clip_transfer.data import embeddings  # pylint: disable=g-import-not-at-top
  from clip_transfer.models import hf_export  # pylint: disable=g-import-not-at-top
  from test_open_clip import _model_cfg, _reference, _save  # pylint: disable=g-import-not-at-top

  cfg = _model_cfg(width=32, layers=1, head_width=16, patch=8, image=16, t_width=32)
  path = _save(_reference(cfg), cfg, tmp_path / 'oc')
  pre = models.load(path)
  assert (pre.family, pre.embedding_dim, pre.projection_dim) == ('open_clip', 32, 24)
  emb = str(tmp_path / 'emb')
  embed.run(['--dataset=digits', f'--data_dir={digits_data_dir}', f'--model={path}',
             f'--output_dir={emb}', '--batch_size=64', '--splits=test'])
  assert embeddings.read_metadata(emb)['model']['family'] == 'open_clip'
  # Still CLIP's towers underneath: its Hugging Face export is CLIP's.
  vision = pre.variables['params']['vision_model']
  assert hf_export.save_vision(pre, vision, str(tmp_path / 'hf')) == 'CLIPVisionModel'
  assert hf_export.usage(pre, 'embedding')[0] == 'CLIPImageProcessor'
  assert np.isfinite(embeddings.read_split(emb, 'test')[0]).all()
