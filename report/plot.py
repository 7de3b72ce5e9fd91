"""report.png: the ladder and the few-shot curves in one figure."""

from __future__ import annotations

from typing import Optional

import numpy as np


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
