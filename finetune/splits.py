"""The prepared splits of one run: fit and validation carved from train by id, eval."""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import numpy as np

from finetune import input_pipeline
from finetune.config import Config
from clip_transfer import models
from clip_transfer.protocol import validation

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
  """Reads and prepares the splits; validation drawn from train by id (clip_transfer.protocol.validation)."""
  t0 = time.perf_counter()
  class_names = list(source.class_names)
  train = input_pipeline.load_split(source, config.train_split, pretrained.preprocess,
                                    config.limit_train, scratch, progress=config.progress)
  evaluation = input_pipeline.load_split(source, config.eval_split, pretrained.preprocess,
                                         config.limit_eval, scratch, progress=config.progress)
  for split in (train, evaluation):
    input_pipeline.check_labels(split, len(class_names))
  val = validation.split(train.ids, train.labels, config.val_fraction, config.seed)
  both = None
  if config.final_fit == 'fit+validation':
    both = train.subset(np.sort(np.concatenate([val.fit, val.val])), 'fit+validation')
  return Data(train.subset(val.fit, 'fit'), train.subset(val.val, 'validation'),
              evaluation.sorted_by_id(), class_names, val.record, time.perf_counter() - t0,
              {train.name: train.dead, evaluation.name: evaluation.dead}, both)

