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

``--memory_rows=N``: peak memory per process of ``python -m probe.train`` on
one embedding dataset of N rows, run as 1 process and as 2 (one CPU device
each, JAX's multi-host runtime on localhost). Each process reads and holds
only its rows, so above what every process pays for its imports (the peak of
a run on a tiny dataset) the 2-process peak should be about half
(target ~0.5x).
"""

import argparse
import json
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


_PEAK = """import json, resource, subprocess, sys
procs = [subprocess.Popen(c) for c in json.loads(sys.argv[1])]
codes = [p.wait() for p in procs]
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if not any(codes) else -1)
"""


def _peak_mb(commands) -> float:
  """The largest peak RSS (MB) among processes started together (a fresh parent per call)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  out = subprocess.run([sys.executable, '-c', _PEAK, json.dumps(commands)],
                       env=env, capture_output=True, text=True, timeout=3600, check=True)
  peak = float(out.stdout.split()[-1])
  if peak < 0:
    raise RuntimeError(f'a probe process failed: {out.stderr[-2000:]}')
  return peak


def memory_processes(rows: int, dim: int, num_classes: int) -> dict:
  """Peak RSS per process, probe.train as 1 process vs 2, on the same embedding dataset."""
  import socket  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from clip_transfer.data import embeddings  # pylint: disable=g-import-not-at-top

  def dataset(path, n):
    x, y = synthetic(n, dim, num_classes)
    cut = n * 4 // 5
    splits = {'train': [(f'{i:08d}', x[i], int(y[i])) for i in range(cut)],
              'test': [(f'{i:08d}', x[i], int(y[i])) for i in range(cut, n)]}
    embeddings.write_dataset(path, splits, [str(c) for c in range(num_classes)],
                             {'model': {'name': 'synthetic'}})
    return path

  with tempfile.TemporaryDirectory() as tmp:
    def probe(ds, out, extra=()):
      return [sys.executable, '-m', 'probe.train', f'--embeddings={ds}',
              f'--output_dir={os.path.join(tmp, out)}', '--baselines=', '--no_progress',
              '--l2_grid=1e-4,1e-2', *extra]

    def two(ds, out):
      with socket.socket() as sock:
        sock.bind(('localhost', 0))
        port = sock.getsockname()[1]
      return [probe(ds, out, [f'--coordinator_address=localhost:{port}', '--num_processes=2',
                              f'--process_id={i}']) for i in range(2)]

    big = dataset(os.path.join(tmp, 'big'), rows)
    tiny = dataset(os.path.join(tmp, 'tiny'), 200)
    base1, base2 = _peak_mb([probe(tiny, 't1')]), _peak_mb(two(tiny, 't2'))
    one, both = _peak_mb([probe(big, 'b1')]), _peak_mb(two(big, 'b2'))
  return {'rows': rows, 'dim': dim, 'matrix_mb': rows * dim * 4 / 2**20,
          'peak_mb_1': one, 'peak_mb_2': both, 'baseline_mb_1': base1, 'baseline_mb_2': base2,
          'ratio_above_baseline': (both - base2) / max(one - base1, 1e-9)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--num', type=int, default=50_000, help='synthetic examples (train+val+eval)')
  p.add_argument('--dim', type=int, default=768, help='embedding width (ViT-B/32 pooled: 768)')
  p.add_argument('--classes', type=int, default=100)
  p.add_argument('--l2_grid', default=','.join(map(repr, core.DEFAULT_L2_GRID)))
  p.add_argument('--tol', type=float, default=linear.TOL, help='both methods stop at max |grad| <= tol')
  p.add_argument('--skip_digits', action='store_true')
  p.add_argument('--memory_rows', type=int, default=0,
                 help='also peak memory per process, 1 vs 2 processes, on this many rows')
  p.add_argument('--skip_sweep', action='store_true', help='only the memory figure')
  p.add_argument('--json', default=None, help='also write the results to this file')
  args = p.parse_args(argv)
  l2s = [float(v) for v in args.l2_grid.split(',')]
  import jax  # pylint: disable=g-import-not-at-top
  import sklearn.linear_model  # pylint: disable=g-import-not-at-top,unused-import  # loads its BLAS
  from threadpoolctl import threadpool_info  # pylint: disable=g-import-not-at-top
  blas = ', '.join(f'{p["internal_api"]}:{p["num_threads"]}' for p in threadpool_info())
  print(f'cpus {os.cpu_count()}  jax {jax.devices()}  sklearn BLAS threads {blas}  grid {l2s}',
        flush=True)
  results = {}
  if args.memory_rows:
    results['memory'] = m = memory_processes(args.memory_rows, args.dim, args.classes)
    print(f"probe peak memory per process, {m['rows']} x {m['dim']} ({m['matrix_mb']:.0f} MB): "
          f"1 process {m['peak_mb_1']:.0f} MB, 2 processes {m['peak_mb_2']:.0f} MB; above the "
          f"import baseline ({m['baseline_mb_1']:.0f} / {m['baseline_mb_2']:.0f} MB) "
          f"{m['ratio_above_baseline']:.2f}x (target ~0.5)", flush=True)
  if args.skip_sweep:
    write_json(args.json, results)
    return results
  x, y = synthetic(args.num, args.dim, args.classes)
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
