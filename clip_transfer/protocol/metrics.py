"""metrics.json for every stage: the shared header, the classification metrics, method names, the writer and the reader."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Optional, Sequence

import numpy as np

from clip_transfer.protocol import stats
from clip_transfer import errors
from clip_transfer.errors import UserError

# The one name of the weights checksum in every file the project writes (metrics.json's and the
# embedding dataset's 'model'); files from before it was the one name say 'params_sha256'.
WEIGHTS_CHECKSUM = 'weights_sha256'


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
  revision and ``weights_sha256`` (WEIGHTS_CHECKSUM), plus anything else the
  stage records about it.
  """
  for key in ('spec', 'name', 'version', 'train_split', 'eval_split'):
    if key not in dataset:
      raise ValueError(f'metrics header: dataset lacks {key!r}')
  for key in ('name', WEIGHTS_CHECKSUM):
    if key not in model:
      raise ValueError(f'metrics header: model lacks {key!r}')
  return {'stage': stage, 'dataset': dict(dataset), 'model': dict(model),
          'num_classes': len(class_names), 'class_names': list(class_names),
          'num_train': int(num_train), 'num_eval': int(num_eval), **extra, 'methods': {}}


def write(output_dir: str, metrics: dict) -> str:
  """Writes ``output_dir/metrics.json`` atomically (readers never see half a file).

  Every stage's metrics.json is what marks its output finished: after a Ctrl-C that a
  library swallowed, the run stops here (KeyboardInterrupt) rather than write it.
  """
  errors.check_interrupted()
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


# --------------------------------------------------------------------------
# Method names: '<base>[@<head init>][+wise][_<k>shot]', built and parsed here only
# --------------------------------------------------------------------------

_SHOTS = re.compile(r'^(?P<rest>.+)_(?P<k>[0-9]+)shot$')


@dataclasses.dataclass(frozen=True)
class MethodName:
  """A metrics.json method key, in parts: what was trained and how."""

  base: str  # the probe's solver ('jax', 'sklearn'), 'zeroshot', or a fine-tune mode ('last:2')
  head_init: Optional[str] = None  # fine-tune: where the head started ('probe', 'zeroshot')
  wise: bool = False  # WiSE-FT: the fine-tuned weights mixed with the start
  shots: Optional[int] = None  # few-shot: examples per class

  def __str__(self) -> str:
    name = self.base
    if self.head_init:
      name += f'@{self.head_init}'
    if self.wise:
      name += '+wise'
    if self.shots is not None:
      name += f'_{self.shots}shot'
    return name


def method_name(base: str, **parts) -> str:
  """The metrics.json key of a method (see MethodName)."""
  return str(MethodName(base, **parts))


def parse_method(name: str) -> MethodName:
  """The parts of a metrics.json method key (inverse of ``method_name``)."""
  shots = None
  m = _SHOTS.match(name)
  if m:
    name, shots = m['rest'], int(m['k'])
  wise = name.endswith('+wise')
  name = name.removesuffix('+wise')
  base, _, init = name.partition('@')
  return MethodName(base, init or None, wise, shots)


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def weights_checksum(model: Optional[dict]) -> Optional[str]:
  """The weights checksum a 'model' record holds, under its name or the old ``params_sha256``."""
  model = model or {}
  return model.get(WEIGHTS_CHECKSUM) or model.get('params_sha256')


def _non_finite(obj, where: str = '') -> Optional[str]:
  """The key path of the first NaN or inf number in ``obj`` (json.load accepts both), or None."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return where or '(top level)'
  if isinstance(obj, dict):
    items = obj.items()
  elif isinstance(obj, list):
    items = enumerate(obj)
  else:
    return None
  for k, v in items:
    found = _non_finite(v, f'{where}[{k}]' if isinstance(k, int) else f'{where}.{k}'.lstrip('.'))
    if found:
      return found
  return None


def read(path: str) -> dict:
  """A stage's metrics.json (the file or its directory), checked; UserError (one line) otherwise.

  Checked: a JSON object with a ``stage`` and a ``methods`` object, no NaN or
  inf anywhere. Files written before ``weights_sha256`` was the one name read
  the same (``weights_checksum``).
  """
  if os.path.isdir(path):
    path = os.path.join(path, 'metrics.json')
  try:
    with open(path) as fh:
      m = json.load(fh)
  except FileNotFoundError:
    raise UserError(f'{path}: no such file') from None
  except (OSError, ValueError, UnicodeDecodeError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f'{path}: not readable JSON ({reason})') from None
  if not isinstance(m, dict) or not isinstance(m.get('methods'), dict) or 'stage' not in m:
    raise UserError(f'{path}: not a probe/fine-tune metrics.json (no "stage" and "methods")')
  bad = _non_finite(m)
  if bad:
    raise UserError(f'{path}: {bad} is NaN or inf; the run that wrote it diverged or is broken, '
                    'rerun it')
  return m
