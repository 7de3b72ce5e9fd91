"""The ladder's rows from the runs: one per method, the few-shot pairs, paired verdicts."""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

import numpy as np

from clip_transfer.protocol import metrics as metrics_lib
from clip_transfer.protocol import stats
from clip_transfer.errors import UserError


def rung_key(stage: str, name: str, e: dict) -> tuple:
  """Sort key along the ladder: zero-shot, probe, head-only, LP-FT, other fine-tunes, WiSE-FT."""
  method = metrics_lib.parse_method(name)
  if method.wise:
    return (5, 0)
  if stage == 'zeroshot':
    return (0, 0)
  if stage == 'probe':
    return (1, {'jax': 0, 'zeroshot-anchored': 1, 'sklearn': 2}.get(name, 3))
  if stage == 'finetune':
    if method.base == 'linear' or 'l2' in (e.get('selected') or {}):
      return (2, 0)
    return (3, 0) if method.head_init == 'probe' else (4, 0)
  return (6, 0)


def backbone(m: dict) -> str:
  """The model a metrics file was measured on: its name and weights."""
  model = m.get('model') or {}
  sha = model.get('weights_sha256')
  return f'{model.get("name") or "?"}' + (f' ({sha[:8]})' if sha else '')


def row_key(r: dict) -> tuple:
  return (r['backbone'], r['method'])


def rows_from(runs: list[tuple[str, dict]]) -> tuple[list[dict], list[dict]]:
  """(table rows in ladder order, few-shot points) from loaded metrics files."""
  rows, shots = [], []
  for path, m in runs:
    stage = m['stage']
    labels = (m.get('eval') or {}).get('labels')
    embed = m.get('embedding') if stage in ('probe', 'zeroshot') else None
    for name, e in m['methods'].items():
      if 'shots' in e:  # few-shot entries: the method's name with its shots
        base = str(dataclasses.replace(metrics_lib.parse_method(name), shots=None))
        shots.append({'method': base, 'stage': stage, 'source': path,
                      'correct': _few_shot_correct(e, labels), **e, 'backbone': backbone(m),
                      'base_method': base})  # 'method' may gain ' on <backbone>' below
        continue
      correct = None
      if labels is not None and e.get('predictions') is not None:
        if len(e['predictions']) != len(labels):
          raise UserError(f'{path}: methods.{name}.predictions has {len(e["predictions"])} '
                          f'entries but eval.labels has {len(labels)}')
        correct = np.asarray(e['predictions']) == np.asarray(labels)
      # A refit on fit+validation is another model than the fit-only one: said in its name.
      refit = ' [fit+validation]' if e.get('final_fit') == 'fit+validation' else ''
      rows.append({
          'method': f'{stage}:{name}{refit}', 'stage': stage, 'name': name, 'source': path,
          'top1': e.get('top1'), 'top1_ci95': e.get('top1_ci95'),
          'balanced_accuracy': e.get('balanced_accuracy'),
          'balanced_accuracy_ci95': e.get('balanced_accuracy_ci95'),
          'trainable_params': e.get('trainable_params'), 'wall_s': e.get('wall_s'),
          'images_per_s': e.get('images_per_s'), 'cost': e.get('cost'),
          'embed_s': (embed or {}).get('wall_s'), 'correct': correct, 'backbone': backbone(m),
          'labels': None if labels is None else np.asarray(labels),
          'rung': rung_key(stage, name, e)})
      rows[-1]['ci'] = _intervals(rows[-1])
  rows.sort(key=lambda r: r['rung'])  # stable: file order within a rung
  if len({r['backbone'] for r in rows + shots}) > 1:  # backbones side by side: name each curve's
    for s in shots:
      s['method'] = f"{s['method']} on {s['backbone']}"
  return rows, shots


def _few_shot_correct(e: dict, labels) -> Optional[np.ndarray]:
  """Per eval example, the fraction of seeds that got it right (None: predictions not recorded)."""
  runs = e.get('runs') or []
  if labels is None or not runs or any(r.get('predictions') is None for r in runs):
    return None
  return np.mean([np.asarray(r['predictions']) == np.asarray(labels) for r in runs], axis=0)


def _draws(s: dict) -> Optional[list]:
  return [r.get('draw_sha256') for r in s.get('runs') or []] or None


def few_shot_pairs(shots: list[dict], rows: list[dict]) -> list[dict]:
  """Per few-shot entry: paired Δ against zero-shot and against the plain probe on the same draws."""
  # Each curve against its own backbone's zero-shot and plain probe, never another backbone's.
  zs = {}
  for r in rows:
    if r['stage'] == 'zeroshot' and r['correct'] is not None:
      zs.setdefault(r['backbone'], r)
  plain = {(s['backbone'], s['shots'], s.get('selection'), json.dumps(_draws(s))): s
           for s in shots if s['stage'] == 'probe' and s.get('base_method') == 'jax'
           and s['correct'] is not None}
  out = []
  for s in shots:
    vs_zs = vs_plain = None
    if s['correct'] is not None:
      z = zs.get(s['backbone'])
      if z is not None and len(z['correct']) == len(s['correct']):
        vs_zs = stats.paired_difference(s['correct'], z['correct'])
      ref = plain.get((s['backbone'], s['shots'], s.get('selection'), json.dumps(_draws(s))))
      if ref is s:
        vs_plain = 'reference'
      elif ref is not None and _draws(s) and None not in _draws(s):  # same ids drawn, seed by seed
        vs_plain = stats.paired_difference(s['correct'], ref['correct'])
    out.append({'vs_zeroshot': vs_zs, 'vs_plain': vs_plain})
  return out


def reference(rows: list[dict]) -> Optional[dict]:
  """The best probe row (highest top-1), the one every row is paired against."""
  probes = [r for r in rows if r['stage'] == 'probe' and r['top1'] is not None]
  return max(probes, key=lambda r: r['top1']) if probes else None


def paired(rows: list[dict], ref: Optional[dict]) -> tuple[dict, Optional[str]]:
  """{method: paired_difference against ref} for rows with predictions, and a note on what is missing."""
  if ref is None:
    return {}, 'No paired comparison: no probe row to compare against.'
  if ref['correct'] is None:
    return {}, (f'No paired comparison: {ref["method"]} ({ref["source"]}) has no per-example '
                'predictions (a metrics.json from before they were recorded); rerun it.')
  out = {}
  for r in rows:
    if r is not ref and r['correct'] is not None:
      out[row_key(r)] = stats.paired_difference(r['correct'], ref['correct'])
  missing = [r['method'] for r in rows if r is not ref and r['correct'] is None]
  note = (f'No paired comparison for {", ".join(missing)}: no per-example predictions in '
          'its metrics.json (written before they were recorded).') if missing else None
  return out, note


def _intervals(r: dict) -> dict:
  """The row's intervals: from the file, else from its predictions (files that lack them)."""
  out = {'top1': r['top1_ci95'], 'balanced_accuracy': r['balanced_accuracy_ci95']}
  if r['correct'] is not None and r['labels'] is not None:
    if out['top1'] is None:
      out['top1'] = stats.top1_ci(r['correct'])
    if out['balanced_accuracy'] is None:
      out['balanced_accuracy'] = stats.balanced_ci(r['correct'], r['labels'])
  return out
