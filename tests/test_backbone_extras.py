"""Backbone odds and ends (issue #18): OpenCLIP recorded as its own family; XLA:CPU defaults."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from clip_transfer import models
from clip_transfer import xla_defaults

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


FLAG = 'xla_cpu_experimental_ynn_fusion_type'


def test_cpu_defaults_leave_what_the_user_set():
  env = {}
  assert xla_defaults.apply_cpu_defaults(env, backend_started=False) == [f'--{FLAG}=']
  assert env['XLA_FLAGS'] == f'--{FLAG}='
  env = {'XLA_FLAGS': f'--xla_dump_to=/tmp/d --{FLAG}=individual_dot'}
  assert xla_defaults.apply_cpu_defaults(env, backend_started=False) == []
  assert env['XLA_FLAGS'] == f'--xla_dump_to=/tmp/d --{FLAG}=individual_dot'
  env = {'XLA_FLAGS': '--xla_dump_to=/tmp/d'}
  xla_defaults.apply_cpu_defaults(env, backend_started=False)
  assert env['XLA_FLAGS'] == f'--xla_dump_to=/tmp/d --{FLAG}='
  for env in ({'JAX_PLATFORMS': 'cuda'}, {xla_defaults.OFF_SWITCH: '0'}, {}):
    started = not env  # the last: JAX already up, XLA has read its flags
    assert xla_defaults.apply_cpu_defaults(env, backend_started=started) == []
    assert 'XLA_FLAGS' not in env


# What a stage's process compiles a dot to: YNNPACK's fusion (jaxlib's default) or XLA's own.
_PROBE = ('import os, clip_transfer, jax, jax.numpy as jnp; '
          't = jax.jit(lambda a, b: a @ b).lower(jnp.ones((8, 16)), jnp.ones((16, 4))).compile(); '
          'print("ynn" if "__ynn_fusion" in t.as_text() else "xla", os.environ.get("XLA_FLAGS"))')


@pytest.mark.parametrize('extra, want', [
    ({}, 'xla'),  # the project's default
    ({'XLA_FLAGS': f'--{FLAG}=individual_dot'}, 'ynn'),  # the user's flag wins
    ({xla_defaults.OFF_SWITCH: '0'}, 'ynn'),  # switched off
])
def test_a_stage_process_compiles_with_the_defaults(extra, want):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', xla_defaults.OFF_SWITCH)}
  env.update(extra, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, '-c', _PROBE], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout
  assert out.split()[0] == want, out
