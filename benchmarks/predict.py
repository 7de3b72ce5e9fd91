r"""Benchmarks pipelines.predict: throughput vs the raw jitted backbone, and peak memory.

  python -m benchmarks.predict                      # random:vit-b32, 640 images
  python -m benchmarks.predict --images=64 --model=random:tiny --memory_images=10

The same measurements as ``benchmarks.embed`` (its image folders, its raw
backbone on pre-made uint8 batches, its peak-RSS reading), for the predict
stage with a probe head of the model's width (its values do not change the
cost; its class count does, at start-up: the head travels pickled, bz2-compressed,
inside the job, so ``--num_classes=1000`` shows what an ImageNet-size head adds):
1. Throughput: whole-run images/s (Beam start-up included; Parquet written) ÷
   the raw jitted vision tower's images/s on the same images and batch, back to
   back, median over ``--repeats`` (target ≥ 0.9). Compilation is out of both,
   as in ``benchmarks.embed``: the raw side compiles in its warm-up, and the
   pipeline's program (backbone and head) is compiled by the first start-up run
   and kept for the process (``pipelines.predict.logits_jit``).
2. Peak memory: predict on M and 10M JPEGs, each in its own subprocess, peak RSS
   compared (streaming: ≤ 1.2x).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks import write_json  # pylint: disable=g-import-not-at-top
from benchmarks.embed import Raw, _peak_rss_mb, make_folder  # pylint: disable=protected-access


def make_probe(out: str, model: str, num_classes: int = 2) -> str:
  """A probe run directory for ``model`` (random head; what the predict stage reads)."""
  from clip_transfer import models  # pylint: disable=g-import-not-at-top
  from clip_transfer.protocol import heads  # pylint: disable=g-import-not-at-top
  from clip_transfer.protocol import metrics  # pylint: disable=g-import-not-at-top

  pre = models.load(model)
  dim = pre.embedding_dim
  rng = np.random.default_rng(0)
  names = [f'c{i}' for i in range(num_classes)]  # make_folder's class folders
  os.makedirs(out, exist_ok=True)
  heads.LinearHead(rng.normal(size=(dim, num_classes)).astype(np.float32),
                   np.zeros(num_classes, np.float32), np.zeros(dim, np.float32),
                   np.ones(dim, np.float32), names, 1e-4).save(out)
  m = metrics.header('probe', dataset={'spec': 'bench', 'name': 'bench', 'version': '0',
                                       'train_split': 'train', 'eval_split': 'test'},
                     model={'name': model, 'weights_sha256': pre.checksum()},
                     class_names=names, num_train=0, num_eval=0)
  m['methods'] = {'jax': {'top1': 0.0, 'top1_ci95': [0.0, 0.0]}}
  metrics.write(out, m)
  return out


def pipeline_seconds(root: str, probe: str, out: str, batch_size: int) -> float:
  from pipelines import predict  # pylint: disable=g-import-not-at-top

  return predict.run([f'--dataset=folder:{root}', '--splits=train', f'--head=probe:{probe}',
                      f'--output_dir={out}', f'--batch_size={batch_size}'])['seconds']


def throughput(args) -> dict:
  median = lambda xs: sorted(xs)[len(xs) // 2]
  with tempfile.TemporaryDirectory() as tmp:
    root = make_folder(os.path.join(tmp, 'images'), args.images, args.image_size,
                       unique=args.unique_images)
    probe = make_probe(os.path.join(tmp, 'probe'), args.model, args.num_classes)
    raw = Raw(root, args.model, args.batch_size)
    few = make_folder(os.path.join(tmp, 'few'), 8, args.image_size)
    for r in range(2):  # Beam's fixed start-up (the second run: imports already paid)
      few_seconds = pipeline_seconds(few, probe, os.path.join(tmp, f'few{r}'), args.batch_size)
    pairs, seconds = [], []
    for r in range(args.repeats):
      raw_rate = raw.images_per_second()
      seconds.append(pipeline_seconds(root, probe, os.path.join(tmp, f'out{r}'),
                                      args.batch_size))
      pairs.append((raw_rate, args.images / seconds[-1]))
  startup = max(0.0, few_seconds - args.batch_size / median([r for r, _ in pairs]))
  steady = [args.images / max(s - startup, 1e-9) for s in seconds]
  ratios = sorted(p / r for r, p in pairs)
  return {'model': args.model, 'images': args.images, 'batch_size': args.batch_size,
          'num_classes': args.num_classes,
          'image_size': args.image_size, 'pairs_raw_pipeline_images_per_s': pairs,
          'ratios': ratios, 'ratio_median': median(ratios), 'startup_s': startup,
          'ratio_steady_median': median([s / r for s, (r, _) in zip(steady, pairs)])}


def memory(args) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    m = args.memory_images
    probe = make_probe(os.path.join(tmp, 'probe'), args.memory_model)
    small = make_folder(os.path.join(tmp, 'm'), m, args.memory_image_size)
    big = make_folder(os.path.join(tmp, '10m'), 10 * m, args.memory_image_size, seed=1)
    rss = []
    for root, out in ((small, 'o1'), (big, 'o10')):
      cmd = [sys.executable, '-m', 'benchmarks.predict', '--child', f'--child_root={root}',
             f'--child_probe={probe}', f'--child_out={os.path.join(tmp, out)}',
             f'--batch_size={args.batch_size}']
      res = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if res.returncode:
        raise RuntimeError(f'memory child failed:\n{res.stderr[-3000:]}')
      rss.append(json.loads(res.stdout.strip().splitlines()[-1])['maxrss_mb'])
  return {'model': args.memory_model, 'images_1x': m, 'images_10x': 10 * m,
          'image_size': args.memory_image_size, 'peak_rss_mb_1x': rss[0],
          'peak_rss_mb_10x': rss[1], 'ratio': rss[1] / rss[0]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='random:vit-b32')
  p.add_argument('--images', type=int, default=640)
  p.add_argument('--unique_images', type=int, default=64, help='distinct JPEGs (rest: copies)')
  p.add_argument('--image_size', type=int, default=256)
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--num_classes', type=int, default=2, help="the probe head's classes")
  p.add_argument('--repeats', type=int, default=1)
  p.add_argument('--memory_model', default='random:tiny')
  p.add_argument('--memory_images', type=int, default=200)
  p.add_argument('--memory_image_size', type=int, default=512)
  p.add_argument('--skip_memory', action='store_true')
  p.add_argument('--json', help='write the results here')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--child_root', help=argparse.SUPPRESS)
  p.add_argument('--child_probe', help=argparse.SUPPRESS)
  p.add_argument('--child_out', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:  # one predict run in this process, then its peak RSS
    import contextlib  # pylint: disable=g-import-not-at-top
    with contextlib.redirect_stdout(sys.stderr):
      pipeline_seconds(args.child_root, args.child_probe, args.child_out, args.batch_size)
    print(json.dumps({'maxrss_mb': _peak_rss_mb()}))
    return
  out = {'throughput': throughput(args)}
  if not args.skip_memory:
    out['memory'] = memory(args)
  print(json.dumps(out, indent=1))
  if args.json:
    write_json(args.json, out)


if __name__ == '__main__':
  main()
