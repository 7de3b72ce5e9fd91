r"""Benchmarks pipelines.embed: throughput vs the raw jitted backbone, and peak memory.

  python -m benchmarks.embed                       # random:vit-b32, 128 images
  python -m benchmarks.embed --images=512 --model=random:tiny --skip_memory

1. Throughput (one process, same model, same machine): images/s of the whole
   pipeline (folder of JPEGs → decode → preprocess → RunInference → ArrayRecord)
   vs the same jitted vision tower on pre-made uint8 batches. The pipeline runs
   on N and 2N images; the marginal rate N / (t(2N) - t(N)) cancels the fixed
   start-up (Beam graph, model load). A persistent compilation cache, filled by
   the raw run, keeps compile time out of all of them. Target: ≥ 0.9x raw.
2. Peak memory: the pipeline on M and 10M large JPEGs, each run in its own
   subprocess, peak RSS (VmHWM) compared. Streaming means the ratio stays near 1
   (target ≤ 1.2x); collecting the images would grow it by the images' size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def make_folder(root: str, n: int, size: int, seed: int = 0, classes: int = 2) -> str:
  """root/train/c<k>/<i>.jpg: n random-noise JPEGs (noise: no tiny compressed files)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  for i in range(n):
    d = os.path.join(root, 'train', f'c{i % classes}')
    os.makedirs(d, exist_ok=True)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(d, f'{i:06d}.jpg'), quality=90)
  return root


def pipeline_seconds(root: str, out: str, model: str, batch_size: int) -> float:
  from pipelines import embed  # pylint: disable=g-import-not-at-top

  summary = embed.run([f'--dataset=folder:{root}', '--splits=train', f'--model={model}',
                       f'--output_dir={out}', f'--batch_size={batch_size}'])
  return summary['seconds']


def raw_images_per_second(root: str, model: str, batch_size: int, repeats: int = 2) -> float:
  """The jitted backbone alone on pre-made, pre-padded uint8 batches (compile excluded)."""
  from pipelines import jax_handler  # pylint: disable=g-import-not-at-top
  from transfer import preprocess, sources  # pylint: disable=g-import-not-at-top

  pre = jax_handler.load_pretrained_once(model)
  forward = jax_handler.build_forward(pre)
  images = [preprocess.prepare(e.image, pre.preprocess)
            for e in sources.open_source(f'folder:{root}').iter_examples('train')]
  n = len(images)
  nb = -(-n // batch_size)
  batches = np.zeros((nb * batch_size, *pre.preprocess.output_shape), np.uint8)
  batches[:n] = np.stack(images)
  batches = batches.reshape(nb, batch_size, *pre.preprocess.output_shape)
  forward(batches[0])[0].block_until_ready()  # compile
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    for b in batches:
      out = forward(b)[0]
    out.block_until_ready()
    best = min(best, time.perf_counter() - t)
  return n / best


def throughput(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    # A persistent compilation cache, filled by the raw run: the pipeline runs
    # then load the compiled forward instead of compiling it again (seconds
    # for ViT-B/32 on CPU, and their length drifts with the machine's load).
    jax.config.update('jax_compilation_cache_dir', os.path.join(tmp, 'jax_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
    one = make_folder(os.path.join(tmp, 'n'), args.images, args.image_size)
    two = make_folder(os.path.join(tmp, '2n'), 2 * args.images, args.image_size, seed=1)
    # Raw before and after the pipeline runs, averaged: a shared machine's load
    # drifts, and this keeps both figures under the same conditions.
    raw_before = raw_images_per_second(one, args.model, args.batch_size)
    t1 = pipeline_seconds(one, os.path.join(tmp, 'out1'), args.model, args.batch_size)
    t2 = pipeline_seconds(two, os.path.join(tmp, 'out2'), args.model, args.batch_size)
    raw_after = raw_images_per_second(one, args.model, args.batch_size)
  raw = (raw_before + raw_after) / 2
  marginal = args.images / (t2 - t1) if t2 > t1 else float('nan')
  return {'model': args.model, 'images': args.images, 'batch_size': args.batch_size,
          'raw_images_per_s': raw, 'raw_before_after': [raw_before, raw_after], 'pipeline_images_per_s_2n': 2 * args.images / t2,
          'pipeline_marginal_images_per_s': marginal, 'ratio_marginal': marginal / raw,
          'ratio_end_to_end_2n': 2 * args.images / t2 / raw,
          'pipeline_seconds_n': t1, 'pipeline_seconds_2n': t2}


def peak_rss_mb(root: str, out: str, model: str, batch_size: int) -> float:
  cmd = [sys.executable, '-m', 'benchmarks.embed', '--child', f'--child_root={root}',
         f'--child_out={out}', f'--model={model}', f'--batch_size={batch_size}']
  res = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if res.returncode:
    raise RuntimeError(f'memory child failed:\n{res.stderr[-3000:]}')
  return json.loads(res.stdout.strip().splitlines()[-1])['maxrss_mb']


def memory(args) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    m = args.memory_images
    small = make_folder(os.path.join(tmp, 'm'), m, args.memory_image_size)
    big = make_folder(os.path.join(tmp, '10m'), 10 * m, args.memory_image_size, seed=1)
    inputs_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(big)
                    for f in fs) / 2**20
    rss_1 = peak_rss_mb(small, os.path.join(tmp, 'o1'), args.memory_model, args.batch_size)
    rss_10 = peak_rss_mb(big, os.path.join(tmp, 'o10'), args.memory_model, args.batch_size)
  decoded_mb = 10 * m * args.memory_image_size ** 2 * 3 / 2**20
  return {'model': args.memory_model, 'images_1x': m, 'images_10x': 10 * m,
          'image_size': args.memory_image_size, 'jpeg_mb_10x': inputs_mb,
          'decoded_mb_10x': decoded_mb, 'peak_rss_mb_1x': rss_1, 'peak_rss_mb_10x': rss_10,
          'ratio': rss_10 / rss_1}


def child(args) -> None:
  """Runs one embed in this process and prints its peak RSS (for `memory`)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  with contextlib.redirect_stdout(sys.stderr):
    pipeline_seconds(args.child_root, args.child_out, args.model, args.batch_size)
  print(json.dumps({'maxrss_mb': _peak_rss_mb()}))


def _peak_rss_mb() -> float:
  """This process's peak RSS: VmHWM, falling back to ru_maxrss.

  Linux carries ru_maxrss across execve from the forked parent's memory, so a
  child of a big parent reports the parent's size; VmHWM belongs to the new
  address space alone.
  """
  try:
    with open('/proc/self/status') as fh:
      for line in fh:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024  # kB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', default='random:vit-b32', help='model for the throughput figure')
  p.add_argument('--images', type=int, default=128, help='N for the throughput runs (N, 2N)')
  p.add_argument('--image_size', type=int, default=256, help='JPEG side for throughput')
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--memory_model', default='random:tiny',
                 help='model for the memory figure (small: the images dominate what could grow)')
  p.add_argument('--memory_images', type=int, default=150, help='M for the memory runs (M, 10M)')
  p.add_argument('--memory_image_size', type=int, default=512, help='JPEG side for memory')
  p.add_argument('--skip_throughput', action='store_true')
  p.add_argument('--skip_memory', action='store_true')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--child_root', help=argparse.SUPPRESS)
  p.add_argument('--child_out', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    return child(args)
  results = {}
  if not args.skip_throughput:
    results['throughput'] = t = throughput(args)
    print(f"throughput ({t['model']}, batch {t['batch_size']}, CPU): raw jitted backbone "
          f"{t['raw_images_per_s']:.1f} img/s; pipeline marginal "
          f"{t['pipeline_marginal_images_per_s']:.1f} img/s (ratio {t['ratio_marginal']:.2f}, "
          f"target >= 0.9); pipeline end to end on {2 * t['images']} images "
          f"{t['pipeline_images_per_s_2n']:.1f} img/s (ratio {t['ratio_end_to_end_2n']:.2f})")
  if not args.skip_memory:
    results['memory'] = m = memory(args)
    print(f"peak memory ({m['model']}): {m['images_1x']} images {m['peak_rss_mb_1x']:.0f} MB, "
          f"{m['images_10x']} images {m['peak_rss_mb_10x']:.0f} MB: ratio {m['ratio']:.2f} "
          f"(target <= 1.2; the 10x inputs are {m['jpeg_mb_10x']:.0f} MB of JPEG, "
          f"{m['decoded_mb_10x']:.0f} MB decoded)")
  print(json.dumps(results))


if __name__ == '__main__':
  main()
