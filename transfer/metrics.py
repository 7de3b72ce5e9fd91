"""Classification metrics shared by the probe and fine-tune stages (one metrics.json schema)."""

from __future__ import annotations

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
