"""Linear probe on an embedding dataset, with the CLIP paper's scikit-learn baseline.

    python -m probe.train --embeddings=DIR --output_dir=OUT [--shots=1,5,10 --seeds=3]

The L2 is chosen on the shared validation split (``clip_transfer.protocol.validation``, the
same examples fine-tune validates on), the eval split is scored once with the
chosen head, and every accuracy carries a bootstrap 95% interval. Few-shot
fits choose their L2 within the shots (true few-shot) unless
``--few_shot_selection=validation``. Writes OUT/metrics.json and OUT/head.npz
(apply it with probe.predict). The logic lives in ``train_probe`` /
``train_probe_arrays``, which tests call; ``main`` only parses and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from typing import Any, Optional, Sequence

import numpy as np

from probe import core
from probe.head import LinearHead
from clip_transfer import flags
from clip_transfer.protocol import metrics as metrics_lib
from clip_transfer import outputs
from clip_transfer.protocol import stats
from clip_transfer.protocol import validation
from clip_transfer.errors import UserError, cli_main

BASELINES = ('sklearn',)
FEW_SHOT_SELECTION = ('within-shots', 'validation')
OWNED_FILES = ('metrics.json', 'metrics.json.tmp', 'head.npz')  # what a probe run writes


@dataclasses.dataclass
class ProbeConfig:
  """Every probe flag, declared once (``python -m probe.train --help`` lists them)."""

  embeddings: str = flags.field(help='embedding dataset directory (pipelines.embed)')
  output_dir: str = flags.field(help='where metrics.json and head.npz go')
  train_split: str = flags.field('train', 'split the head is fit (and validated) on')
  eval_split: str = flags.field('test', 'split scored once, with the chosen head')
  val_fraction: float = flags.val_fraction('the L2')
  seed: int = flags.field(0, 'validation split and few-shot draws')
  l2_grid: tuple[float, ...] = flags.field(core.DEFAULT_L2_GRID,
                                           'L2 strengths on the mean loss; sklearn gets '
                                           'C = 1/(N*l2)')
  solver: str = flags.field('lbfgs', 'the JAX head\'s solver', choices=core.linear.SOLVERS)
  baselines: tuple[str, ...] = flags.field(BASELINES, "comma-separated; '' for none")
  shots: tuple[int, ...] = flags.field((), 'few-shot sizes (examples per class), e.g. 1,5,10')
  seeds: int = flags.field(3, 'few-shot draws per size')
  few_shot_selection: str = flags.field(
      'within-shots', 'how a few-shot fit chooses its L2: within-shots (true few-shot: '
      'cross-validation inside the k shots; k=1 takes the grid\'s largest L2) or validation '
      '(the common protocol: the whole validation split, labels beyond the shots)',
      choices=FEW_SHOT_SELECTION)
  max_iter: int = flags.field(core.linear.MAX_ITER, 'solver iterations, both methods')
  tol: float = flags.field(core.linear.TOL, 'stop at max |gradient| <= tol')
  progress: bool = flags.field(True, 'progress bars on stderr')

  def __post_init__(self):
    """Every flag checked before any data is read."""
    self.l2_grid = tuple(float(v) for v in self.l2_grid)
    if not self.l2_grid or any(not math.isfinite(v) or v <= 0 for v in self.l2_grid):
      raise UserError(f'--l2_grid needs positive numbers, got {list(self.l2_grid)}')
    if self.solver not in core.linear.SOLVERS:
      raise UserError(f'--solver must be one of {", ".join(core.linear.SOLVERS)}, '
                      f'got {self.solver!r}')
    unknown = [b for b in self.baselines if b not in BASELINES]
    if unknown:
      raise UserError(f'unknown baseline {unknown[0]!r}; choose from {", ".join(BASELINES)}')
    flags.check_shared(self)
    bad = [k for k in self.shots if k < 1]
    if bad:
      raise UserError(f'--shots must be positive integers, got {bad[0]}')
    if self.seeds < 1:
      raise UserError(f'--seeds must be at least 1, got {self.seeds}')
    if self.few_shot_selection not in FEW_SHOT_SELECTION:
      raise UserError(f'--few_shot_selection must be one of {", ".join(FEW_SHOT_SELECTION)}')
    if self.max_iter < 1 or not self.tol > 0:
      raise UserError('--max_iter must be >= 1 and --tol > 0')
    if self.train_split == self.eval_split:
      raise UserError(f'--train_split and --eval_split are both {self.train_split!r}; the L2 is '
                      'chosen on part of train, so evaluate on another split')
    if self.output_dir and os.path.isfile(self.output_dir):
      raise UserError(f'--output_dir {self.output_dir} is a file; pass a directory')

  def methods(self) -> list[core.Method]:
    jax_method = core.JaxMethod(solver=self.solver, max_iter=self.max_iter, tol=self.tol)
    return [jax_method] + [core.METHODS[b](max_iter=self.max_iter, tol=self.tol)
                           for b in self.baselines]


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




def _entry(fitted: core.Fitted, y_eval: np.ndarray, class_names: Sequence[str], method,
           trainable_params: int) -> dict:
  m = metrics_lib.classification(fitted.eval_logits, y_eval, class_names)
  return {**m, 'l2': fitted.l2, 'wall_s': fitted.wall_s, 'solver': method.solver,
          'iterations': fitted.n_iter, 'sweep': fitted.sweep,
          'trainable_params': trainable_params,
          'cost': 'the L2 sweep and the chosen head\'s eval (the one-off embedding apart)'}


def _few_shot(method: core.Method, k: int, x_fit, y_fit, x_val, y_val, x_eval, y_eval,
              class_names, config: ProbeConfig) -> dict:
  """k examples per class from the fit part; the L2 chosen within them or on validation."""
  t0 = time.perf_counter()
  runs, correct = [], []
  for s in range(config.seeds):
    idx = core.few_shot_indices(y_fit, k, config.seed * 1000 + s)
    if config.few_shot_selection == 'within-shots':
      l2 = core.cv_select_l2(method, x_fit[idx], y_fit[idx], len(class_names), config.l2_grid)
      fitted = core.select_and_fit(method, x_fit[idx], y_fit[idx], x_val[:0], y_val[:0], x_eval,
                                   len(class_names), [l2])
    else:
      fitted = core.select_and_fit(method, x_fit[idx], y_fit[idx], x_val, y_val, x_eval,
                                   len(class_names), config.l2_grid)
    ok = np.argmax(fitted.eval_logits, axis=1) == y_eval
    correct.append(ok)
    runs.append({'top1': float(ok.mean()), 'l2': fitted.l2, 'num_fit': int(len(idx))})
  mean_correct = np.mean(correct, axis=0)  # per eval example, over the seeds
  top1s = [r['top1'] for r in runs]
  return {'shots': k, 'seeds': config.seeds, 'selection': config.few_shot_selection,
          'top1': float(np.mean(top1s)), 'top1_std': float(np.std(top1s)), 'top5': None,
          **metrics_lib.summarise(mean_correct, y_eval, class_names),
          'l2': [r['l2'] for r in runs], 'runs': runs, 'wall_s': time.perf_counter() - t0,
          'trainable_params': int(x_eval.shape[1] * len(class_names) + len(class_names))}


def _check_shots(shots: Sequence[int], y_fit: np.ndarray, class_names: Sequence[str]) -> None:
  if not shots:
    return
  counts = np.bincount(y_fit, minlength=len(class_names))
  present = counts[counts > 0]
  if max(shots) > present.min():
    c = int(np.flatnonzero(counts == present.min())[0])
    raise UserError(f'--shots {max(shots)}: class {class_names[c]!r} has only {present.min()} '
                    'training examples outside the validation split; use at most that many')


def train_probe_arrays(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray,
                       y_eval: np.ndarray, class_names: Sequence[str],
                       output_dir: Optional[str] = None, *,
                       ids_train: Optional[Sequence[str]] = None,
                       ids_eval: Optional[Sequence[str]] = None,
                       header: Optional[dict] = None, **options) -> dict:
  """The probe protocol on arrays; returns the metrics dict (and writes it when output_dir is set).

  ``options`` are ``ProbeConfig`` fields. Without ids, row numbers stand in.
  """
  config = ProbeConfig(embeddings='', output_dir=output_dir or '', **options)
  class_names = list(class_names)
  num_classes = len(class_names)
  x_train, x_eval = np.asarray(x_train, np.float32), np.asarray(x_eval, np.float32)
  y_train, y_eval = np.asarray(y_train, np.int64), np.asarray(y_eval, np.int64)
  names = (config.train_split, config.eval_split)
  check_splits((x_train, y_train), (x_eval, y_eval), num_classes, names)
  ids_train = [str(i) for i in (ids_train if ids_train is not None else range(len(y_train)))]
  ids_eval = [str(i) for i in (ids_eval if ids_eval is not None else range(len(y_eval)))]
  # Eval examples in id order: every stage's predictions line up for paired comparisons.
  order = validation.eval_order(ids_eval)
  x_eval, y_eval, ids_eval = x_eval[order], y_eval[order], [ids_eval[i] for i in order]
  val = validation.split(ids_train, y_train, config.val_fraction, config.seed)
  if len(val.val) == 0 and (len(config.l2_grid) > 1 or
                            (config.shots and config.few_shot_selection == 'validation')):
    raise UserError(f'no validation examples (--val_fraction={config.val_fraction} of '
                    f'{len(y_train)}) to choose the L2 on; raise --val_fraction or pass a single '
                    '--l2_grid value')
  x_fit, y_fit = x_train[val.fit], y_train[val.fit]
  x_val, y_val = x_train[val.val], y_train[val.val]
  _check_shots(config.shots, y_fit, class_names)
  del x_train  # selection sees x_fit/x_val only

  head_params = int(x_eval.shape[1] * num_classes + num_classes)  # the Dense head, both methods
  out = dict(header or {}) or {'stage': 'probe', 'class_names': class_names,
                               'num_classes': num_classes}
  out.update({'num_train': int(len(y_fit) + len(y_val)), 'num_fit': int(len(y_fit)),
              'num_eval': int(len(y_eval)), 'dim': int(x_eval.shape[1]),
              'validation': val.record, 'final_fit': 'fit',
              'eval': validation.eval_record(ids_eval, y_eval),
              'l2_grid': list(config.l2_grid), 'solver': config.solver,
              'max_iter': config.max_iter, 'tol': config.tol, 'methods': {}})
  heads = {}
  for method in config.methods():
    fitted = core.select_and_fit(method, x_fit, y_fit, x_val, y_val, x_eval, num_classes,
                                 config.l2_grid, progress=config.progress)
    out['methods'][method.name] = _entry(fitted, y_eval, class_names, method, head_params)
    heads[method.name] = fitted
  for k in config.shots:
    for method in config.methods():
      out['methods'][metrics_lib.method_name(method.name, shots=k)] = _few_shot(
          method, k, x_fit, y_fit, x_val, y_val, x_eval, y_eval, class_names, config)
  jax_fit = heads['jax']
  head = LinearHead(kernel=jax_fit.kernel, bias=jax_fit.bias, mean=jax_fit.standardizer.mean,
                    std=jax_fit.standardizer.std, class_names=class_names, l2=jax_fit.l2)
  if output_dir:
    os.makedirs(output_dir, exist_ok=True)
    head.save(output_dir)
    metrics_lib.write(output_dir, out)
  return out


def summary_table(metrics: dict) -> str:
  """A few lines: one per method and few-shot entry (top-1 with its 95% interval)."""
  pct = lambda v: '   -  ' if v is None else f'{100 * v:6.2f}'
  lines = [f'{"method":14s} {"top1":>7s} {"95% interval":>15s} {"bal.acc":>7s} {"l2":>9s} '
           f'{"wall_s":>8s}']
  for key, m in metrics['methods'].items():
    lo, hi = m['top1_ci95']
    l2 = m['l2'] if isinstance(m['l2'], float) else float(np.median(m['l2']))
    lines.append(f'{key:14s} {pct(m["top1"]):>7s} {f"[{pct(lo)}, {pct(hi)}]":>15s} '
                 f'{pct(m["balanced_accuracy"]):>7s} {l2:9.1e} {m["wall_s"]:8.2f}')
  return '\n'.join(lines)


def train_probe(config: ProbeConfig) -> dict:
  """Reads two splits of an embedding dataset and runs the probe protocol on them."""
  from clip_transfer.data import embeddings as emb  # pylint: disable=g-import-not-at-top
  # Refuses a file, a read-only directory or one holding files this tool did not write;
  # a rerun replaces only its own metrics.json and head.npz.
  outputs.prepare_output_dir(config.output_dir, overwrite=True, kind='probe run',
                             owned=OWNED_FILES, clear=False)
  metadata = emb.read_metadata(config.embeddings)
  class_names = emb.class_names(config.embeddings)
  x_train, y_train, ids_train = emb.read_split(config.embeddings, config.train_split)
  x_eval, y_eval, ids_eval = emb.read_split(config.embeddings, config.eval_split)
  # Checked here too, so NaN errors can name the offending example's id.
  check_split(config.train_split, x_train, y_train, len(class_names), ids_train)
  check_split(config.eval_split, x_eval, y_eval, len(class_names), ids_eval)
  src, model = metadata.get('source', {}), metadata.get('model', {})
  header = metrics_lib.header(
      'probe',
      dataset={'spec': src.get('spec'), 'name': src.get('name'), 'version': src.get('version'),
               'train_split': config.train_split, 'eval_split': config.eval_split},
      model={'name': model.get('name'), 'revision': model.get('revision'),
             'weights_sha256': metrics_lib.weights_checksum(model)},
      class_names=class_names, num_train=len(y_train), num_eval=len(y_eval),
      embeddings=config.embeddings, metadata=metadata,
      embedding=emb.read_run_info(config.embeddings))  # the one-off cost, for the report
  options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
             if f.name not in ('embeddings', 'output_dir')}
  return train_probe_arrays(x_train, y_train, x_eval, y_eval, class_names, config.output_dir,
                            ids_train=ids_train, ids_eval=ids_eval, header=header, **options)


@cli_main
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  flags.add_flags(p, ProbeConfig)
  config = flags.from_args(ProbeConfig, p.parse_args(argv))
  metrics = train_probe(config)
  print(summary_table(metrics))
  print(f'metrics: {os.path.join(config.output_dir, "metrics.json")}')


if __name__ == '__main__':
  main()
