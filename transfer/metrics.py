"""metrics.json for every stage: the shared header, the classification metrics, the writer."""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np


def classification(logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict:
  """top1, top5 (None under 5 classes), balanced accuracy, per-class accuracy (None if absent)."""
  logits = np.asarray(logits, np.float32)
  labels = np.asarray(labels)
  pred = logits.argmax(-1)
  correct = pred == labels
  top5: Optional[float] = None
  if len(class_names) >= 5:
    top = np.argpartition(-logits, 4, axis=-1)[:, :5]
    top5 = float((top == labels[:, None]).any(-1).mean())
  per_class = {}
  for c, name in enumerate(class_names):
    sel = labels == c
    per_class[name] = float(correct[sel].mean()) if sel.any() else None
  present = [v for v in per_class.values() if v is not None]
  return {
      'top1': float(correct.mean()),
      'top5': top5,
      # Mean recall over the classes present in the eval split (scikit-learn's definition).
      'balanced_accuracy': float(np.mean(present)) if present else None,
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
  with open(tmp, 'w') as fh:
    json.dump(metrics, fh, indent=1)
  os.replace(tmp, path)
  return path
