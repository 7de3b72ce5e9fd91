"""python -m finetune.train: fine-tune Classifier(CLIP vision tower, head) on a dataset.

The demo's run (about a minute on 2 CPU cores; every mode lands in one metrics.json):
  python -m finetune.train --dataset=digits --model=random:tiny --workdir=runs/ft \
      --mode=linear,full --epochs=10
Each mode tries every --lr of its grid (default 1e-5,1e-4,1e-3), scores the
validation split (--val_fraction of train, the probe's examples) every epoch,
and keeps the best (lr, step); the eval split is scored once, for that one.
Modes that train only the head (linear, last:0) are solved exactly as the
probe solves them. Writes WORKDIR/metrics.json and Orbax checkpoints under
WORKDIR/checkpoints/<mode>/lr=<lr>/{latest,best}. Multi-host: start one process
per host with --coordinator_address --num_processes --process_id (or let JAX
auto-detect them on Slurm / TPU slices); see the README. The logic lives in
the modules beside it so tests and notebooks can call
``finetune.trainer.train_and_evaluate(config, workdir)`` directly."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from clip_transfer import distributed
from clip_transfer import flags
from clip_transfer.errors import Parser, cli_main
from clip_transfer.protocol import metrics as metrics_lib


def parse_args(argv=None):
  """(Config, workdir) from the command line; every Config field is a flag."""
  from finetune.config import Config  # pylint: disable=g-import-not-at-top

  p = Parser(prog='python -m finetune.train', description=__doc__,
             formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='metrics.json and checkpoints go here')
  flags.add_flags(p, Config)
  p.add_argument('--smoke', action='store_true',
                 help='a seconds-long smoke run: 256 train / 128 eval examples, 5 steps')
  args = p.parse_args(argv)
  smoke = dict(limit_train=256, limit_eval=128, steps=5) if args.smoke else {}
  return flags.from_args(Config, args, **smoke), args.workdir


@cli_main
def main(argv=None):
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)  # Orbax logs every file it writes
  logging.getLogger('jax').setLevel(logging.WARNING)  # e.g. 'Unable to initialize backend tpu'
  config, workdir = parse_args(argv)
  distributed.initialize(config)  # multi-host: joins the run (a no-op for one process)
  from finetune import trainer  # pylint: disable=g-import-not-at-top

  with distributed.peer_failures():
    out = trainer.train_and_evaluate(config, workdir)
  if not distributed.is_writer():  # process 0 prints (and wrote) the results
    return 0
  names = {config.method_name(mode) for mode in config.modes}
  for mode, m in out['methods'].items():
    if str(dataclasses.replace(metrics_lib.parse_method(mode), wise=False)) not in names:
      continue  # from an earlier run into the same workdir
    lo, hi = m['top1_ci95']
    chosen = ', '.join(f'{k} {v:g}' for k, v in m['selected'].items())
    print(f'{mode:>14}: top1 {m["top1"]:.4f} [{lo:.4f}, {hi:.4f}]  balanced '
          f'{m["balanced_accuracy"]:.4f}  trainable {m["trainable_params"]:,}  '
          f'{m["wall_s"]:.1f} s  (chosen on validation: {chosen})')
  unfinished = sorted(n for n in names if n not in out['methods'])
  if unfinished:  # --stop_after: checkpointed, not finished; say so rather than "metrics: …"
    print(f'stopped early (--stop_after) before {", ".join(unfinished)} finished; continue with '
          f'--resume (metrics: {workdir}/metrics.json holds only finished modes)')
    return 0
  print(f'metrics: {workdir}/metrics.json')
  return 0


if __name__ == '__main__':
  sys.exit(main())
