"""Linear probe on an embedding dataset, with the CLIP paper's scikit-learn baseline.

    python -m probe.train --embeddings=DIR --output_dir=OUT [--shots=1,5,10 --seeds=3]

Writes OUT/metrics.json and OUT/head.npz (apply it with probe.predict). The
logic lives in `train_probe` / `train_probe_arrays`, which tests call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from probe import core
from probe.head import LinearHead
from transfer.errors import UserError, cli_main
from transfer.metrics import classification

BASELINES = ('sklearn',)
METHODS = ('jax',) + BASELINES


def check_split(name: str, x: np.ndarray, y: np.ndarray, num_classes: int,
                ids: Optional[Sequence[str]] = None) -> None:
  """One clear error for each way a split can be unusable."""
  if len(x) == 0:
    raise UserError(f'split {name!r} is empty')
  if x.ndim != 2:
    raise UserError(f'split {name!r}: embeddings must be (N, D), got shape {x.shape}')
  bad = ~np.isfinite(x).all(axis=1)
  if bad.any():
    first = ids[int(np.argmax(bad))] if ids is not None else int(np.argmax(bad))
    raise UserError(f'split {name!r}: {int(bad.sum())} embeddings hold NaN or inf '
                    f'(first: {first}); re-run the embed stage on those inputs')
  out = (y < 0) | (y >= num_classes)
  if out.any():
    raise UserError(f'split {name!r}: label {int(y[np.argmax(out)])} is out of range for '
                    f'{num_classes} classes')


def check_splits(train: tuple, evaluation: tuple, num_classes: int,
                 names: tuple[str, str] = ('train', 'test')) -> None:
  """Per-split checks, then the ones between splits."""
  for name, split in zip(names, (train, evaluation)):
    check_split(name, *split, num_classes)
  if train[0].shape[1] != evaluation[0].shape[1]:
    raise UserError(f'embedding width differs between splits: {names[0]!r} has '
                    f'{train[0].shape[1]}, {names[1]!r} has {evaluation[0].shape[1]}')
  if len(np.unique(train[1])) < 2:
    raise UserError(f'split {names[0]!r} holds a single class ({int(train[1][0])}); a probe '
                    'needs at least two')


def _method_entry(method: str, r: core.MethodResult, y_eval: np.ndarray,
                  class_names: Sequence[str], solver: str) -> dict:
  m = classification(r.eval_logits, y_eval, class_names)
  return {**m, 'l2': r.l2, 'wall_s': r.wall_s,
          'solver': solver if method == 'jax' else 'sklearn-lbfgs',
          'refit_iterations': r.final_info['n_iter'], 'sweep': r.sweep}


def _mean_std(runs: list[dict], key: str):
  vals = [r[key] for r in runs]
  if any(v is None for v in vals):
    return None, None
  return float(np.mean(vals)), float(np.std(vals))


def _few_shot(method, k, seeds, x_fit, y_fit, x_val, y_val, x_eval, y_eval, class_names,
              l2s, solver, seed, progress, **kw) -> dict:
  """k examples per class from the fit part, L2 chosen on validation, fit on the shots alone."""
  runs, t0 = [], time.perf_counter()
  for s in range(seeds):
    idx = core.few_shot_indices(y_fit, k, seed * 1000 + s)
    r = core.sweep_and_refit(method, x_fit[idx], y_fit[idx], x_val, y_val, x_eval,
                             len(class_names), l2s, refit=False, solver=solver,
                             progress=progress, **kw)
    m = classification(r.eval_logits, y_eval, class_names)
    runs.append({**m, 'l2': r.l2, 'num_fit': int(len(idx))})
  entry = {'shots': k, 'seeds': seeds}
  for key in ('top1', 'top5', 'balanced_accuracy'):
    entry[key], entry[f'{key}_std'] = _mean_std(runs, key)
  entry['per_class'] = {
      n: (None if runs[0]['per_class'][n] is None
          else float(np.mean([r['per_class'][n] for r in runs]))) for n in class_names}
  entry['l2'] = [r['l2'] for r in runs]
  entry['wall_s'] = time.perf_counter() - t0
  entry['runs'] = [{k2: v for k2, v in r.items() if k2 != 'per_class'} for r in runs]
  return entry


def train_probe_arrays(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray,
                       y_eval: np.ndarray, class_names: Sequence[str],
                       output_dir: Optional[str] = None, *, val_fraction: float = 0.1,
                       l2_grid: Sequence[float] = core.DEFAULT_L2_GRID, solver: str = 'lbfgs',
                       baselines: Sequence[str] = BASELINES, seed: int = 0,
                       shots: Sequence[int] = (), seeds: int = 3,
                       max_iter: int = core.MAX_ITER, tol: float = core.TOL,
                       split_names: tuple[str, str] = ('train', 'test'),
                       extra: Optional[dict[str, Any]] = None, progress: bool = True) -> dict:
  """The probe protocol on arrays; returns the metrics dict (and writes it when output_dir is set)."""
  class_names = list(class_names)
  num_classes = len(class_names)
  x_train, x_eval = np.asarray(x_train, np.float32), np.asarray(x_eval, np.float32)
  y_train, y_eval = np.asarray(y_train, np.int64), np.asarray(y_eval, np.int64)
  check_splits((x_train, y_train), (x_eval, y_eval), num_classes, split_names)
  l2_grid = [float(v) for v in l2_grid]
  if not l2_grid or any(not np.isfinite(v) or v <= 0 for v in l2_grid):
    raise UserError(f'--l2_grid needs positive numbers, got {l2_grid}')
  if solver not in core.SOLVERS:
    raise UserError(f'--solver must be one of {", ".join(core.SOLVERS)}, got {solver!r}')
  unknown = [b for b in baselines if b not in BASELINES]
  if unknown:
    raise UserError(f'unknown baseline {unknown[0]!r}; choose from {", ".join(BASELINES)}')
  if not 0 <= val_fraction < 1:
    raise UserError(f'--val_fraction must be in [0, 1), got {val_fraction}')
  fit_idx, val_idx = core.stratified_split(y_train, val_fraction, seed)
  if len(val_idx) == 0 and (len(l2_grid) > 1 or shots):
    raise UserError(f'no validation examples (--val_fraction={val_fraction} of {len(y_train)}) '
                    'to choose the L2 on; raise --val_fraction or pass a single --l2_grid value')
  x_fit, y_fit, x_val, y_val = x_train[fit_idx], y_train[fit_idx], x_train[val_idx], y_train[val_idx]
  del x_train  # the sweep sees x_fit/x_val only; the refit concatenates them

  # One schema with the fine-tune stage: a header plus one entry per method.
  out: dict[str, Any] = {'stage': 'probe', 'methods': {}}
  results = {}
  head_params = int(x_eval.shape[1] * num_classes + num_classes)  # the Dense head, both methods
  for method in ('jax',) + tuple(baselines):
    print(f'{method}: sweeping {len(l2_grid)} L2 values on {len(y_fit)} examples, validating on '
          f'{len(y_val)}, then refitting on {len(y_fit) + len(y_val)}', file=sys.stderr)
    r = core.sweep_and_refit(method, x_fit, y_fit, x_val, y_val, x_eval, num_classes, l2_grid,
                             solver=solver, max_iter=max_iter, tol=tol, progress=progress)
    results[method] = r
    out['methods'][method] = {**_method_entry(method, r, y_eval, class_names, solver),
                              'trainable_params': head_params}
  for k in shots:
    for method in ('jax',) + tuple(baselines):
      print(f'{method}: {k}-shot, {seeds} seeds', file=sys.stderr)
      out['methods'][f'{method}_{k}shot'] = _few_shot(
          method, k, seeds, x_fit, y_fit, x_val, y_val, x_eval, y_eval, class_names, l2_grid,
          solver, seed, progress=False, max_iter=max_iter, tol=tol)
  out.update({
      'num_train': int(len(y_fit) + len(y_val)), 'num_fit': int(len(y_fit)),
      'num_val': int(len(y_val)), 'num_eval': int(len(y_eval)), 'dim': int(x_eval.shape[1]),
      'num_classes': num_classes, 'class_names': class_names, 'train_split': split_names[0],
      'eval_split': split_names[1], 'val_fraction': val_fraction, 'seed': seed,
      'l2_grid': l2_grid, 'solver': solver, 'max_iter': max_iter, 'tol': tol,
  })
  out.update(extra or {})
  jr = results['jax'].final
  head = LinearHead(kernel=jr['kernel'], bias=jr['bias'], mean=jr['mean'], std=jr['std'],
                    class_names=class_names, l2=results['jax'].l2)
  if output_dir:
    os.makedirs(output_dir, exist_ok=True)
    head.save(output_dir)
    with open(os.path.join(output_dir, 'metrics.json'), 'w') as f:
      json.dump(out, f, indent=2)
  print(summary_table(out))
  return out


def summary_table(metrics: dict) -> str:
  """A few lines: one per method and few-shot entry (few-shot: mean ± std, median L2)."""
  pct = lambda v: '   -  ' if v is None else f'{100 * v:6.2f}'
  lines = [f'{"method":14s} {"top1":>13s} {"top5":>6s} {"bal.acc":>7s} {"l2":>9s} {"wall_s":>8s}']
  for key, m in metrics['methods'].items():
    top1 = pct(m['top1']) + (f' ±{100 * m["top1_std"]:5.2f}' if 'top1_std' in m else '')
    l2 = m['l2'] if isinstance(m['l2'], float) else float(np.median(m['l2']))
    lines.append(f'{key:14s} {top1:>13s} {pct(m["top5"]):>6s} {pct(m["balanced_accuracy"]):>7s} '
                 f'{l2:9.1e} {m["wall_s"]:8.2f}')
  return '\n'.join(lines)


def train_probe(embeddings: str, output_dir: Optional[str], *, train_split: str = 'train',
                eval_split: str = 'test', **kwargs) -> dict:
  """Loads two splits of an embedding dataset and runs train_probe_arrays on them."""
  from transfer import embeddings as emb  # pylint: disable=g-import-not-at-top
  if train_split == eval_split:
    raise UserError(f'--train_split and --eval_split are both {train_split!r}; the L2 is '
                    'chosen on part of train, so evaluate on another split')
  metadata = emb.read_metadata(embeddings)
  class_names = emb.class_names(embeddings)
  x_train, y_train, ids_train = emb.read_split(embeddings, train_split)
  x_eval, y_eval, ids_eval = emb.read_split(embeddings, eval_split)
  # Checked here too, so NaN errors can name the offending example's id.
  check_split(train_split, x_train, y_train, len(class_names), ids_train)
  check_split(eval_split, x_eval, y_eval, len(class_names), ids_eval)
  src = metadata.get('source', {})
  extra = {
      'embeddings': embeddings, 'metadata': metadata,
      # The same header keys as the fine-tune stage, so report.compare can line them up.
      'dataset': {'spec': src.get('spec'), 'name': src.get('name'), 'version': src.get('version'),
                  'train_split': train_split, 'eval_split': eval_split},
      'model': metadata.get('model', {}),
      'embedding': emb.read_run_info(embeddings),  # the one-off cost, for the report
  }
  return train_probe_arrays(x_train, y_train, x_eval, y_eval, class_names, output_dir,
                            split_names=(train_split, eval_split), extra=extra, **kwargs)


def _floats(s: str) -> list[float]:
  try:
    return [float(v) for v in s.split(',') if v.strip()]
  except ValueError:
    raise UserError(f'expected comma-separated numbers, got {s!r}') from None


def _ints(s: str) -> list[int]:
  try:
    return [int(v) for v in s.split(',') if v.strip()]
  except ValueError:
    raise UserError(f'expected comma-separated integers, got {s!r}') from None


@cli_main
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--embeddings', required=True, help='embedding dataset directory (pipelines.embed)')
  p.add_argument('--output_dir', required=True, help='where metrics.json and head.npz go')
  p.add_argument('--train_split', default='train')
  p.add_argument('--eval_split', default='test')
  p.add_argument('--val_fraction', type=float, default=0.1,
                 help='fraction of each train class held out to choose the L2')
  p.add_argument('--l2_grid', default=','.join(map(repr, core.DEFAULT_L2_GRID)),
                 help='L2 strengths on the mean loss; sklearn gets C = 1/(N*l2)')
  p.add_argument('--solver', default='lbfgs', choices=core.SOLVERS)
  p.add_argument('--baselines', default='sklearn', help="comma-separated; '' for none")
  p.add_argument('--seed', type=int, default=0, help='validation split and few-shot draws')
  p.add_argument('--shots', default='', help='few-shot sizes, e.g. 1,5,10')
  p.add_argument('--seeds', type=int, default=3, help='few-shot draws per size')
  p.add_argument('--max_iter', type=int, default=core.MAX_ITER)
  p.add_argument('--tol', type=float, default=core.TOL, help='stop at max |gradient| <= tol')
  a = p.parse_args(argv)
  if a.seeds < 1:
    raise UserError(f'--seeds must be at least 1, got {a.seeds}')
  train_probe(a.embeddings, a.output_dir, train_split=a.train_split, eval_split=a.eval_split,
              val_fraction=a.val_fraction, l2_grid=_floats(a.l2_grid), solver=a.solver,
              baselines=[b.strip() for b in a.baselines.split(',') if b.strip()],
              seed=a.seed, shots=_ints(a.shots), seeds=a.seeds, max_iter=a.max_iter, tol=a.tol)


if __name__ == '__main__':
  main()
