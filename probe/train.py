"""Linear probe on an embedding dataset, with the CLIP paper's scikit-learn baseline.

    python -m probe.train --embeddings=DIR --output_dir=OUT [--shots=1,5,10 --seeds=3]
    python -m probe.train --embeddings=DIR --output_dir=OUT --method=zeroshot-anchored \
        --zeroshot=ZS_DIR [--shots=…]

``--method=zeroshot-anchored`` fits logistic regression on L2-normalised
``projected`` features with weights W_zs + Δ, W_zs the zero-shot head in
ZS_DIR (probe.zeroshot's output), penalising ||Δ||²: the grid's largest
penalty (inf) is zero-shot itself, a small one a plain probe, so few labels
move the head only as far as they justify.

The L2 is chosen on the shared validation split (``clip_transfer.protocol.validation``, the
same examples fine-tune validates on), the eval split is scored once with the
chosen head, and every accuracy carries a bootstrap 95% interval. Few-shot
fits choose their L2 within the shots (true few-shot) unless
``--few_shot_selection=validation``; a seed's shots are drawn by example id
(``validation.few_shot``), the same in every stage and rerun.
``--final_fit=fit+validation`` refits the chosen L2 on fit ∪ validation.
Writes OUT/metrics.json and OUT/head.npz (apply it with probe.predict). The logic lives in ``train_probe`` /
``train_probe_arrays``, which tests call; ``main`` only parses and prints. Beside this module:
``probe.config`` (flags and input checks), ``probe.anchor`` (the zero-shot head the anchored
probe starts from), ``probe.arrays`` (the protocol on arrays), ``probe.processes`` (the
multi-process path), ``probe.core`` (the methods on arrays, scikit-learn's included).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from probe.anchor import load_anchor
from probe.arrays import metrics_header, train_probe_arrays
from probe.config import OWNED_FILES, ProbeConfig, check_split
from probe.processes import train_probe_processes
from clip_transfer import distributed
from clip_transfer import flags
from clip_transfer import outputs
from clip_transfer.errors import Parser, UserError, cli_main


def train_probe(config: ProbeConfig) -> dict:
  """Reads two splits of an embedding dataset and runs the probe protocol on them."""
  from clip_transfer.data import embeddings as emb  # pylint: disable=g-import-not-at-top
  anchored = config.method == 'zeroshot-anchored'
  if anchored and not config.zeroshot:
    raise UserError('--method=zeroshot-anchored needs --zeroshot=DIR (a probe.zeroshot run on '
                    'the same embeddings)')
  claim = dict(overwrite=config.overwrite, kind='probe run', owned=OWNED_FILES,
               complete='metrics.json')
  if distributed.is_writer():  # process 0 alone writes (clip_transfer.distributed)
    # Refuses a file, a read-only directory, one holding files this tool did not write,
    # or a previous run without --overwrite (the rule of every stage); held exclusively.
    outputs.prepare_output_dir(config.output_dir, clear=False, **claim)
  metadata = emb.read_metadata(config.embeddings)
  class_names = emb.class_names(config.embeddings)
  if distributed.process_count() > 1:
    if anchored or config.final_fit != 'fit':
      raise UserError('--method=zeroshot-anchored and --final_fit=fit+validation are not '
                      'sharded over processes; run them as one process')
    if distributed.is_writer():
      outputs.prepare_output_dir(config.output_dir, **claim)
    return train_probe_processes(config, metadata, class_names)
  feature, zs, zs_record = 'embedding', None, None
  if anchored:
    if 'projected' not in emb.feature_names(config.embeddings):
      raise UserError(f'{config.embeddings} has no projected feature: '
                      f'{(metadata.get("model") or {}).get("name")} is vision-only (no text '
                      'tower, so no zero-shot head to anchor at) or was embedded without '
                      '--projected; use --method=linear')
    zs, zs_record = load_anchor(config.zeroshot, config.embeddings, metadata, class_names)
    feature = 'projected'
  x_train, y_train, ids_train = emb.read_split(config.embeddings, config.train_split, feature)
  x_eval, y_eval, ids_eval = emb.read_split(config.embeddings, config.eval_split, feature)
  # Checked here too, so NaN errors can name the offending example's id.
  check_split(config.train_split, x_train, y_train, len(class_names), ids_train)
  check_split(config.eval_split, x_eval, y_eval, len(class_names), ids_eval)
  # The inputs hold up: only now remove the previous run's files (--overwrite).
  outputs.prepare_output_dir(config.output_dir, **claim)
  header = metrics_header(config, metadata, class_names, len(y_train), len(y_eval), zs_record)
  options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
             if f.name not in ('embeddings', 'output_dir', 'overwrite')}
  return train_probe_arrays(x_train, y_train, x_eval, y_eval, class_names, config.output_dir,
                            ids_train=ids_train, ids_eval=ids_eval, header=header,
                            zeroshot_head=zs, **options)


def summary_table(metrics: dict) -> str:
  """A few lines: one per method and few-shot entry (top-1 with its 95% interval)."""
  pct = lambda v: '   -  ' if v is None else f'{100 * v:6.2f}'
  lines = [f'{"method":24s} {"top1":>7s} {"95% interval":>15s} {"bal.acc":>7s} {"l2":>9s} '
           f'{"wall_s":>8s}']
  for key, m in metrics['methods'].items():
    lo, hi = m['top1_ci95']
    l2 = float(np.median([float(v) for v in np.atleast_1d(m['l2'])]))  # 'inf' reads as inf
    lines.append(f'{key:24s} {pct(m["top1"]):>7s} {f"[{pct(lo)}, {pct(hi)}]":>15s} '
                 f'{pct(m["balanced_accuracy"]):>7s} {l2:9.1e} {m["wall_s"]:8.2f}')
  return '\n'.join(lines)


@cli_main
def main(argv=None):
  p = Parser(description=__doc__.split('\n\n')[0])
  flags.add_flags(p, ProbeConfig)
  config = flags.from_args(ProbeConfig, p.parse_args(argv))
  distributed.initialize(config)
  with distributed.peer_failures():
    metrics = train_probe(config)
  if not distributed.is_writer():
    return
  print(summary_table(metrics))
  print(f'metrics: {os.path.join(config.output_dir, "metrics.json")}')


if __name__ == '__main__':
  main()
