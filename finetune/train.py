"""python -m finetune.train: fine-tune Classifier(CLIP vision tower, head) on a dataset.

The demo's two runs (about 30 s each on 2 CPU cores; both land in one metrics.json):
  python -m finetune.train --dataset=digits --model=random:tiny --workdir=runs/ft \
      --mode=linear --epochs=40 --lr=1.0      # top-1 ~0.74 (random features: a large lr)
  python -m finetune.train --dataset=digits --model=random:tiny --workdir=runs/ft \
      --mode=full --epochs=10 --lr=3e-3       # top-1 ~0.88
Writes WORKDIR/metrics.json (one entry per mode) and Orbax checkpoints under
WORKDIR/checkpoints/<mode>. The logic lives in ``finetune.trainer`` so tests and
notebooks can call ``train_and_evaluate(config, workdir)`` directly."""

from __future__ import annotations

import argparse
import logging
import sys

from transfer.errors import cli_main


def parse_args(argv=None):
  from finetune import trainer  # pylint: disable=g-import-not-at-top

  d = trainer.Config()
  p = argparse.ArgumentParser(prog='python -m finetune.train', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='metrics.json and checkpoints go here')
  p.add_argument('--dataset', default=d.dataset, help="'digits', 'folder:PATH' or a TFDS name")
  p.add_argument('--data_dir', default=d.data_dir, help='TFDS data_dir')
  p.add_argument('--train_split', default=d.train_split)
  p.add_argument('--eval_split', default=d.eval_split)
  p.add_argument('--model', default=d.model,
                 help='hub id, save_pretrained directory, or random:tiny / random:vit-b32')
  p.add_argument('--mode', default=','.join(d.modes),
                 help='comma-separated: linear, full, differential, last:N, custom')
  p.add_argument('--rules', default=d.rules,
                 help='mode custom: JSON (or a JSON file) [[regex, null|"frozen"|lr_mult], …] '
                 "over '/'-joined param paths, e.g. '[[\"backbone/.*\", null], [\"head/.*\", 1]]'")
  p.add_argument('--backbone_lr_factor', type=float, default=d.backbone_lr_factor,
                 help='mode differential: backbone learning rate = lr × this')
  p.add_argument('--epochs', type=float, default=d.epochs)
  p.add_argument('--steps', type=int, default=d.steps, help='total steps (overrides --epochs)')
  p.add_argument('--batch_size', type=int, default=d.batch_size,
                 help='global batch, divisible by the number of local devices')
  p.add_argument('--lr', type=float, default=d.lr, help='peak learning rate')
  p.add_argument('--warmup', type=float, default=d.warmup, help='warmup fraction of the steps')
  p.add_argument('--weight_decay', type=float, default=d.weight_decay)
  p.add_argument('--clip_norm', type=float, default=d.clip_norm, help='0 turns clipping off')
  p.add_argument('--dtype', default=d.dtype, choices=['float32', 'bfloat16'],
                 help='compute dtype (params stay float32)')
  p.add_argument('--augment', action='store_true', help='random shifts of up to 1/8 image')
  p.add_argument('--seed', type=int, default=d.seed)
  p.add_argument('--num_classes', type=int, default=d.num_classes,
                 help='optional check: the dataset must have this many classes')
  p.add_argument('--limit_train', type=int, default=d.limit_train)
  p.add_argument('--limit_eval', type=int, default=d.limit_eval)
  p.add_argument('--resume', action='store_true', help='continue from the latest checkpoint')
  p.add_argument('--stop_after', type=int, default=d.stop_after,
                 help='stop once this many steps are done (checkpointed; finish with --resume)')
  p.add_argument('--checkpoint_every', type=int, default=d.checkpoint_every,
                 help='steps between checkpoints (default: one epoch)')
  p.add_argument('--log_every', type=int, default=d.log_every)
  p.add_argument('--progress', action=argparse.BooleanOptionalAction, default=d.progress)
  p.add_argument('--smoke', action='store_true',
                 help='a seconds-long smoke run: 256 train / 128 eval examples, 5 steps')
  return p.parse_args(argv)


def config_from_args(args):
  from finetune import trainer  # pylint: disable=g-import-not-at-top

  kw = {k: v for k, v in vars(args).items() if k not in ('workdir', 'mode', 'smoke')}
  kw['modes'] = tuple(m.strip() for m in args.mode.split(',') if m.strip())
  if args.smoke:
    kw.update(limit_train=256, limit_eval=128, steps=5)
  return trainer.Config(**kw)


@cli_main
def main(argv=None):
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)  # Orbax logs every file it writes
  logging.getLogger('jax').setLevel(logging.WARNING)  # e.g. 'Unable to initialize backend tpu'
  args = parse_args(argv)
  from finetune import trainer  # pylint: disable=g-import-not-at-top

  out = trainer.train_and_evaluate(config_from_args(args), args.workdir)
  for mode, m in out['methods'].items():
    top5 = 'n/a' if m['top5'] is None else f'{m["top5"]:.4f}'
    ips = 'n/a' if m['images_per_s'] is None else f'{m["images_per_s"]:.1f}'
    print(f'{mode:>14}: top1 {m["top1"]:.4f}  top5 {top5}  balanced {m["balanced_accuracy"]:.4f}'
          f'  trainable {m["trainable_params"]:,}  {m["wall_s"]:.1f} s  {ips} img/s')
  print(f'metrics: {args.workdir}/metrics.json')
  return 0


if __name__ == '__main__':
  sys.exit(main())
