"""WiSE-FT: weight-space ensembles of the start and the fine-tuned model, α chosen on validation."""

from __future__ import annotations

import time

import flax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from finetune.config import Config
from finetune.splits import Data
from finetune.steps import TrainState, apply_to_split, val_score
from clip_transfer import distributed
from clip_transfer.protocol import metrics as metrics_lib
from clip_transfer.protocol import rungs

def wise_ft(entry: dict, initialised, tuned: TrainState, eval_fn, data: Data, config: Config,
            mesh: Mesh) -> dict:
  """WiSE-FT: θ_α = (1−α)·θ_start + α·θ_tuned for each α, α chosen on validation, no retraining.

  θ_start is the initialised model (pretrained backbone + initial head). Records
  the whole curve (validation and eval) in ``entry['wise']``; returns the entry
  of the chosen α, whose eval score is the one the report uses.
  """
  t0 = time.perf_counter()
  start = distributed.put_replicated(flax.core.unfreeze(initialised[1])['params'], mesh)
  mix = rungs.wise_mix  # the one mix: predict and export rebuild the chosen α's model with it
  curve, logits = [], {}
  for alpha in config.wise:
    state = tuned.replace(params=mix(jnp.float32(alpha), start, tuned.params))
    top1, loss = val_score(apply_to_split(eval_fn, state, data.val, config.batch_size, mesh),
                           data.val.whole_labels)
    logits[alpha] = apply_to_split(eval_fn, state, data.eval, config.batch_size, mesh)
    curve.append((alpha, top1, loss,
                  float(np.mean(logits[alpha].argmax(-1) == data.eval.whole_labels))))
  chosen = max(curve, key=lambda c: (c[1], -c[2]))[0]
  entry['wise'] = {'alphas': [c[0] for c in curve], 'val_top1': [c[1] for c in curve],
                   'val_loss': [c[2] for c in curve], 'eval_top1': [c[3] for c in curve],
                   'selected_alpha': chosen}
  out = metrics_lib.classification(logits[chosen], data.eval.whole_labels, data.class_names)
  out.update({
      'wall_s': entry['wall_s'] + time.perf_counter() - t0,
      'cost': 'the fine-tune run it mixes, plus scoring every α on validation and eval (no '
              'retraining)',
      'trainable_params': entry['trainable_params'], 'selected': {'alpha': chosen},
      'head_init': config.head_init,  # the α curve is on the fine-tuned method's entry
  })
  return out

