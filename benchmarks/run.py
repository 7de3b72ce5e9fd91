"""`make bench`: runs every benchmark (each in its own process) and prints one table.

    python -m benchmarks.run [--quick] [--only backbone,embed,predict,probe,finetune,finetune_input]

Each figure is a ratio measured side by side in one process run on this
machine; the table says which machine and when. --quick shrinks every run
to a smoke test (numbers then mean little).
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile


def _backbone(r):
  # One row per family (benchmarks.backbone runs them side by side in one process).
  return [(f"Flax backbone vs PyTorch {f['model']} forward (batch {f['batch_size']}, "
           f"{f['dtype']})", f"{f['ratio']:.2f}x", '>= 1.0',
           f"{f['jax_images_per_s']:.1f} vs {f['torch_images_per_s']:.1f} images/s"
           + (f"; alternating rounds {min(f['ratio_per_round']):.2f}-"
              f"{max(f['ratio_per_round']):.2f}" if f.get('ratio_per_round') else '')
           + f"; max |diff| {f['max_abs_diff']:.1e}")
          for f in r.get('families', {'clip': r}).values()]


def _embed(r):
  rows = []
  if 'throughput' in r:
    t = r['throughput']
    raw, pipe = t['pairs_raw_pipeline_images_per_s'][-1]
    rows.append((f"pipelines.embed end to end vs raw jitted backbone ({t['model']}, "
                 f"{t['images']} images)", f"{t['ratio_median']:.2f}", '>= 0.9',
                 f"{pipe:.1f} vs {raw:.1f} images/s; {t['ratio_steady_median']:.2f} without "
                 f"Beam's {t['startup_s']:.1f} s start-up"))
  if 'decode_bound' in r:
    d = r['decode_bound']
    limit, pipe = d['pairs_limit_pipeline_images_per_s'][-1]
    rows.append((f"embed decode-bound ({d['model']}, {d['images']} JPEGs of {d['image_size']} px) "
                 f"vs all-core preprocessing pool ({d['cores']} processes)",
                 f"{d['ratio_median']:.2f}", '>= 0.85',
                 f"{pipe:.1f} vs {limit:.1f} images/s; {d['ratio_steady_median']:.2f} without "
                 f"Beam's {d['startup_s']:.1f} s start-up"))
  if 'fast_decode' in r:
    f = r['fast_decode']
    for side, s in sorted(f['sizes'].items(), key=lambda kv: int(kv[0])):
      rows.append((f'--fast_decode host preprocessing speedup, {side}-px JPEG photos (one core)',
                   f"{s['speedup']:.1f}x", '>= 3x at 2048 px',
                   f"{s['exact_ms_per_image']:.1f} -> {s['fast_ms_per_image']:.1f} ms/image; "
                   f"cosine to exact ({f['model']}, {f['images_for_cosine']} photos) mean "
                   f"{f['fast_cosine_mean']:.4f}, min {f['fast_cosine_min']:.4f}"))
    rows.append((f"--dtype=bfloat16 embeddings vs float32 ({f['model']})",
                 f"{f['bf16_cosine_mean']:.4f}", 'cosine (documented)',
                 f"min {f['bf16_cosine_min']:.4f} over {f['images_for_cosine']} photos"))
  if 'memory' in r:
    m = r['memory']
    rows.append((f"embed peak memory, {m['images_10x']} vs {m['images_1x']} images",
                 f"{m['ratio']:.2f}x", '<= 1.2',
                 f"{m['peak_rss_mb_10x']:.0f} vs {m['peak_rss_mb_1x']:.0f} MB"))
  return rows


def _predict(r):
  t = r['throughput']
  raw, pipe = t['pairs_raw_pipeline_images_per_s'][-1]
  rows = [(f"pipelines.predict end to end (probe head) vs raw jitted backbone ({t['model']}, "
           f"{t['images']} images)", f"{t['ratio_median']:.2f}", '>= 0.9',
           f"{pipe:.1f} vs {raw:.1f} images/s; {t['ratio_steady_median']:.2f} without "
           f"Beam's {t['startup_s']:.1f} s start-up")]
  if 'memory' in r:
    m = r['memory']
    rows.append((f"predict peak memory, {m['images_10x']} vs {m['images_1x']} images",
                 f"{m['ratio']:.2f}x", '<= 1.2',
                 f"{m['peak_rss_mb_10x']:.0f} vs {m['peak_rss_mb_1x']:.0f} MB"))
  return rows


def _probe(r):
  rows = []
  for key in ('synthetic', 'digits'):
    if key in r:
      s = r[key]
      rows.append((f"probe L2 sweep + selection, JAX vs scikit-learn ({s['name']})",
                   f"{s['speedup']:.1f}x", '>= 10x, top-1 within 0.5 pt',
                   f"top-1 {100 * s['top1_jax']:.2f} vs {100 * s['top1_sklearn']:.2f}"))
  if 'memory' in r:
    m = r['memory']
    rows.append((f"probe peak memory per process, 2 processes vs 1 ({m['rows']} x {m['dim']}, "
                 "above the import baseline)", f"{m['ratio_above_baseline']:.2f}x", '~0.5',
                 f"{m['peak_mb_2']:.0f} vs {m['peak_mb_1']:.0f} MB (baseline "
                 f"{m['baseline_mb_2']:.0f} / {m['baseline_mb_1']:.0f} MB)"))
  return rows


def _finetune(r):
  return [(f"fine-tune train step vs forward ({r['model']}, batch {r['batch_size']}, "
           f"{r['dtype']}, mode {r['mode']})", f"{r['train_over_forward']:.2f}", '>= 0.3',
           f"{r['train_images_per_s']:.1f} vs {r['forward_images_per_s']:.1f} images/s")]


def _finetune_input(r):
  p, s = r['prepare'], r['step']
  host, ft = p['pairs_embed_host_finetune_images_per_s'][-1]
  const, fed = s['pairs_constant_fed_images_per_s'][-1]
  return [(f"fine-tune data preparation vs the embed stage's host preprocessing ({r['images']} "
           f"JPEGs of {r['image_size']} px, {r['cores']} cores)", f"{p['ratio_median']:.2f}",
           '>= 0.8', f"{ft:.1f} vs {host:.1f} images/s"),
          (f"fine-tune step fed by the input pipeline vs a constant batch ({r['model']}, batch "
           f"{r['batch_size']}, mode {s['mode']})", f"{s['ratio_median']:.2f}", '>= 0.95',
           f"{fed:.1f} vs {const:.1f} images/s")]


# name: (module, full-run args, quick-run args, rows from the JSON)
BENCHES = {
    'backbone': ('benchmarks.backbone', ['--iters', '7'], ['--iters', '1', '--batch_size', '4'],
                 _backbone),
    'embed': ('benchmarks.embed', ['--images', '640', '--repeats', '1'],
              ['--images', '16', '--repeats', '1', '--model', 'random:tiny',
               '--memory_images', '10', '--decode_images', '64', '--unique_images', '16',
               '--fast_model', 'random:tiny', '--fast_repeats', '1'], _embed),
    'predict': ('benchmarks.predict', [], ['--images', '16', '--model', 'random:tiny',
                                           '--memory_images', '10'], _predict),
    'probe': ('benchmarks.probe', ['--memory_rows', '400000'],
              ['--num', '3000', '--dim', '64', '--classes', '10', '--skip_digits',
               '--memory_rows', '4000'], _probe),
    'finetune': ('benchmarks.finetune', ['--batch_size', '32', '--steps', '3'],
                 ['--model', 'random:tiny', '--batch_size', '8', '--steps', '2'], _finetune),
    'finetune_input': ('benchmarks.finetune_input', [],
                       ['--model', 'random:tiny', '--images', '32', '--image_size', '64',
                        '--repeats', '1', '--batch_size', '8', '--steps', '2'], _finetune_input),
}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--quick', action='store_true', help='smoke-test sizes')
  p.add_argument('--only', default=','.join(BENCHES), help='comma-separated subset')
  args = p.parse_args(argv)
  rows, failed = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.only.split(','):
      module, full, quick, to_rows = BENCHES[name]
      out = os.path.join(tmp, f'{name}.json')
      cmd = [sys.executable, '-m', module, *(quick if args.quick else full), '--json', out]
      print(f'== {name}: {" ".join(cmd[1:])}', file=sys.stderr, flush=True)
      if subprocess.run(cmd).returncode != 0 or not os.path.exists(out):
        failed.append(name)
        continue
      with open(out) as fh:
        rows.extend(to_rows(json.load(fh)))
  when = datetime.date.today().isoformat()
  print(f'\nMeasured {when} on {platform.machine()} with {os.cpu_count()} CPUs '
        f'({platform.processor() or platform.platform()}){" [quick]" if args.quick else ""}\n')
  print('| figure | measured | target | detail |\n|---|---:|---|---|')
  for figure, value, target, detail in rows:
    print(f'| {figure} | {value} | {target} | {detail} |')
  if failed:
    print(f'\nfailed: {", ".join(failed)}', file=sys.stderr)
    raise SystemExit(1)


if __name__ == '__main__':
  main()
