"""Finding the runs' metrics.json files, reading them, and refusing what cannot be compared."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from clip_transfer.protocol import metrics as metrics_lib
from clip_transfer.errors import UserError


def _walk_runs(root: str) -> list[str]:
  """metrics.json files at any depth below ``root``; a run's own subfolders are not searched."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))  # scratch, markers
    if 'metrics.json' in filenames:
      found.append(os.path.join(dirpath, 'metrics.json'))
      dirnames[:] = []  # a run's checkpoints are not runs
  return found


def find_metrics(paths: list[str]) -> list[str]:
  """metrics.json files in each path or the folders below it (any depth), each once, in order.

  A run named twice (``runs/demo runs/demo/probe``) is read once.
  """
  found, seen = [], set()
  for p in paths:
    if os.path.isfile(p) and os.path.basename(p) == 'metrics.json':
      below = [p]
    elif os.path.isfile(p):
      raise UserError(f'{p} is a file but not a metrics.json; pass a run directory')
    elif os.path.isdir(p):
      below = _walk_runs(p)
      if not below:
        raise UserError(f'{p} holds no metrics.json (nor does any folder below it)')
    else:
      raise UserError(f'no such run directory: {p}')
    for f in below:
      key = os.path.realpath(f)
      if key not in seen:
        seen.add(key)
        found.append(f)
  return found


def load(path: str) -> dict:
  """metrics_lib.read's checked metrics.json, refused when empty or holding a field of the wrong type."""
  m = metrics_lib.read(path)
  if not m['methods']:
    raise UserError(f'{path} holds no results: its run was interrupted or stopped early '
                    '(fine-tune --stop_after); finish it (fine-tune: --resume) or leave it out')
  problem = _wrong_type(m)
  if problem:
    raise UserError(f'{path}: {problem}; not a metrics.json this tool wrote, or damaged')
  return m


_NUMBER = (int, float)
_num = lambda v: isinstance(v, _NUMBER) and not isinstance(v, bool)
_opt = lambda check: (lambda v: v is None or check(v))
_interval = lambda v: isinstance(v, list) and len(v) == 2 and all(map(_num, v))
_ints = lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool)
                                              for x in v)
_numbers = lambda v: isinstance(v, list) and all(map(_num, v))
_dict = lambda v: isinstance(v, dict)
_str = lambda v: isinstance(v, str)
# What this report reads of a metrics.json, and the type it needs (absent keys are fine).
_TOP = {'stage': (_str, 'a string'), 'dataset': (_opt(_dict), 'an object'),
        'model': (_opt(_dict), 'an object'), 'num_eval': (_opt(_num), 'a number'),
        'num_classes': (_opt(_num), 'a number'), 'validation': (_opt(_dict), 'an object'),
        'eval': (_opt(_dict), 'an object'), 'embedding': (_opt(_dict), 'an object'),
        'data_wall_s': (_opt(_num), 'a number')}
_NESTED = {'eval.labels': (_opt(_ints), 'a list of integers'),
           'model.name': (_opt(_str), 'a string'), 'model.weights_sha256': (_opt(_str), 'a string'),
           'embedding.wall_s': (_opt(_num), 'a number'),
           'embedding.images_per_s': (_opt(_num), 'a number')}
_METHOD = {'top1': (_opt(_num), 'a number'), 'top1_ci95': (_opt(_interval), 'a [low, high] pair'),
           'balanced_accuracy': (_opt(_num), 'a number'),
           'balanced_accuracy_ci95': (_opt(_interval), 'a [low, high] pair'),
           'trainable_params': (_opt(_num), 'a number'), 'wall_s': (_opt(_num), 'a number'),
           'images_per_s': (_opt(_num), 'a number'), 'cost': (_opt(_str), 'a string'),
           'predictions': (_opt(_ints), 'a list of integers'), 'shots': (_num, 'a number'),
           'top1_std': (_opt(_num), 'a number'), 'selected': (_opt(_dict), 'an object'),
           'wise': (_opt(_dict), 'an object')}
_WISE = {'alphas': (_numbers, 'a list of numbers'), 'val_top1': (_numbers, 'a list of numbers'),
         'eval_top1': (_numbers, 'a list of numbers'),
         'selected_alpha': (_opt(_num), 'a number')}


def _wrong_type(m: dict) -> Optional[str]:
  """'KEY is X, not TYPE' for the first field this report reads that has the wrong type."""
  def first(obj, checks, prefix):
    for key, (ok, want) in checks.items():
      if key in obj and not ok(obj[key]):
        return f'{prefix}{key} is {type(obj[key]).__name__} {json.dumps(obj[key])[:40]}, not {want}'
    return None

  problem = first(m, _TOP, '')
  if problem:
    return problem
  for dotted, check in _NESTED.items():
    outer, inner = dotted.split('.')
    problem = first(m.get(outer) or {}, {inner: check}, f'{outer}.')
    if problem:
      return problem
  for name, e in m['methods'].items():
    if not isinstance(e, dict):
      return f'methods.{name} is {type(e).__name__}, not an object'
    problem = (first(e, _METHOD, f'methods.{name}.')
               or first(e.get('wise') or {}, _WISE, f'methods.{name}.wise.'))
    if problem:
      return problem
  return None


def task(m: dict) -> tuple:
  d = m.get('dataset') or {}
  return (d.get('name'), d.get('eval_split'), m.get('num_eval'), m.get('num_classes'))


def _refuse_if_differ(runs: list[tuple[str, dict]], what: str, key, show) -> None:
  """One-line refusal when ``key(metrics)`` differs between runs (None: the run is exempt)."""
  seen: dict[str, tuple[str, Any]] = {}
  for path, m in runs:
    v = key(m)
    if v is not None:
      seen.setdefault(json.dumps(v, sort_keys=True), (path, v))
  if len(seen) > 1:
    desc = '; '.join(f'{p}: {show(v)}' for p, v in seen.values())
    raise UserError(f'runs are not comparable (different {what}): {desc}')


def run_of(files: list[str], paths: list[str]) -> dict[str, str]:
  """Each metrics file → the RUN_DIR argument it belongs to: the most specific one holding it
  (``report.compare runs/demo runs/demo/backbone2`` is two runs, the second inside the first)."""
  roots = [os.path.realpath(p if os.path.isdir(p) else os.path.dirname(p)) for p in paths]
  out = {}
  for f in files:
    real = os.path.realpath(f)
    out[f] = max((r for r in roots if real.startswith(r + os.sep)), key=len, default=real)
  return out


def check_comparable(runs: list[tuple[str, dict]], run_of: Optional[dict] = None) -> None:
  """Refuses runs that do not measure the same task, validation split and eval examples, and
  mixed weights within one run (``run_of``: metrics file → the RUN_DIR it came from; backbones
  may differ between RUN_DIRs)."""
  tasks = {task(m): path for path, m in runs}
  if len(tasks) > 1:
    desc = '; '.join(f'{p}: dataset {t[0]!r}, eval split {t[1]!r}, {t[2]} examples, '
                     f'{t[3]} classes' for t, p in tasks.items())
    raise UserError(f'runs are not comparable (different dataset or eval split): {desc}')
  owner = run_of or {path: None for path, _ in runs}
  for run in dict.fromkeys(owner.values()):
    _refuse_if_differ([(p, m) for p, m in runs if owner.get(p) == run],
                      'model weights within one run',
                      lambda m: metrics_lib.weights_checksum(m.get('model')),
                      lambda v: f'weights sha256 {str(v)[:12]}…')
  # Zero-shot tunes nothing and records no validation split: exempt.
  _refuse_if_differ(runs, 'validation split', lambda m: m.get('validation'),
                    lambda v: json.dumps(v, sort_keys=True))
  _refuse_if_differ(runs, 'eval examples', lambda m: (m.get('eval') or {}).get('ids_sha256'),
                    lambda v: f'eval ids sha256 {str(v)[:12]}…')
  # Same examples but in another order would pair example i of one run with example j of another.
  _refuse_if_differ(runs, 'eval example order (eval.labels)',
                    lambda m: (m.get('eval') or {}).get('labels'),
                    lambda v: f'labels {v[:8]}…')
