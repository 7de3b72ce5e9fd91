r"""Fine-tune input at the device's pace: preparation and the fed step, each vs its limit.

  python -m benchmarks.finetune_input                     # random:vit-b32, 512 JPEGs
  python -m benchmarks.finetune_input --model=random:tiny --images=64 --steps=4

1. Preparation: ``finetune.input_pipeline.load_split`` (read + decode + resize + crop
   into the prepared array) images/s ÷ the embed stage's host preprocessing
   (``ParallelPrepare`` on every core, as embed's ``Preprocess`` DoFn runs it, results
   dropped) on the same folder of ``--image_size``-px JPEGs, back to back ``--repeats``
   times; the median ratio is the figure (target >= 0.8).
2. The step: the jitted train step fed by ``input_pipeline.Prefetch`` over that prepared
   split (seeded batches gathered, placed on the devices in the background) ÷ the same
   step fed one constant in-memory device batch (target >= 0.95).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if __package__ in (None, ''):  # run as a file: import the repo, not this folder's finetune.py
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from benchmarks import write_json  # pylint: disable=g-import-not-at-top
from benchmarks.embed import make_folder  # pylint: disable=g-import-not-at-top
from finetune import input_pipeline  # pylint: disable=g-import-not-at-top
from finetune import config as config_lib, steps  # pylint: disable=g-import-not-at-top
from clip_transfer import models  # pylint: disable=g-import-not-at-top
from clip_transfer.data import preprocess, sources  # pylint: disable=g-import-not-at-top


def embed_host_seconds(source, cfg, batch_size: int) -> float:
  """The embed stage's host preprocessing alone: every core, two batches in flight."""
  t = time.perf_counter()
  pool = preprocess.ParallelPrepare(cfg, 0, 2 * batch_size)
  for ex in source.iter_examples('train'):
    pool.put(None, ex.image)
  for _ in pool.drain():
    pass
  return time.perf_counter() - t


def finetune_prepare_seconds(source, cfg) -> tuple[float, input_pipeline.Split]:
  t = time.perf_counter()
  split = input_pipeline.load_split(source, 'train', cfg, progress=False)
  return time.perf_counter() - t, split


def run(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='random:vit-b32')
  p.add_argument('--images', type=int, default=512)
  p.add_argument('--image_size', type=int, default=512, help='side of the JPEGs')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--steps', type=int, default=10, help='timed steps per loop')
  p.add_argument('--mode', default='full')
  p.add_argument('--json', default=None, help='also write the results to this file')
  args = p.parse_args(argv)

  pre = models.load(args.model)
  cfg = pre.preprocess
  out = {'model': args.model, 'images': args.images, 'image_size': args.image_size,
         'cores': preprocess.host_cores(), 'batch_size': args.batch_size}
  with tempfile.TemporaryDirectory() as tmp:
    root = make_folder(os.path.join(tmp, 'images'), args.images, args.image_size,
                       unique=min(args.images, 64))
    source = sources.open_source(f'folder:{root}')
    embed_host_seconds(source, cfg, args.batch_size)  # warm the page cache and the pool
    pairs = []
    for _ in range(args.repeats):
      host = args.images / embed_host_seconds(source, cfg, args.batch_size)
      seconds, split = finetune_prepare_seconds(source, cfg)
      pairs.append((host, args.images / seconds))
  ratios = [ft / host for host, ft in pairs]
  out['prepare'] = {'pairs_embed_host_finetune_images_per_s': pairs,
                    'ratio_median': float(np.median(ratios))}

  mesh = steps.make_mesh()
  config = config_lib.Config(model=args.model, warmup=0.0)
  state, trainable, _ = steps.create_state(pre, 2, args.mode, config,
                                             total_steps=4 * args.steps + 10, mesh=mesh)
  train_step, _ = steps.jit_steps(mesh, trainable, cfg)
  place = lambda b: steps.shard_batch(b, mesh)
  constant = place(input_pipeline.train_batch(split, args.batch_size, 0, 0))
  holder = [state]

  def constant_loop():
    for _ in range(args.steps):
      holder[0], m = train_step(holder[0], constant)
    return m

  def fed_loop(start):
    with input_pipeline.Prefetch(split, args.batch_size, start, start + args.steps, 0,
                                 place=place) as batches:
      for batch in batches:
        holder[0], m = train_step(holder[0], batch)
    return m

  jax.block_until_ready(constant_loop())  # compile
  step_pairs = []
  for r in range(args.repeats):
    seconds = {}
    # Alternate which loop goes first: neither gains from the other's warm caches.
    for name in (('constant', 'fed') if r % 2 == 0 else ('fed', 'constant')):
      t = time.perf_counter()
      jax.block_until_ready(constant_loop() if name == 'constant' else
                            fed_loop(r * args.steps))
      seconds[name] = time.perf_counter() - t
    constant_s, fed_s = seconds['constant'], seconds['fed']
    step_pairs.append((args.steps * args.batch_size / constant_s,
                       args.steps * args.batch_size / fed_s))
  out['step'] = {'mode': args.mode, 'steps': args.steps,
                 'pairs_constant_fed_images_per_s': step_pairs,
                 'ratio_median': float(np.median([f / c for c, f in step_pairs]))}
  print(f'preparation: fine-tune {pairs[-1][1]:.1f} vs embed host {pairs[-1][0]:.1f} images/s '
        f'(median ratio {out["prepare"]["ratio_median"]:.2f}, target >= 0.8)')
  print(f'step: fed {step_pairs[-1][1]:.1f} vs constant {step_pairs[-1][0]:.1f} images/s '
        f'(median ratio {out["step"]["ratio_median"]:.2f}, target >= 0.95)')
  write_json(args.json, out)
  return out


if __name__ == '__main__':
  run()
