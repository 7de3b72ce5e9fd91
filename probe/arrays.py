"""The probe protocol on arrays: validation split, the L2 sweep per method, few-shot draws, metrics.

``train_probe_arrays`` is what ``probe.train`` runs on one process (and what tests call);
``entry``, ``run_record`` and ``metrics_header`` build metrics.json's parts for every path.
"""

from __future__ import annotations

import math
import os
import time
from typing import Optional, Sequence

import numpy as np

from probe import core
from probe.config import ProbeConfig, check_shots, check_splits
from probe.head import LinearHead
from clip_transfer.errors import UserError
from clip_transfer.protocol import heads as heads_lib
from clip_transfer.protocol import metrics as metrics_lib
from clip_transfer.protocol import validation


def json_l2(l2: float):
  """An L2 as metrics.json holds it: inf (the anchored head at zero-shot) as the string 'inf'."""
  return float(l2) if math.isfinite(l2) else 'inf'


def entry(fitted: core.Fitted, y_eval: np.ndarray, class_names: Sequence[str], method,
           trainable_params: int) -> dict:
  m = metrics_lib.classification(fitted.eval_logits, y_eval, class_names)
  refit = ' and its refit on fit+validation' if fitted.final_fit == 'fit+validation' else ''
  return {**m, 'l2': json_l2(fitted.l2), 'wall_s': fitted.wall_s, 'solver': method.solver,
          'iterations': fitted.n_iter, 'sweep': fitted.sweep, 'final_fit': fitted.final_fit,
          'trainable_params': trainable_params,
          'cost': f'the L2 sweep{refit} and the chosen head\'s eval (the one-off embedding '
                  'apart)'}


def few_shot(method: core.Method, k: int, x_fit, y_fit, ids_fit, x_val, y_val, x_eval, y_eval,
              class_names, config: ProbeConfig) -> dict:
  """k examples per class from the fit part, drawn by id; the L2 chosen within them or on
  validation."""
  t0 = time.perf_counter()
  runs, correct = [], []
  for s in range(config.seeds):
    idx = validation.few_shot(ids_fit, y_fit, k, config.seed * 1000 + s)
    if config.few_shot_selection == 'within-shots':
      l2 = core.cv_select_l2(method, x_fit[idx], y_fit[idx], len(class_names), config.l2_grid)
      fitted = core.select_and_fit(method, x_fit[idx], y_fit[idx], x_val[:0], y_val[:0], x_eval,
                                   len(class_names), [l2])
    else:
      fitted = core.select_and_fit(method, x_fit[idx], y_fit[idx], x_val, y_val, x_eval,
                                   len(class_names), config.l2_grid)
    pred = np.argmax(fitted.eval_logits, axis=1)
    ok = pred == y_eval
    correct.append(ok)
    # The draw's ids and predictions let the report pair methods seed by seed.
    runs.append({'top1': float(ok.mean()), 'l2': json_l2(fitted.l2), 'num_fit': int(len(idx)),
                 'draw_sha256': validation.ids_sha256([ids_fit[i] for i in idx]),
                 'predictions': pred.astype(int).tolist()})
  mean_correct = np.mean(correct, axis=0)  # per eval example, over the seeds
  top1s = [r['top1'] for r in runs]
  return {'shots': k, 'seeds': config.seeds, 'selection': config.few_shot_selection,
          'top1': float(np.mean(top1s)), 'top1_std': float(np.std(top1s)), 'top5': None,
          **metrics_lib.summarise(mean_correct, y_eval, class_names),
          'l2': [r['l2'] for r in runs], 'runs': runs, 'wall_s': time.perf_counter() - t0,
          'trainable_params': int(x_eval.shape[1] * len(class_names) + len(class_names))}


def run_record(config: ProbeConfig, val: validation.Holdout, ids_eval, y_eval, dim: int) -> dict:
  """metrics.json's description of the run (before its methods)."""
  anchored = config.method == 'zeroshot-anchored'
  return {'num_train': int(len(val.fit) + len(val.val)), 'num_fit': int(len(val.fit)),
          'num_eval': int(len(y_eval)), 'dim': int(dim), 'validation': val.record,
          'final_fit': config.final_fit, 'eval': validation.eval_record(ids_eval, y_eval),
          'method': config.method,
          'feature': 'projected (L2-normalised)' if anchored else 'embedding (standardised)',
          'l2_grid': [json_l2(v) for v in config.l2_grid], 'solver': config.solver,
          'max_iter': config.max_iter, 'tol': config.tol, 'methods': {}}


def metrics_header(config: ProbeConfig, metadata: dict, class_names, num_train: int,
                   num_eval: int, zeroshot_record: Optional[dict] = None) -> dict:
  from clip_transfer.data import embeddings as emb  # pylint: disable=g-import-not-at-top
  src, model = metadata.get('source', {}), metadata.get('model', {})
  return metrics_lib.header(
      'probe',
      dataset={'spec': src.get('spec'), 'name': src.get('name'), 'version': src.get('version'),
               'train_split': config.train_split, 'eval_split': config.eval_split},
      model={'name': model.get('name'), 'revision': model.get('revision'),
             'weights_sha256': metrics_lib.weights_checksum(model)},
      class_names=class_names, num_train=num_train, num_eval=num_eval,
      embeddings=config.embeddings, metadata=metadata,
      embedding=emb.read_run_info(config.embeddings),  # the one-off cost, for the report
      **({'zeroshot': zeroshot_record} if zeroshot_record else {}))


def train_probe_arrays(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray,
                       y_eval: np.ndarray, class_names: Sequence[str],
                       output_dir: Optional[str] = None, *,
                       ids_train: Optional[Sequence[str]] = None,
                       ids_eval: Optional[Sequence[str]] = None,
                       header: Optional[dict] = None,
                       zeroshot_head: Optional[heads_lib.ZeroshotHead] = None,
                       **options) -> dict:
  """The probe protocol on arrays; returns the metrics dict (and writes it when output_dir is set).

  ``options`` are ``ProbeConfig`` fields. Without ids, row numbers stand in.
  ``method='zeroshot-anchored'`` takes projected features (normalised here)
  and the ``zeroshot_head`` they are anchored at.
  """
  config = ProbeConfig(embeddings='', output_dir=output_dir or '', **options)
  anchored = config.method == 'zeroshot-anchored'
  if anchored:
    if zeroshot_head is None:
      raise UserError('--method=zeroshot-anchored needs --zeroshot=DIR (a probe.zeroshot run)')
    shape = np.shape(zeroshot_head.head)
    if shape != (len(class_names), np.shape(x_train)[1]):
      raise UserError(f'the zero-shot head is {shape[1]}-d for {shape[0]} classes; the '
                      f'projected features are {np.shape(x_train)[1]}-d for {len(class_names)} '
                      'classes')
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
  ids_fit = [ids_train[i] for i in val.fit]
  x_val, y_val = x_train[val.val], y_train[val.val]
  check_shots(config.shots, y_fit, class_names)
  del x_train  # selection sees x_fit/x_val only

  head_params = int(x_eval.shape[1] * num_classes + num_classes)  # the Dense head, both methods
  out = dict(header or {}) or {'stage': 'probe', 'class_names': class_names,
                               'num_classes': num_classes}
  out.update(run_record(config, val, ids_eval, y_eval, x_eval.shape[1]))
  fit_methods = config.methods(zeroshot_head)
  fits = [core.select_and_fit(method, x_fit, y_fit, x_val, y_val, x_eval, num_classes,
                              config.l2_grid, progress=config.progress,
                              final_fit=config.final_fit) for method in fit_methods]
  out['final_fit'] = fits[0].final_fit  # 'fit' when nothing was held out to add
  for method, fitted in zip(fit_methods, fits):
    out['methods'][method.name] = entry(fitted, y_eval, class_names, method, head_params)
  for k in config.shots:
    for method in fit_methods:
      out['methods'][metrics_lib.method_name(method.name, shots=k)] = few_shot(
          method, k, x_fit, y_fit, ids_fit, x_val, y_val, x_eval, y_eval, class_names, config)
  jax_fit = fits[0]  # the JAX head (config.methods() puts it first) is the one saved
  head = LinearHead(kernel=jax_fit.kernel, bias=jax_fit.bias, mean=jax_fit.standardizer.mean,
                    std=jax_fit.standardizer.std, class_names=class_names, l2=jax_fit.l2,
                    feature='projected' if anchored else 'embedding')
  if output_dir:
    os.makedirs(output_dir, exist_ok=True)
    head.save(output_dir)
    metrics_lib.write(output_dir, out)
  return out
