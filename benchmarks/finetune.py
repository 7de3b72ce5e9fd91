"""Fine-tune train-step images/s vs forward-only images/s: same model, batch, process.

  python -m benchmarks.finetune --model=random:vit-b32 --batch_size=256 --dtype=bfloat16 \
      --steps=20 --peak_tflops=989

Both loops run on pre-made device batches (uint8, sharded over all local
devices, normalised inside jit), so the ratio measures the step itself; the
target is >= 0.3 (backward ~2x forward). Model FLOPs utilisation uses the
analytic ViT count (ViT-B/32: ~4.4 GMACs/image forward; a full train step
~3x forward) against --peak_tflops (e.g. 989 for an H100 SXM in bf16).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ''):  # run as a file: import the repo, not this folder's finetune.py
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from finetune import groups  # pylint: disable=g-import-not-at-top
from finetune import config, steps  # pylint: disable=g-import-not-at-top
from clip_transfer import models  # pylint: disable=g-import-not-at-top
from benchmarks import write_json  # pylint: disable=g-import-not-at-top


def vit_forward_macs(v) -> float:
  """Multiply-accumulates per image for one ViT forward pass (matmuls only)."""
  tokens = v.num_patches + 1
  d, ffn = v.hidden_size, v.intermediate_size
  patch = v.num_patches * v.patch_size ** 2 * v.num_channels * d
  per_layer = 4 * tokens * d * d + 2 * tokens * d * ffn + 2 * tokens * tokens * d
  return patch + v.num_hidden_layers * per_layer


def _time(fn, steps: int) -> float:
  """Seconds per call over ``steps`` calls, after two warm-up calls (compile)."""
  for _ in range(2):
    jax.block_until_ready(fn())
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def run(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='random:vit-b32')
  p.add_argument('--batch_size', type=int, default=256, help='global, over all local devices')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--steps', type=int, default=20, help='timed steps per loop')
  p.add_argument('--mode', default='full', help='parameter groups: full, linear, last:N, …')
  p.add_argument('--num_classes', type=int, default=1000)
  p.add_argument('--peak_tflops', type=float, default=None,
                 help="the accelerator's peak TFLOP/s at --dtype, for model FLOPs utilisation")
  p.add_argument('--json', default=None, help='also write the results to this file')
  args = p.parse_args(argv)

  t_start = time.perf_counter()
  log = lambda what: print(f'[{time.perf_counter() - t_start:6.1f} s] {what}', file=sys.stderr,
                           flush=True)
  mesh = steps.make_mesh()
  steps.check_batch_size(args.batch_size, mesh)
  pre = models.load(args.model, args.dtype)
  log(f'loaded {args.model}')
  cfg = config.Config(model=args.model, dtype=args.dtype, warmup=0.0)
  state, trainable, _ = steps.create_state(pre, args.num_classes, args.mode, cfg,
                                             total_steps=args.steps + 10, mesh=mesh)
  train_step, eval_step = steps.jit_steps(mesh, trainable, pre.preprocess)
  rng = np.random.default_rng(0)
  h, w, c = pre.preprocess.output_shape
  batch = steps.shard_batch({
      'image': rng.integers(0, 256, (args.batch_size, h, w, c), dtype=np.uint8),
      'label': rng.integers(0, args.num_classes, (args.batch_size,)).astype(np.int32),
  }, mesh)

  log('state created')
  forward_s = _time(lambda: eval_step(state, batch), args.steps)
  log('forward timed')
  holder = [state]  # the train step donates its state: keep the latest

  def train_once():
    holder[0], metrics = train_step(holder[0], batch)
    return metrics['loss']

  train_s = _time(train_once, args.steps)
  log('train step timed')
  vision = pre.module.vision_config
  fwd_flops = 2 * vit_forward_macs(vision)
  out = {
      'model': args.model, 'dtype': args.dtype, 'batch_size': args.batch_size,
      'mode': args.mode, 'devices': mesh.size, 'device_kind': jax.local_devices()[0].device_kind,
      'trainable_params': groups.count(holder[0].params, trainable),
      'forward_images_per_s': args.batch_size / forward_s,
      'train_images_per_s': args.batch_size / train_s,
      'forward_gmacs_per_image': fwd_flops / 2e9,
  }
  out['train_over_forward'] = out['train_images_per_s'] / out['forward_images_per_s']
  # A full step is ~3x forward; with frozen groups the backward pass shrinks (linear: ~1x).
  train_flops = 3 * fwd_flops if args.mode != 'linear' else fwd_flops
  if args.peak_tflops:
    peak = args.peak_tflops * 1e12 * mesh.size
    out['forward_mfu'] = out['forward_images_per_s'] * fwd_flops / peak
    out['train_mfu'] = out['train_images_per_s'] * train_flops / peak

  print(f'{args.model} {args.dtype} batch {args.batch_size} on {mesh.size} x '
        f'{out["device_kind"]} (mode {args.mode}, {out["trainable_params"]:,} trainable)')
  print(f'  forward only : {out["forward_images_per_s"]:10.1f} images/s')
  print(f'  train step   : {out["train_images_per_s"]:10.1f} images/s')
  print(f'  train/forward: {out["train_over_forward"]:10.3f}  (target >= 0.3)')
  if args.peak_tflops:
    print(f'  MFU at {args.peak_tflops:g} TFLOP/s/device: forward {out["forward_mfu"]:.1%}, '
          f'train {out["train_mfu"]:.1%}  ({out["forward_gmacs_per_image"]:.2f} GMACs/image fwd)')
  write_json(args.json, out)
  return out


if __name__ == '__main__':
  run()
