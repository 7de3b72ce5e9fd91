r"""Benchmarks pipelines.embed: throughput vs the raw jitted backbone, and peak memory.

  python -m benchmarks.embed                       # random:vit-b32, 128 images
  python -m benchmarks.embed --images=512 --model=random:tiny --skip_memory

1. Throughput (one process, same model, same machine): images/s of the whole
   pipeline run (folder of JPEGs → decode → preprocess → RunInference →
   ArrayRecord shards + metadata, Beam start-up included) vs the same jitted
   vision tower on pre-made uint8 batches of the same images, measured back to
   back ``--repeats`` times; the median ratio is the figure (target ≥ 0.9).
   The model is loaded once per process and a persistent compilation cache,
   filled by the raw warm-up, keeps compilation out of both.
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
from benchmarks import write_json  # pylint: disable=g-import-not-at-top


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


class Raw:
  """The jitted backbone alone on pre-made, pre-padded uint8 batches (compile excluded)."""

  def __init__(self, root: str, model: str, batch_size: int):
    from pipelines import jax_handler  # pylint: disable=g-import-not-at-top
    from transfer import clip, preprocess, sources  # pylint: disable=g-import-not-at-top

    pre = clip.load(model)
    self.forward = jax_handler.build_forward(pre)  # the function the handler jits
    images = [preprocess.prepare(e.image, pre.preprocess)
              for e in sources.open_source(f'folder:{root}').iter_examples('train')]
    self.n = len(images)
    nb = -(-self.n // batch_size)
    shape = pre.preprocess.output_shape
    batches = np.zeros((nb * batch_size, *shape), np.uint8)
    batches[:self.n] = np.stack(images)
    self.batches = batches.reshape(nb, batch_size, *shape)
    self.forward(self.batches[0])[0].block_until_ready()  # compile (and fill the cache)

  def images_per_second(self) -> float:
    t = time.perf_counter()
    for b in self.batches:
      out = self.forward(b)[0]
    out.block_until_ready()
    return self.n / (time.perf_counter() - t)


def throughput(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    # A persistent compilation cache, filled by the raw warm-up: each pipeline
    # run loads the compiled forward instead of compiling it again.
    jax.config.update('jax_compilation_cache_dir', os.path.join(tmp, 'jax_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
    root = make_folder(os.path.join(tmp, 'images'), args.images, args.image_size)
    raw = Raw(root, args.model, args.batch_size)
    pairs = []
    # Raw and pipeline back to back, several times: a shared machine's load
    # drifts, and each ratio compares two runs made under the same load.
    for r in range(args.repeats):
      raw_rate = raw.images_per_second()
      seconds = pipeline_seconds(root, os.path.join(tmp, f'out{r}'), args.model,
                                 args.batch_size)
      pairs.append((raw_rate, args.images / seconds))
  ratios = sorted(p / r for r, p in pairs)
  return {'model': args.model, 'images': args.images, 'batch_size': args.batch_size,
          'pairs_raw_pipeline_images_per_s': pairs, 'ratios': ratios,
          'ratio_median': ratios[len(ratios) // 2]}


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
  p.add_argument('--images', type=int, default=128, help='images for the throughput runs')
  p.add_argument('--repeats', type=int, default=3, help='raw/pipeline pairs (median ratio)')
  p.add_argument('--image_size', type=int, default=256, help='JPEG side for throughput')
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--memory_model', default='random:tiny',
                 help='model for the memory figure (small: the images dominate what could grow)')
  p.add_argument('--memory_images', type=int, default=150, help='M for the memory runs (M, 10M)')
  p.add_argument('--memory_image_size', type=int, default=512, help='JPEG side for memory')
  p.add_argument('--skip_throughput', action='store_true')
  p.add_argument('--skip_memory', action='store_true')
  p.add_argument('--json', default=None, help='also write the results to this file')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--child_root', help=argparse.SUPPRESS)
  p.add_argument('--child_out', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    return child(args)
  results = {}
  if not args.skip_throughput:
    results['throughput'] = t = throughput(args)
    pairs = ', '.join(f'{r:.1f}/{p:.1f}' for r, p in t['pairs_raw_pipeline_images_per_s'])
    print(f"throughput ({t['model']}, {t['images']} images, batch {t['batch_size']}): "
          f"raw/pipeline img/s per pair {pairs}; ratio median {t['ratio_median']:.2f} "
          f"(all {', '.join(f'{x:.2f}' for x in t['ratios'])}; target >= 0.9)")
  if not args.skip_memory:
    results['memory'] = m = memory(args)
    print(f"peak memory ({m['model']}): {m['images_1x']} images {m['peak_rss_mb_1x']:.0f} MB, "
          f"{m['images_10x']} images {m['peak_rss_mb_10x']:.0f} MB: ratio {m['ratio']:.2f} "
          f"(target <= 1.2; the 10x inputs are {m['jpeg_mb_10x']:.0f} MB of JPEG, "
          f"{m['decoded_mb_10x']:.0f} MB decoded)")
  print(json.dumps(results))
  write_json(args.json, results)
  return results


if __name__ == '__main__':
  main()
