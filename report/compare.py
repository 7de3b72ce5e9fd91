"""The transfer ladder in one table (report.md) and one plot (report.png), from metrics.json files.

    python -m report.compare RUN_DIR [RUN_DIR …] [--output_dir DIR]

Each RUN_DIR is a zero-shot or probe output dir or a fine-tune workdir (anything
holding a ``metrics.json``), or a directory whose subdirectories hold them (the
demo's run directory). Rows run up the ladder: zero-shot, probe (plain, then
anchored at zero-shot), head-only fine-tune, LP-FT, fine-tune, WiSE-FT. Each
carries its 95% interval and a paired comparison with the best probe on the
same eval examples. The few-shot table and curve put every method's k-shot
mean ± std beside zero-shot (0 shots), paired against zero-shot and against
the plain probe on the same draws.

Runs are refused (one line, exit 2) when they differ in dataset, eval split, eval
examples or validation split, when one RUN_DIR mixes model weights, or when a
file holds NaN or inf. RUN_DIRs on different backbones (same task, same eval and
validation ids) share one table with a backbone column, every row paired with
the best probe of any backbone.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import sys
from typing import Any, Optional

import numpy as np

from clip_transfer import outputs
from clip_transfer.protocol import metrics as metrics_lib
from clip_transfer.protocol import stats
from clip_transfer.errors import UserError, cli_main

SELECTION = {'within-shots': 'true few-shot (L2 chosen within the shots)',
             'validation': 'L2 chosen on the validation split'}
# Said of a method whose entry has no "cost" text (files written before it was recorded).
NO_COST = 'not described in its metrics.json'


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


def _load(path: str) -> dict:
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


def _task(m: dict) -> tuple:
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
  tasks = {_task(m): path for path, m in runs}
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


def _rung(stage: str, name: str, e: dict) -> tuple:
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


def _key(r: dict) -> tuple:
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
                      'correct': _few_shot_correct(e, labels), **e, 'backbone': backbone(m)})
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
          'rung': _rung(stage, name, e)})
      rows[-1]['ci'] = _intervals(rows[-1])
  rows.sort(key=lambda r: r['rung'])  # stable: file order within a rung
  if len({s['backbone'] for s in shots}) > 1:  # backbones side by side: name each curve's
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
  zs = next((r for r in rows if r['stage'] == 'zeroshot' and r['correct'] is not None), None)
  plain = {(s['shots'], s.get('selection'), json.dumps(_draws(s))): s for s in shots
           if s['stage'] == 'probe' and s['method'] == 'jax' and s['correct'] is not None}
  out = []
  for s in shots:
    vs_zs = vs_plain = None
    if s['correct'] is not None:
      if zs is not None and len(zs['correct']) == len(s['correct']):
        vs_zs = stats.paired_difference(s['correct'], zs['correct'])
      ref = plain.get((s['shots'], s.get('selection'), json.dumps(_draws(s))))
      if ref is s:
        vs_plain = 'reference'
      elif ref is not None and _draws(s) and None not in _draws(s):  # same ids drawn, seed by seed
        vs_plain = stats.paired_difference(s['correct'], ref['correct'])
    out.append({'vs_zeroshot': vs_zs, 'vs_plain': vs_plain})
  return out


def _delta(d) -> str:
  if d is None:
    return '—'
  if d == 'reference':
    return '(reference)'
  return (f'{d["diff"]:+.4f} [{d["ci95"][0]:+.3f}, {d["ci95"][1]:+.3f}] '
          f'{stats.verdict(d)}')


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
      out[_key(r)] = stats.paired_difference(r['correct'], ref['correct'])
  missing = [r['method'] for r in rows if r is not ref and r['correct'] is None]
  note = (f'No paired comparison for {", ".join(missing)}: no per-example predictions in '
          'its metrics.json (written before they were recorded).') if missing else None
  return out, note


def _fmt(v, spec):
  return '—' if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _with_ci(v, ci, spec='.4f') -> str:
  if v is None:
    return '—'
  return f'{v:{spec}} [{ci[0]:.3f}, {ci[1]:.3f}]' if ci else f'{v:{spec}}'


def _p(p: float) -> str:
  return f'{p:.3f}' if p >= 0.001 else f'{p:.1e}'


def _intervals(r: dict) -> dict:
  """The row's intervals: from the file, else from its predictions (files that lack them)."""
  out = {'top1': r['top1_ci95'], 'balanced_accuracy': r['balanced_accuracy_ci95']}
  if r['correct'] is not None and r['labels'] is not None:
    if out['top1'] is None:
      out['top1'] = stats.top1_ci(r['correct'])
    if out['balanced_accuracy'] is None:
      out['balanced_accuracy'] = stats.balanced_ci(r['correct'], r['labels'])
  return out


def cost_lines(runs: list[tuple[str, dict]], rows: list[dict]) -> list[str]:
  """One line per stage saying what its wall times cover."""
  lines = []
  for stage in ('zeroshot', 'probe', 'finetune'):
    stage_rows = [r for r in rows if r['stage'] == stage]
    if not stage_rows:
      continue
    costs = {}
    for r in stage_rows:
      costs.setdefault(r['cost'] or NO_COST, []).append(r['name'])
    said = '; '.join(f'{", ".join(names)}: {text}' for text, names in costs.items())
    if stage == 'finetune':
      data = [m.get('data_wall_s') for _, m in runs if m['stage'] == stage]
      data_s = ', '.join(_fmt(d, '.1f') for d in data)
      lines.append(f'- **fine-tune** wall s ({said}) includes its own data preparation '
                   f'(decode/resize: {data_s} s); the same number appears in both wall columns.')
    else:
      embeds = [m.get('embedding') for _, m in runs if m['stage'] == stage]
      embed = next((e for e in embeds if e), None)
      label = 'zero-shot' if stage == 'zeroshot' else stage
      if embed:
        extra = (f'"incl. embedding" adds the one-off embedding ({_fmt(embed.get("wall_s"), ".1f")}'
                 f' s for {embed.get("num_images", "?")} images, '
                 f'{_fmt(embed.get("images_per_s"), ".1f")} images/s).')
      else:
        extra = 'the embedding cost was not recorded, so "incl. embedding" shows the stage alone.'
      lines.append(f'- **{label}** wall s ({said}) excludes embedding; {extra}')
  return lines


def markdown(runs: list[tuple[str, dict]], rows: list[dict], shots: list[dict]) -> str:
  """The report (ladder table, what the times cover, few-shot table) as Markdown."""
  first = runs[0][1]
  name, split, n_eval, n_classes = _task(first)
  lines = [f'# Transfer ladder: {name}, eval split {split!r} '
           f'({n_eval} examples, {n_classes} classes)', '']
  models = {}
  for _, m in runs:
    model = m.get('model') or {}
    if model.get('name'):
      sha = metrics_lib.weights_checksum(model)
      models[model['name']] = f'`{model["name"]}`' + (f' (weights sha256 {sha[:12]}…)' if sha
                                                          else '')
  if models:
    lines += ['Model: ' + ', '.join(models[k] for k in sorted(models)), '']
  val = next((m['validation'] for _, m in runs if m.get('validation')), None)
  if val:
    fits = sorted({str(m['final_fit']) for _, m in runs if m.get('final_fit')})
    lines += [f'Validation split (every hyperparameter chosen on it): fraction '
              f'{val.get("fraction")}, seed {val.get("seed")}, {val.get("num_examples")} examples, '
              f'ids sha256 {str(val.get("ids_sha256"))[:12]}…'
              + (f'; final models trained on `{", ".join(fits)}`.' if fits else '.'), '']

  ref = reference(rows)
  pairs, note = paired(rows, ref)
  show_pairs = ref is not None and ref['correct'] is not None
  several = len({r['backbone'] for r in rows}) > 1  # backbones side by side
  ref_name = f'{ref["method"]} on {ref["backbone"]}' if ref is not None and several else (
      ref and ref['method'])
  head = ['method'] + (['backbone'] if several else []) + ['top-1 [95% CI]',
                                                          'balanced acc. [95% CI]']
  if show_pairs:
    head += [f'Δ top-1 vs {ref_name} [95% CI]', 'McNemar p', 'verdict']
  head += ['trainable params', 'wall s', 'wall s incl. embedding', 'images/s']
  align = ['---' if h in ('method', 'backbone', 'verdict') else '---:' for h in head]
  lines += ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(align) + '|']
  for r in rows:
    ci = r['ci']
    cells = [r['method']] + ([f'`{r["backbone"]}`'] if several else []) + [
        _with_ci(r['top1'], ci['top1']), _with_ci(r['balanced_accuracy'], ci['balanced_accuracy'])]
    if show_pairs:
      d = pairs.get(_key(r))
      if r is ref:
        cells += ['(reference)', '—', '—']
      elif d is None:
        cells += ['—', '—', '—']
      else:
        cells += [f'{d["diff"]:+.4f} [{d["ci95"][0]:+.3f}, {d["ci95"][1]:+.3f}]',
                  _p(d['mcnemar_p']), stats.verdict(d)]
    total = r['wall_s']
    if r['stage'] in ('probe', 'zeroshot') and r['embed_s'] is not None and total is not None:
      total = total + r['embed_s']
    cells += [_fmt(r['trainable_params'], ','), _fmt(r['wall_s'], '.2f'), _fmt(total, '.2f'),
              _fmt(r['images_per_s'], '.1f')]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines.append('')
  if show_pairs:
    lines += [f'Δ: top-1 of the row minus {ref_name} on the same eval examples, with its '
              'paired-bootstrap 95% interval; McNemar: exact test on the examples where the two '
              'disagree. Verdict "better"/"worse" when p < 0.05 and the interval excludes 0.', '']
  if note:
    lines += [note, '']
  for _, m in runs:
    for name, e in m['methods'].items():
      w = e.get('wise')
      if w and w.get('selected_alpha') in w.get('alphas', []):
        i = w['alphas'].index(w['selected_alpha'])
        lines += [f'WiSE-FT {m["stage"]}:{name}: α = {w["selected_alpha"]:g} chosen on validation '
                  f'(validation top-1 {w["val_top1"][i]:.4f}) among α ∈ '
                  f'{{{", ".join(f"{a:g}" for a in w["alphas"])}}}; its row is '
                  f'{m["stage"]}:{name}+wise.', '']
  lines += ['What the times cover:', ''] + cost_lines(runs, rows)
  if shots:
    pairs = few_shot_pairs(shots, rows)
    # Files from before per-seed predictions were recorded pair with nothing: no Δ columns.
    paired_any = any(d['vs_zeroshot'] or d['vs_plain'] for d in pairs)
    extra = (' Δ top-1 vs zero-shot [95% CI], verdict | Δ top-1 vs probe:jax, same draws |'
             if paired_any else '')
    lines += ['', '## Few-shot (mean ± std over seeds)', '',
              '| method | shots | seeds | selection | top-1 | top-1 95% CI | balanced acc. |'
              + extra, '|---|---:|---:|---|---:|---:|---:|' + ('---:|---:|' if paired_any else '')]
    for r in rows:  # zero labels: the line every few-shot method should stay above
      if r['stage'] == 'zeroshot':
        ci = r['ci']['top1']
        lines.append(f"| {r['method']} | 0 | — | no labels | {_fmt(r['top1'], '.4f')} | "
                     f"{f'[{ci[0]:.3f}, {ci[1]:.3f}]' if ci else '—'} | "
                     f"{_fmt(r['balanced_accuracy'], '.4f')} |" + (' — | — |' if paired_any else ''))
    order = sorted(range(len(shots)), key=lambda i: (
        shots[i]['stage'], _rung(shots[i]['stage'], shots[i]['method'], {}),
        shots[i]['method'], shots[i].get('selection') or '', shots[i]['shots']))
    for i in order:
      s, d = shots[i], pairs[i]
      ci = s.get('top1_ci95')
      lines.append(f"| {s['stage']}:{s['method']} | {s['shots']} | {s.get('seeds', '—')} | "
                   f"{SELECTION.get(s.get('selection'), 'not recorded')} | "
                   f"{_fmt(s.get('top1'), '.4f')} ± {_fmt(s.get('top1_std'), '.4f')} | "
                   f"{f'[{ci[0]:.3f}, {ci[1]:.3f}]' if ci else '—'} | "
                   f"{_fmt(s.get('balanced_accuracy'), '.4f')} |"
                   + (f" {_delta(d['vs_zeroshot'])} | {_delta(d['vs_plain'])} |"
                      if paired_any else ''))
    if paired_any:
      lines += ['', 'Few-shot Δ: per eval example, the fraction of seeds right, minus the other '
                'method\'s; paired bootstrap interval and a sign test on the examples where they '
                'differ (McNemar\'s with one seed). Against the plain probe only when both drew '
                'the same examples seed by seed (draws are by example id).']
  return '\n'.join(lines) + '\n'


def _yerr(points: list[tuple[float, Optional[list]]]) -> np.ndarray:
  """Asymmetric error bars (2, N) from (value, [lo, hi]) pairs; 0 where no interval."""
  return np.array([[max(v - ci[0], 0.0), max(ci[1] - v, 0.0)] if ci else [0.0, 0.0]
                   for v, ci in points]).T.reshape(2, -1)


def plot(runs: list[tuple[str, dict]], rows: list[dict], shots: list[dict], path: str,
         title: str) -> None:
  """Accuracy vs cost (log x, 95% bars); few-shot curve; WiSE-FT α curve when any run has one."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # files only; no display here or on CI
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top

  wise = [(f'{m["stage"]}:{name}', e['wise']) for _, m in runs
          for name, e in m['methods'].items() if e.get('wise')]
  ncols = 1 + bool(shots) + bool(wise)
  fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.5), squeeze=False)
  panels = iter(axes[0])
  ax = next(panels)
  markers = {'zeroshot': '^', 'probe': 'o', 'finetune': 's'}
  for r in rows:
    total = r['wall_s']
    if r['stage'] in ('probe', 'zeroshot') and r['embed_s'] is not None and total is not None:
      total += r['embed_s']
    if r['top1'] is None or not total or total <= 0:
      continue
    ax.errorbar([total], [r['top1']], yerr=_yerr([(r['top1'], r['ci']['top1'])]), capsize=3,
                marker=markers.get(r['stage'], 'D'), linestyle='none')
    several = len({q['backbone'] for q in rows}) > 1
    label = f"{r['method']} ({r['backbone'].split(' ')[0]})" if several else r['method']
    ax.annotate(label, (total, r['top1']), textcoords='offset points', xytext=(5, 5),
                fontsize=8)
  ax.set_xscale('log')
  ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%g'))  # '20', not '2×10¹'
  ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
  ax.tick_params(axis='x', which='minor', labelsize=7)
  ax.set_xlabel('wall time incl. embedding / data preparation, s (log)')
  ax.set_ylabel('top-1 accuracy (95% CI)')
  ax.set_title(title, fontsize=10)
  ax.grid(True, alpha=0.3)
  if shots:
    ax = next(panels)
    for r in rows:  # zero-shot: no labels, a level line with its interval
      if r['stage'] == 'zeroshot' and r['top1'] is not None:
        line = ax.axhline(r['top1'], linestyle='--', color='gray', label=f'{r["method"]} (0 shots)')
        if r['ci']['top1']:
          ax.axhspan(*r['ci']['top1'], color=line.get_color(), alpha=0.15)
    by_method: dict[str, list] = {}
    for s in shots:
      sel = {'within-shots': 'true few-shot', 'validation': 'L2 on validation'}.get(
          s.get('selection'), 'selection not recorded')
      by_method.setdefault(f"{s['stage']}:{s['method']} ({sel})", []).append(s)
    for name, pts in sorted(by_method.items()):
      pts.sort(key=lambda s: s['shots'])
      ax.errorbar([s['shots'] for s in pts], [s['top1'] for s in pts],
                  yerr=_yerr([(s['top1'], s.get('top1_ci95')) for s in pts]), marker='o',
                  capsize=3, label=name)
    ax.set_xscale('log')
    ticks = sorted({s['shots'] for s in shots})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel('examples per class (log)')
    ax.set_ylabel('top-1 accuracy (mean over seeds, 95% CI)')
    ax.set_title('few-shot', fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
  if wise:
    ax = next(panels)
    for name, w in wise:
      line, = ax.plot(w['alphas'], w['val_top1'], '--o', markersize=4, label=f'{name} validation')
      ax.plot(w['alphas'], w['eval_top1'], '-s', markersize=4, color=line.get_color(),
              label=f'{name} eval')
      a = w.get('selected_alpha')
      if a is not None:
        ax.axvline(a, color=line.get_color(), alpha=0.4, linestyle=':')
        if a in w['alphas']:
          ax.plot([a], [w['eval_top1'][w['alphas'].index(a)]], marker='*', markersize=14,
                  color=line.get_color(), linestyle='none', label=f'{name} chosen α={a:g}')
    ax.set_xlabel('WiSE-FT α (0: initialised model, 1: fine-tuned)')
    ax.set_ylabel('top-1 accuracy')
    ax.set_title('WiSE-FT: α chosen on validation', fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def default_output_dir(paths: list[str]) -> str:
  """Where the report goes without --output_dir: the first run directory."""
  return paths[0] if os.path.isdir(paths[0]) else '.'


REPORT_FILES = ('report.md', 'report.png')
# How report.md said it was ours before the output marker listed it (still read, never written).
OLD_MARKER = '<!-- written by python -m report.compare -->'


def check_output_dir(output_dir: str) -> None:
  """Claims report.md and report.png as every stage claims its files (clip_transfer.outputs).

  Replaces only a report this tool wrote: never a user's report.md or report.png.
  """
  md = os.path.join(output_dir, 'report.md')
  old = False
  if os.path.isfile(md):
    with open(md, errors='replace') as fh:
      old = OLD_MARKER in fh.read()
  outputs.claim_files(output_dir, REPORT_FILES, kind='report.compare', adopt=old)
  # Held as every stage holds its output dir: two reports at once are refused.
  outputs.claim_exclusive(output_dir, '--output_dir')
  if not os.access(output_dir, os.W_OK):
    raise UserError(f'--output_dir {output_dir} is not writable')


def compare(paths: list[str], output_dir: Optional[str] = None) -> str:
  """Writes report.md and report.png; returns the Markdown."""
  files = find_metrics(paths)
  runs = [(f, _load(f)) for f in files]
  check_comparable(runs, run_of(files, paths))
  rows, shots = rows_from(runs)
  md = markdown(runs, rows, shots)
  output_dir = output_dir or default_output_dir(paths)
  check_output_dir(output_dir)
  with open(os.path.join(output_dir, 'report.md'), 'w') as fh:
    fh.write(md)
  task = _task(runs[0][1])
  models = sorted({(m.get('model') or {}).get('name') or '?' for _, m in runs})
  plot(runs, rows, shots, os.path.join(output_dir, 'report.png'),
       f'{task[0]} / {task[1]} — {", ".join(models)}')
  return md


@cli_main
def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='+', help='run directories (or metrics.json files)')
  parser.add_argument('--output_dir', default=None,
                      help='where report.md/report.png go (default: the first run directory)')
  args = parser.parse_args(argv)
  md = compare(args.runs, args.output_dir)
  print(md)
  out = args.output_dir or default_output_dir(args.runs)
  print(f'wrote {os.path.join(out, "report.md")} and {os.path.join(out, "report.png")}',
        file=sys.stderr)


if __name__ == '__main__':
  main()
