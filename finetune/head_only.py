"""Modes that train only the head, solved exactly as the probe solves them (no gradient steps)."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
from jax.sharding import Mesh

from finetune import groups
from finetune import input_pipeline
from finetune.config import Config
from finetune.splits import Data
from finetune.steps import apply_to_rows
from clip_transfer import distributed
from clip_transfer import models
from clip_transfer.models import forward
from clip_transfer.protocol import heads
from clip_transfer.protocol import methods
from clip_transfer.protocol import metrics as metrics_lib

def frozen_features(pretrained: models.Pretrained, splits: Sequence[input_pipeline.Split],
             batch_size: int, mesh: Mesh) -> list[np.ndarray]:
  """The frozen backbone's pooled features (what the probe embeds) of this process's rows, per split."""
  # The embed stage's function: one compilation for the fixed batch shape, every split.
  fn, weights = forward.vision_features(pretrained)
  weights = distributed.put_replicated(weights, mesh)  # replicated; batches sharded
  pooled = lambda w, batch: fn(w, batch['image'])[0]
  return [apply_to_rows(pooled, weights, split, batch_size, mesh) for split in splits]


def solve_head_only(plan: groups.Plan, pretrained: models.Pretrained, data: Data, config: Config,
                    mesh: Mesh) -> dict:
  """A mode that trains only the head is the probe's convex problem: solved as the probe solves it.

  Standardised frozen features, the L2 grid in one vmapped L-BFGS solve, the
  L2 chosen on the validation split, the standardisation folded into the
  Dense head — so `linear` here and `probe:jax` agree up to float noise.
  Over several processes each keeps its rows' features; the statistics, the
  solve and the logits cover every process's rows (``methods.select_and_fit``).
  """
  t0 = time.perf_counter()
  x = dict(zip(('fit', 'val', 'eval'),
               frozen_features(pretrained, (data.fit, data.val, data.eval), config.batch_size, mesh)))
  # Validation labels whole: the validation logits come back gathered, in process order,
  # which is the validation split's order (its rows are sorted: clip_transfer.protocol.validation).
  fitted = methods.select_and_fit(methods.JaxMethod(), x['fit'], data.fit.labels, x['val'],
                                  data.val.whole_labels, x['eval'], len(data.class_names),
                                  config.l2_grid, progress=config.progress)
  sweep = fitted.sweep  # the selection's record, whatever is fit last
  if config.final_fit == 'fit+validation':  # the chosen L2, fit again on fit ∪ validation
    fitted = methods.select_and_fit(methods.JaxMethod(), np.concatenate([x['fit'], x['val']]),
                                    np.concatenate([data.fit.labels, data.val.labels]),
                                    x['val'][:0], data.val.labels[:0], x['eval'],
                                    len(data.class_names), [fitted.l2])
  kernel, bias = heads.fold(fitted.kernel, fitted.bias, fitted.standardizer.mean,
                             fitted.standardizer.std)
  logits = data.eval.gather(x['eval'] @ kernel + bias)  # = the Classifier with this head
  entry = metrics_lib.classification(logits, data.eval.whole_labels, data.class_names)
  entry.update({
      'wall_s': data.wall_s + time.perf_counter() - t0,
      'cost': 'its own data preparation, one frozen-backbone pass over fit/validation/eval and '
              'the exact solve of the L2 grid',
      'trainable_params': int(kernel.size + bias.size),
      'grid': list(config.l2_grid), 'selected': {'l2': fitted.l2}, 'sweep': sweep,
      'solver': 'lbfgs (exact, as the probe)', 'rules': [[r, s] for r, s in plan.rules],
      'final_fit': config.final_fit,
  })
  return entry

