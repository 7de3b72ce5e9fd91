"""Probe vs fine-tune: one table (report.md) and one plot (report.png) from metrics.json files.

    python -m report.compare RUN_DIR [RUN_DIR …] [--output_dir DIR]

Each RUN_DIR is a probe output dir or a fine-tune workdir (anything holding a
``metrics.json``), or a directory whose subdirectories hold them (the demo's
run directory). Runs on different datasets or eval splits are refused.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from typing import Any, Optional

from transfer.errors import UserError, cli_main


def find_metrics(paths: list[str]) -> list[str]:
  """metrics.json files in each path or its direct subdirectories, in a stable order."""
  found = []
  for p in paths:
    if os.path.isfile(p) and os.path.basename(p) == 'metrics.json':
      found.append(p)
    elif os.path.isfile(os.path.join(p, 'metrics.json')):
      found.append(os.path.join(p, 'metrics.json'))
    elif os.path.isdir(p):
      below = sorted(glob.glob(os.path.join(p, '*', 'metrics.json')))
      if not below:
        raise UserError(f'{p} holds no metrics.json (nor do its subdirectories)')
      found.extend(below)
    else:
      raise UserError(f'no such run directory: {p}')
  return found


def _load(path: str) -> dict:
  try:
    with open(path) as fh:
      m = json.load(fh)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f'{path}: not readable JSON ({e})') from None
  if not isinstance(m, dict) or not isinstance(m.get('methods'), dict) or 'stage' not in m:
    raise UserError(f'{path}: not a probe/fine-tune metrics.json (no "stage" and "methods")')
  return m


def _task(m: dict) -> tuple:
  d = m.get('dataset') or {}
  return (d.get('name'), d.get('eval_split'), m.get('num_eval'), m.get('num_classes'))


def rows_from(runs: list[tuple[str, dict]]) -> tuple[list[dict], list[dict], Optional[dict]]:
  """(table rows, few-shot points, embedding cost) from loaded metrics files."""
  tasks = {_task(m): path for path, m in runs}
  if len(tasks) > 1:
    desc = '; '.join(f'{p}: dataset {t[0]!r}, eval split {t[1]!r}, {t[2]} examples, '
                     f'{t[3]} classes' for t, p in tasks.items())
    raise UserError(f'runs are not comparable (different dataset or eval split): {desc}')
  rows, shots, embed = [], [], None
  for path, m in runs:
    stage = m['stage']
    if stage == 'probe' and m.get('embedding'):
      embed = m['embedding']
    for name, e in m['methods'].items():
      if 'shots' in e:  # few-shot entries are named '<method>_<k>shot'
        base = name[:-len(f"_{e['shots']}shot")] if name.endswith('shot') else name
        shots.append({'method': base, 'stage': stage, **e})
        continue
      rows.append({
          'method': f'{stage}:{name}', 'top1': e.get('top1'),
          'balanced_accuracy': e.get('balanced_accuracy'),
          'trainable_params': e.get('trainable_params'), 'wall_s': e.get('wall_s'),
          'images_per_s': e.get('images_per_s'), 'stage': stage, 'source': path})
  return rows, shots, embed


def _fmt(v, spec):
  return '—' if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(rows: list[dict], shots: list[dict], embed: Optional[dict], task: tuple,
             model: Any) -> str:
  """The report table (and few-shot table) as Markdown."""
  name, split, n_eval, n_classes = task
  lines = [f'# Probe vs fine-tune: {name}, eval split {split!r} '
           f'({n_eval} examples, {n_classes} classes)', '']
  if model:
    lines += [f'Model: `{model}`', '']
  embed_s = embed.get('wall_s') if embed else None
  lines += ['| method | top-1 | balanced acc. | trainable params | wall s | '
            'wall s incl. embedding | images/s |', '|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    total = r['wall_s'] + embed_s if (r['stage'] == 'probe' and embed_s is not None
                                      and r['wall_s'] is not None) else r['wall_s']
    lines.append(f"| {r['method']} | {_fmt(r['top1'], '.4f')} | "
                 f"{_fmt(r['balanced_accuracy'], '.4f')} | {_fmt(r['trainable_params'], ',')} | "
                 f"{_fmt(r['wall_s'], '.2f')} | {_fmt(total, '.2f')} | "
                 f"{_fmt(r['images_per_s'], '.1f')} |")
  if embed:
    lines += ['', f"Embedding (one-off, shared by every probe row): {_fmt(embed_s, '.1f')} s for "
              f"{embed.get('num_images', '?')} images, {_fmt(embed.get('images_per_s'), '.1f')} "
              'images/s. Probe rows show the probe alone and with that cost added.']
  if shots:
    lines += ['', '## Few-shot (mean ± std over seeds)', '',
              '| method | shots | seeds | top-1 | balanced acc. |', '|---|---:|---:|---:|---:|']
    for s in sorted(shots, key=lambda s: (s['method'], s['shots'])):
      lines.append(f"| {s['stage']}:{s['method']} | {s['shots']} | {s.get('seeds', '—')} | "
                   f"{_fmt(s.get('top1'), '.4f')} ± {_fmt(s.get('top1_std'), '.4f')} | "
                   f"{_fmt(s.get('balanced_accuracy'), '.4f')} |")
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict], shots: list[dict], path: str, title: str) -> None:
  """Accuracy vs wall time (log x), one point per method; few-shot curve beside it."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # files only; no display here or on CI
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ncols = 2 if shots else 1
  fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.5), squeeze=False)
  ax = axes[0][0]
  for r in rows:
    if r['top1'] is None or not r['wall_s']:
      continue
    ax.scatter(r['wall_s'], r['top1'], s=50, marker='o' if r['stage'] == 'probe' else 's')
    ax.annotate(r['method'], (r['wall_s'], r['top1']), textcoords='offset points',
                xytext=(5, 5), fontsize=8)
  ax.set_xscale('log')
  ax.set_xlabel('wall time, s (log)')
  ax.set_ylabel('top-1 accuracy')
  ax.set_title(title, fontsize=10)
  ax.grid(True, alpha=0.3)
  if shots:
    ax = axes[0][1]
    by_method: dict[str, list] = {}
    for s in shots:
      by_method.setdefault(f"{s['stage']}:{s['method']}", []).append(s)
    for name, pts in sorted(by_method.items()):
      pts.sort(key=lambda s: s['shots'])
      ax.errorbar([s['shots'] for s in pts], [s['top1'] for s in pts],
                  yerr=[s.get('top1_std') or 0 for s in pts], marker='o', capsize=3, label=name)
    ax.set_xscale('log')
    ticks = sorted({s['shots'] for s in shots})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel('examples per class (log)')
    ax.set_ylabel('top-1 accuracy')
    ax.set_title('few-shot', fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def default_output_dir(paths: list[str]) -> str:
  """Where the report goes without --output_dir: the first run directory."""
  return paths[0] if os.path.isdir(paths[0]) else '.'


def compare(paths: list[str], output_dir: Optional[str] = None) -> str:
  """Writes report.md and report.png; returns the Markdown."""
  files = find_metrics(paths)
  runs = [(f, _load(f)) for f in files]
  rows, shots, embed = rows_from(runs)
  task = _task(runs[0][1])
  models = {(m.get('model') or {}).get('name') for _, m in runs}
  models.discard(None)
  model = ', '.join(sorted(models))
  md = markdown(rows, shots, embed, task, model)
  output_dir = output_dir or default_output_dir(paths)
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, 'report.md'), 'w') as fh:
    fh.write(md)
  plot(rows, shots, os.path.join(output_dir, 'report.png'),
       f'{task[0]} / {task[1]} — {model}')
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
