"""Probe benchmark: the whole L2 sweep + selection, JAX (vmapped L-BFGS) vs scikit-learn, one process.

    python -m benchmarks.probe                       # N=50,000 x D=768, 100 classes (minutes on 2 cores)
    python -m benchmarks.probe --num=10000           # quicker while developing

Both methods get the same float32 standardised features, the same seeded
stratified validation split, the same L2 grid (mapped to sklearn's C) and
the same stopping rule (max |grad| <= clip_transfer.protocol.linear.TOL = 1e-5, or 1,000 iterations). They run one
after the other, so each has every core to itself: JAX's thread pool and
OpenBLAS (sklearn's gradient matmuls) both use all cores by default.
Target (DESIGN.md): JAX >= 10x faster, top-1 within 0.5 points. Then the
same on the digits pixels (1,797 x 64, 10 classes), a small real set.
"""

import argparse
import os

import numpy as np

from probe import core
from clip_transfer.protocol import linear
from clip_transfer.protocol import validation
from clip_transfer.protocol.metrics import classification
from benchmarks import write_json  # pylint: disable=g-import-not-at-top


def synthetic(num: int, dim: int, num_classes: int, seed: int = 0):
  """A Gaussian mixture seen through a fixed mixing matrix: correlated features like embeddings."""
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(num_classes, dim)) * 0.15
  # Singular values from 1 to 0.1: anisotropic, as pooled ViT features are.
  q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  mix = q * np.geomspace(1.0, 0.1, dim)
  y = rng.integers(0, num_classes, num)
  x = (means[y] + rng.normal(size=(num, dim))) @ mix
  return x.astype(np.float32), y.astype(np.int64)


def digits():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  return d.data.astype(np.float32), d.target.astype(np.int64)


def compare(name, x, y, num_classes, l2s, tol, eval_fraction=0.2, seed=0):
  """Runs both methods on one dataset; prints and returns (speedup, top1 jax, top1 sklearn)."""
  ids = [str(i) for i in range(len(y))]
  held = validation.split(ids, y, eval_fraction, seed + 1)
  rest, ev = held.fit, held.val
  val_split = validation.split([ids[i] for i in rest], y[rest], 0.1, seed)
  fit, val = rest[val_split.fit], rest[val_split.val]
  names = [str(c) for c in range(num_classes)]
  methods = {'jax': core.JaxMethod(tol=tol), 'sklearn': core.SklearnMethod(tol=tol)}
  res = {}
  for name_, method in methods.items():
    r = core.select_and_fit(method, x[fit], y[fit], x[val], y[val], x[ev], num_classes, l2s,
                            progress=True)
    res[name_] = (r, classification(r.eval_logits, y[ev], names)['top1'])
    iters = [v['n_iter'] for v in r.sweep.values()]
    print(f'  {name_:8s} wall {r.wall_s:8.2f} s  top1 {100 * res[name_][1]:6.2f}  '
          f'l2 {r.l2:g}  sweep iters {iters}', flush=True)
  # The same JAX run again: executables now cached, so this is the compute alone.
  warm = core.select_and_fit(methods['jax'], x[fit], y[fit], x[val], y[val], x[ev], num_classes,
                             l2s).wall_s
  print(f'  jax again (compiled): {warm:.2f} s, so compiling took ~{res["jax"][0].wall_s - warm:.2f} s',
        flush=True)
  speed = res['sklearn'][0].wall_s / res['jax'][0].wall_s
  gap = 100 * (res['jax'][1] - res['sklearn'][1])
  print(f'{name}: JAX {speed:.1f}x faster than sklearn (target >= 10x); '
        f'top1 jax {100 * res["jax"][1]:.2f} vs sklearn {100 * res["sklearn"][1]:.2f} '
        f'({gap:+.2f} pt, target within 0.5); compiled JAX {res["sklearn"][0].wall_s / warm:.1f}x',
        flush=True)
  return speed, res['jax'][1], res['sklearn'][1]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--num', type=int, default=50_000, help='synthetic examples (train+val+eval)')
  p.add_argument('--dim', type=int, default=768, help='embedding width (ViT-B/32 pooled: 768)')
  p.add_argument('--classes', type=int, default=100)
  p.add_argument('--l2_grid', default=','.join(map(repr, core.DEFAULT_L2_GRID)))
  p.add_argument('--tol', type=float, default=linear.TOL, help='both methods stop at max |grad| <= tol')
  p.add_argument('--skip_digits', action='store_true')
  p.add_argument('--json', default=None, help='also write the results to this file')
  args = p.parse_args(argv)
  l2s = [float(v) for v in args.l2_grid.split(',')]
  import jax  # pylint: disable=g-import-not-at-top
  import sklearn.linear_model  # pylint: disable=g-import-not-at-top,unused-import  # loads its BLAS
  from threadpoolctl import threadpool_info  # pylint: disable=g-import-not-at-top
  blas = ', '.join(f'{p["internal_api"]}:{p["num_threads"]}' for p in threadpool_info())
  print(f'cpus {os.cpu_count()}  jax {jax.devices()}  sklearn BLAS threads {blas}  grid {l2s}',
        flush=True)
  x, y = synthetic(args.num, args.dim, args.classes)
  results = {}
  name = f'synthetic {args.num}x{args.dim}, {args.classes} classes'
  results['synthetic'] = dict(zip(('speedup', 'top1_jax', 'top1_sklearn'),
                                  compare(name, x, y, args.classes, l2s, args.tol)), name=name)
  if not args.skip_digits:
    x, y = digits()
    name = 'digits pixels 1797x64, 10 classes'
    results['digits'] = dict(zip(('speedup', 'top1_jax', 'top1_sklearn'),
                                 compare(name, x, y, 10, l2s, args.tol)), name=name)
  write_json(args.json, results)
  return results


if __name__ == '__main__':
  main()
