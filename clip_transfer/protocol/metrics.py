"""metrics.json for every stage: the shared header, the classification metrics, the writer."""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from clip_transfer.protocol import stats
from clip_transfer.errors import UserError


def classification(logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict:
  """top1, top5 (None under 5 classes), balanced and per-class accuracy, bootstrap intervals, predictions.

  ``predictions`` (argmax per eval example, in the order given) lets the report
  pair two methods on the same examples.
  """
  logits = np.asarray(logits, np.float32)
  labels = np.asarray(labels)
  if not np.isfinite(logits).all():
    raise UserError('the model produced NaN or inf logits; lower the learning rate, or check '
                    'the inputs')
  pred = logits.argmax(-1)
  correct = pred == labels
  top5: Optional[float] = None
  if len(class_names) >= 5:
    top = np.argpartition(-logits, 4, axis=-1)[:, :5]
    top5 = float((top == labels[:, None]).any(-1).mean())
  return {'top1': float(correct.mean()), 'top5': top5,
          **summarise(correct, labels, class_names),
          'predictions': pred.astype(int).tolist()}


def summarise(correct: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict:
  """Balanced and per-class accuracy plus 95% bootstrap intervals from per-example correctness."""
  correct = np.asarray(correct, np.float64)
  per_class = {}
  for c, name in enumerate(class_names):
    sel = labels == c
    per_class[name] = float(correct[sel].mean()) if sel.any() else None
  present = [v for v in per_class.values() if v is not None]
  return {
      # Mean recall over the classes present in the eval split (scikit-learn's definition).
      'balanced_accuracy': float(np.mean(present)) if present else None,
      **stats.intervals(correct, labels),
      'per_class': per_class,
  }


def header(stage: str, *, dataset: dict, model: dict, class_names: Sequence[str],
           num_train: int, num_eval: int, **extra) -> dict:
  """The part of metrics.json every stage shares, so ``report.compare`` can line runs up.

  ``dataset``: spec, name, version, train_split, eval_split. ``model``: name,
  revision and ``weights_sha256`` (the params checksum), plus anything else the
  stage records about it.
  """
  for key in ('spec', 'name', 'version', 'train_split', 'eval_split'):
    if key not in dataset:
      raise ValueError(f'metrics header: dataset lacks {key!r}')
  for key in ('name', 'weights_sha256'):
    if key not in model:
      raise ValueError(f'metrics header: model lacks {key!r}')
  return {'stage': stage, 'dataset': dict(dataset), 'model': dict(model),
          'num_classes': len(class_names), 'class_names': list(class_names),
          'num_train': int(num_train), 'num_eval': int(num_eval), **extra, 'methods': {}}


def write(output_dir: str, metrics: dict) -> str:
  """Writes ``output_dir/metrics.json`` atomically (readers never see half a file)."""
  path = os.path.join(output_dir, 'metrics.json')
  tmp = path + '.tmp'
  try:
    text = json.dumps(metrics, indent=1, allow_nan=False)
  except ValueError:
    raise UserError(f'refusing to write {path}: a metric is NaN or inf') from None
  with open(tmp, 'w') as fh:
    fh.write(text)
  os.replace(tmp, path)
  return path
