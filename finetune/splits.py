"""The prepared splits of one run: fit and validation carved from train by id, eval."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

import numpy as np

from finetune import input_pipeline
from finetune.config import Config
from clip_transfer import distributed
from clip_transfer import models
from clip_transfer.data.base import Dead
from clip_transfer.errors import UserError
from clip_transfer.protocol import validation

log = logging.getLogger(__name__)

@dataclasses.dataclass
class Data:
  """The prepared splits of one run: fit and validation (from train), eval (sorted by id)."""

  fit: input_pipeline.Split
  val: input_pipeline.Split
  eval: input_pipeline.Split
  class_names: list
  validation: dict  # the record metrics.json carries
  wall_s: float  # reading + decoding + resizing, counted into every row's cost
  dead: dict  # {source split: its Dead inputs}, counted and written as embed does
  fit_and_val: Optional[input_pipeline.Split] = None  # the whole train split (--final_fit)


def prepare_data(source, pretrained: models.Pretrained, config: Config, scratch: str) -> Data:
  """Reads and prepares the splits; validation drawn from train by id (clip_transfer.protocol.validation).

  Over several processes each reads and prepares only its share of each split
  (``_across_processes``).
  """
  t0 = time.perf_counter()
  class_names = list(source.class_names)
  part = None
  if distributed.process_count() > 1:
    part = (distributed.process_index(), distributed.process_count())
  train = input_pipeline.load_split(source, config.train_split, pretrained.preprocess,
                                    config.limit_train, scratch, progress=config.progress,
                                    part=part)
  evaluation = input_pipeline.load_split(source, config.eval_split, pretrained.preprocess,
                                         config.limit_eval, scratch, progress=config.progress,
                                         part=part)
  if part is not None:
    return _across_processes(source.name, train, evaluation, class_names, config, t0)
  for split in (train, evaluation):
    input_pipeline.check_labels(split, len(class_names))
  val = validation.split(train.ids, train.labels, config.val_fraction, config.seed)
  both = None
  if config.final_fit == 'fit+validation':
    both = train.subset(np.sort(np.concatenate([val.fit, val.val])), 'fit+validation')
  return Data(train.subset(val.fit, 'fit'), train.subset(val.val, 'validation'),
              evaluation.sorted_by_id(), class_names, val.record, time.perf_counter() - t0,
              {train.name: train.dead, evaluation.name: evaluation.dead}, both)


def _whole(split: input_pipeline.Split, source_name: str) -> tuple[np.ndarray, list, int]:
  """(labels, ids) of every process's rows in process order (= input order), and our offset."""
  labels, ids = distributed.gather_rows(split.labels), distributed.gather_strings(split.ids)
  if not len(labels):
    raise UserError(f'split {split.name!r} of {source_name} has no usable images')
  counts = distributed.allgather(np.int64(len(split)))
  return labels, ids, int(counts[:distributed.process_index()].sum())


def _dead(split: input_pipeline.Split) -> list:
  """Every process's dead inputs (process 0 writes them)."""
  ids = distributed.gather_strings([d.id for d in split.dead])
  reasons = distributed.gather_strings([d.reason for d in split.dead])
  return [Dead(i, r) for i, r in zip(ids, reasons)]


def _across_processes(source_name: str, train: input_pipeline.Split,
                      evaluation: input_pipeline.Split, class_names: list, config: Config,
                      t0: float) -> Data:
  """``prepare_data`` over several processes: each holds its rows, every one knows the whole.

  Labels and ids (small) are gathered, so the validation split, the checks and
  the eval order are a single process's; images never leave their process.
  Process i's rows are a contiguous run of each split (``distributed.local_range``
  of its inputs), so the rows gathered in process order are in input order.
  """
  for split in (train, evaluation):
    log.info('process %d of %d prepared %d of the %d inputs of %s', distributed.process_index(),
             distributed.process_count(), len(split) + len(split.dead), split.num_inputs,
             split.name)
  labels, ids, offset = _whole(train, source_name)
  eval_labels, eval_ids, _ = _whole(evaluation, source_name)
  train.all_labels = labels
  # Eval order (by id) as one process scores it: rows gathered in process order, then sorted.
  order = validation.eval_order(eval_ids)
  evaluation.all_labels, evaluation.all_ids = eval_labels[order], [eval_ids[i] for i in order]
  evaluation.order = order
  for split in (train, evaluation):
    input_pipeline.check_labels(split, len(class_names))
  val = validation.split(ids, labels, config.val_fraction, config.seed)
  mine = (offset, offset + len(train))

  def ours(rows: np.ndarray, name: str) -> input_pipeline.Split:
    """The train split's ``rows`` (global, sorted): ours of them, knowing all of them."""
    local = rows[(rows >= mine[0]) & (rows < mine[1])] - mine[0]
    out = train.subset(local, name)
    out.all_labels, out.all_ids = labels[rows], [ids[i] for i in rows]
    return out

  both = None
  if config.final_fit == 'fit+validation':
    both = ours(np.sort(np.concatenate([val.fit, val.val])), 'fit+validation')
  dead = {train.name: _dead(train), evaluation.name: _dead(evaluation)}
  # The run waited for the slowest process's preparation.
  wall_s = float(distributed.allgather(np.float64(time.perf_counter() - t0)).max())
  return Data(ours(val.fit, 'fit'), ours(val.val, 'validation'), evaluation, class_names,
              val.record, wall_s, dead, both)
