"""Data parallelism: 4 fake CPU devices give the losses of 1 device; batch divisibility."""

import json
import os
import subprocess
import sys

import numpy as np

# Run as-is in a subprocess with 4 fake devices, and in this process (1 device).
SCRIPT = r'''
import json
import numpy as np
from finetune import config
from finetune import steps as steps_lib
from clip_transfer import models
from clip_transfer.models import clip
from clip_transfer.data import preprocess
from clip_transfer.errors import UserError

def run():
  # A vision-only micro CLIP: compiles in a fraction of random:tiny's time.
  vision = clip.VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, image_size=16, patch_size=8)
  module = clip.CLIP(vision)
  pre = models.Pretrained(module, {'params': clip.init_params(module)},
                               preprocess.PreprocessConfig.for_image_size(16), 'micro')
  cfg = config.Config(model='random:tiny', lr=(1e-2,), warmup=0.0)
  mesh = steps_lib.make_mesh()
  state, trainable, _ = steps_lib.create_state(pre, 5, 'full', cfg, 10, mesh=mesh)
  step, evaluate = steps_lib.jit_steps(mesh, trainable, pre.preprocess)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
           'label': rng.integers(0, 5, (8,)).astype(np.int32)}
  batch = steps_lib.shard_batch(batch, mesh)
  losses = []
  for _ in range(4):  # one batch, fitted: the loss must fall
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  logits = evaluate(state, batch)
  try:
    steps_lib.check_batch_size(6, mesh)
    error = None
  except UserError as e:
    error = str(e)
  return {'devices': mesh.size, 'losses': losses, 'batch_shards': len(batch['image'].addressable_shards),
          'logit_shards': len(logits.addressable_shards), 'error': error}

if __name__ == '__main__':
  print('RESULT ' + json.dumps(run()))
'''


def test_four_devices_match_one():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  four = json.loads(proc.stdout.split('RESULT ', 1)[1])

  ns = {'__name__': 'one_device'}
  exec(SCRIPT, ns)  # pylint: disable=exec-used
  one = ns['run']()

  assert (four['devices'], one['devices']) == (4, 1)
  assert four['batch_shards'] == four['logit_shards'] == 4
  np.testing.assert_allclose(four['losses'], one['losses'], rtol=1e-5)
  assert four['losses'][0] > four['losses'][-1]  # it trains
  assert 'not divisible by the 4 local devices' in four['error']
  assert one['error'] is None
