"""The probe over several processes: each reads, standardises and solves on its own rows."""

from __future__ import annotations

import numpy as np

from probe import core
from probe.arrays import entry, metrics_header, run_record
from probe.config import ProbeConfig, check_split, check_splits
from probe.head import LinearHead
from clip_transfer import distributed
from clip_transfer.errors import UserError
from clip_transfer.protocol import metrics as metrics_lib
from clip_transfer.protocol import validation


def train_probe_processes(config: ProbeConfig, metadata: dict, class_names) -> dict:
  """The probe over several processes: each reads, standardises and solves on its rows only.

  Labels and ids (small) are gathered to every process, so the validation
  split is the one a single process draws; the feature rows never leave
  their process. Same chosen L2, head and predictions as one process.
  """
  from clip_transfer.data import embeddings as emb  # pylint: disable=g-import-not-at-top
  if config.baselines:
    raise UserError('the scikit-learn baseline needs every embedding in one process; pass '
                    '--baselines= on a multi-host run')
  if config.shots:
    raise UserError('few-shot fits (--shots) are not sharded over processes; run them '
                    'as one process')
  part = (distributed.process_index(), distributed.process_count())
  num_classes = len(class_names)
  x_train, y_local, ids_local = emb.read_split(config.embeddings, config.train_split, part=part)
  x_eval, ye_local, ide_local = emb.read_split(config.embeddings, config.eval_split, part=part)
  for name, x, y, ids in ((config.train_split, x_train, y_local, ids_local),
                          (config.eval_split, x_eval, ye_local, ide_local)):
    if len(x):  # a process may hold no rows of a tiny split; emptiness is checked globally
      check_split(name, x, y, num_classes, ids)
  y_train, ids_train = distributed.gather_rows(y_local), distributed.gather_strings(ids_local)
  y_eval, ids_eval = distributed.gather_rows(ye_local), distributed.gather_strings(ide_local)
  check_splits((np.zeros((len(y_train), x_train.shape[1])), y_train),
               (np.zeros((len(y_eval), x_eval.shape[1])), y_eval), num_classes,
               (config.train_split, config.eval_split))
  val = validation.split(ids_train, y_train, config.val_fraction, config.seed)
  if len(val.val) == 0 and len(config.l2_grid) > 1:
    raise UserError(f'no validation examples (--val_fraction={config.val_fraction} of '
                    f'{len(y_train)}) to choose the L2 on; raise --val_fraction or pass a single '
                    '--l2_grid value')
  # This process's rows of the fit and validation parts, in the global order.
  mine = distributed.local_range(len(y_train))
  local_fit = val.fit[(val.fit >= mine.start) & (val.fit < mine.stop)]
  local_val = val.val[(val.val >= mine.start) & (val.val < mine.stop)]
  method = core.JaxMethod(solver=config.solver, max_iter=config.max_iter, tol=config.tol)
  fitted = core.select_and_fit(method, x_train[local_fit - mine.start], y_train[local_fit],
                               x_train[local_val - mine.start], y_train[val.val], x_eval,
                               num_classes, config.l2_grid,
                               progress=config.progress and distributed.is_writer())
  del x_train
  # Eval examples in id order, as one process scores them (validation.eval_order).
  order = validation.eval_order(ids_eval)
  fitted.eval_logits = fitted.eval_logits[order]
  y_eval, ids_eval = y_eval[order], [ids_eval[i] for i in order]
  out = metrics_header(config, metadata, class_names, len(y_train), len(y_eval))
  out.update(run_record(config, val, ids_eval, y_eval, x_eval.shape[1]))
  out['processes'] = distributed.process_count()
  head_params = int(x_eval.shape[1] * num_classes + num_classes)
  out['methods'][method.name] = entry(fitted, y_eval, class_names, method, head_params)
  if distributed.is_writer():
    LinearHead(kernel=fitted.kernel, bias=fitted.bias, mean=fitted.standardizer.mean,
               std=fitted.standardizer.std, class_names=list(class_names),
               l2=fitted.l2).save(config.output_dir)
    metrics_lib.write(config.output_dir, out)
  return out
