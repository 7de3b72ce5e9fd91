"""report.md: the tables (ladder, few-shot, costs) in Markdown."""

from __future__ import annotations

import math

from clip_transfer.protocol import metrics as metrics_lib
from clip_transfer.protocol import stats
from report.rows import few_shot_pairs, paired, reference, row_key, rung_key
from report.runs import task

SELECTION = {'within-shots': 'true few-shot (L2 chosen within the shots)',
             'validation': 'L2 chosen on the validation split'}
# Said of a method whose entry has no "cost" text (files written before it was recorded).
NO_COST = 'not described in its metrics.json'


def _delta(d) -> str:
  if d is None:
    return '—'
  if d == 'reference':
    return '(reference)'
  return (f'{d["diff"]:+.4f} [{d["ci95"][0]:+.3f}, {d["ci95"][1]:+.3f}] '
          f'{stats.verdict(d)}')


def _fmt(v, spec):
  return '—' if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _with_ci(v, ci, spec='.4f') -> str:
  if v is None:
    return '—'
  return f'{v:{spec}} [{ci[0]:.3f}, {ci[1]:.3f}]' if ci else f'{v:{spec}}'


def _p(p: float) -> str:
  return f'{p:.3f}' if p >= 0.001 else f'{p:.1e}'


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
  name, split, n_eval, n_classes = task(first)
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
      d = pairs.get(row_key(r))
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
        name = f"{r['method']} on {r['backbone']}" if several else r['method']
        lines.append(f"| {name} | 0 | — | no labels | {_fmt(r['top1'], '.4f')} | "
                     f"{f'[{ci[0]:.3f}, {ci[1]:.3f}]' if ci else '—'} | "
                     f"{_fmt(r['balanced_accuracy'], '.4f')} |" + (' — | — |' if paired_any else ''))
    order = sorted(range(len(shots)), key=lambda i: (
        shots[i]['stage'], rung_key(shots[i]['stage'], shots[i]['method'], {}),
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
