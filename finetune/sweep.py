"""The sweep over one mode's configurations: train each lr, pick (lr, step) on validation, score eval once."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Optional

import jax
import tqdm
from jax.sharding import Mesh

from finetune import groups
from finetune import input_pipeline
from finetune import wise
from finetune.checkpoints import Checkpoints, checkpoint_dir
from finetune.config import Config
from finetune.splits import Data
from finetune.steps import apply_to_split, create_state, jit_steps, shard_batch, total_steps_for, val_score
from clip_transfer import models
from clip_transfer.errors import UserError
from clip_transfer.protocol import metrics as metrics_lib

log = logging.getLogger(__name__)

def train_config(mode: str, lr: float, pretrained: models.Pretrained, data: Data, config: Config,
                 workdir: str, mesh: Mesh, initialised) -> Optional[dict]:
  """Trains one (mode, lr) with validation scores along the way; None when stopped early."""
  t0 = time.perf_counter()
  total = total_steps_for(config, len(data.fit))
  every = config.eval_every or input_pipeline.steps_per_epoch(len(data.fit), config.batch_size)
  state, trainable, _ = create_state(pretrained, len(data.class_names), mode, config, total,
                                     initialised, mesh, lr)
  ckpt = Checkpoints(checkpoint_dir(workdir, config.method_name(mode), lr))
  record = ckpt.start(config)
  if record['done']:
    return record
  if config.resume and ckpt.has('latest'):
    state = ckpt.restore('latest', state, mesh)
    log.info('%s lr %g: resumed from step %d', mode, lr, int(state.step))
  start = int(state.step)
  end = total if config.stop_after is None else min(total, max(config.stop_after, start))
  train_fn, eval_fn = jit_steps(mesh, trainable, pretrained.preprocess)
  best = max((p['val_top1'], -p['val_loss']) for p in record['curve']) if record['curve'] else None
  bar = tqdm.tqdm(total=total, initial=start, desc=f'finetune {mode} lr={lr:g}', unit='step',
                  file=sys.stderr, disable=not config.progress, dynamic_ncols=True)
  t_steady, steady, t_scoring = None, 0, 0.0  # scoring: validation + checkpoints, not training
  batches = input_pipeline.Prefetch(data.fit, config.batch_size, start, end, config.seed,
                                    config.augment, place=lambda b: shard_batch(b, mesh))
  try:
    for step, batch in zip(range(start, end), batches):
      state, m = train_fn(state, batch)
      if step == start:  # the first step compiles: time the rest
        jax.block_until_ready(state)
        t_steady = time.perf_counter()
      else:
        steady += 1
      done = step + 1
      bar.update(1)
      if done % config.log_every == 0 or done % every == 0 or done == end:
        last = {k: float(v) for k, v in jax.device_get(m).items()}
        bar.set_postfix(loss=f'{last["loss"]:.4f}', acc=f'{last["accuracy"]:.3f}')
        if not math.isfinite(last['loss']):
          record['diverged_at_step'] = done  # NaN/inf: this configuration is over
          break
      if done % every == 0 or done == total:
        t_score = time.perf_counter()
        top1, loss = val_score(apply_to_split(eval_fn, state, data.val, config.batch_size, mesh),
                               data.val.labels)
        record['curve'].append({'step': done, 'val_top1': top1, 'val_loss': loss})
        improved = best is None or (top1, -loss) > best
        best = max(best, (top1, -loss)) if best is not None else (top1, -loss)
        record['done'] = done == total
        record['wall_s'] += time.perf_counter() - t0
        t0 = time.perf_counter()
        ckpt.save(record, state, improved)
        t_scoring += time.perf_counter() - t_score
      elif done == end:  # stopping early: keep the state for --resume
        ckpt.save(record, state, best=False)
    jax.block_until_ready(state)
  finally:
    batches.close()
    bar.close()
  if steady and t_steady is not None:
    record['images_per_s'] = steady * config.batch_size / (
        time.perf_counter() - t_steady - t_scoring)
  if 'diverged_at_step' in record:
    log.warning('%s lr %g: the loss became NaN/inf at step %d; configuration dropped', mode, lr,
                record['diverged_at_step'])
    record['done'] = True
    record['wall_s'] += time.perf_counter() - t0
    ckpt.save_record(record)  # a resumed run does not train it again
    return record
  if end < total:
    log.warning('%s lr %g: stopped after step %d of %d; continue with --resume', mode, lr, end,
                total)
    return None
  return record


def finetune_mode(mode: str, pretrained: models.Pretrained, data: Data, config: Config,
                  workdir: str, mesh: Mesh, initialised) -> Optional[dict]:
  """Every lr of the grid, the best (lr, step) on validation, the eval split scored once.

  Returns ``{name: entry}`` (plus ``name+wise`` with ``--wise``), None when stopped early.
  """
  t0 = time.perf_counter()
  records = {}
  for lr in config.lrs:
    record = train_config(mode, lr, pretrained, data, config, workdir, mesh, initialised)
    if record is None:
      return None  # stopped early (--stop_after): resume finishes the grid
    records[lr] = record
  scored = [(p['val_top1'], -p['val_loss'], lr, p['step'])
            for lr, r in records.items() if 'diverged_at_step' not in r for p in r['curve']]
  if not scored:
    raise UserError(f'mode {mode}: every learning rate diverged (NaN/inf loss) '
                    f'({", ".join(f"{lr:g}" for lr in records)}); try smaller --lr values')
  _, _, lr, step = max(scored, key=lambda s: (s[0], s[1], -s[2]))
  state, trainable, plan = create_state(pretrained, len(data.class_names), mode, config,
                                        total_steps_for(config, len(data.fit)), initialised,
                                        mesh, lr)
  name = config.method_name(mode)
  state = Checkpoints(checkpoint_dir(workdir, name, lr)).restore('best', state, mesh)
  _, eval_fn = jit_steps(mesh, trainable, pretrained.preprocess)
  t_eval = time.perf_counter()
  logits = apply_to_split(eval_fn, state, data.eval, config.batch_size, mesh)
  entry = metrics_lib.classification(logits, data.eval.labels, data.class_names)
  now = time.perf_counter()
  sweep_s = sum(r['wall_s'] for r in records.values())
  entry.update({
      # The sweep's own clock survives --resume (curve.json); this call's covers the eval too.
      'wall_s': data.wall_s + max(now - t0, sweep_s),
      'cost': 'its own data preparation, every configuration of the lr grid (with validation '
              'scoring) and the one eval pass',
      'eval_wall_s': now - t_eval,
      'trainable_params': groups.count(state.params, trainable),
      'total_params': groups.count(state.params),
      'images_per_s': records[lr].get('images_per_s'),
      'grid': [float(v) for v in records], 'selected': {'lr': lr, 'step': step},
      'curves': {f'{k:g}': r['curve'] for k, r in records.items()},
      'diverged': {f'{k:g}': r['diverged_at_step'] for k, r in records.items()
                   if 'diverged_at_step' in r},
      'config_wall_s': {f'{k:g}': r['wall_s'] for k, r in records.items()},
      'steps': total_steps_for(config, len(data.fit)), 'batch_size': config.batch_size,
      'backbone_lr_factor': config.backbone_lr_factor if mode == 'differential' else None,
      'rules': [[r, s] for r, s in plan.rules], 'head_init': config.head_init,
  })
  out = {name: entry}
  if config.wise:
    out[f'{name}+wise'] = wise.wise_ft(entry, initialised, state, eval_fn, data, config, mesh)
  return out

