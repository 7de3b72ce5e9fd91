"""The sweep over one mode's configurations: train each (lr, weight decay), pick the best step on validation, score eval once."""

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
from clip_transfer.protocol.rungs import config_key
from finetune.checkpoints import Checkpoints, checkpoint_dir
from finetune.config import Config
from finetune.splits import Data
from finetune.steps import ModeSteps, apply_to_split, mode_steps, shard_batch, total_steps_for, val_score
from clip_transfer import models
from clip_transfer.errors import UserError
from clip_transfer.protocol import metrics as metrics_lib

log = logging.getLogger(__name__)

def train_config(mode: str, lr: float, wd: float, steps: ModeSteps, data: Data, config: Config,
                 workdir: str, mesh: Mesh) -> Optional[dict]:
  """Trains one (mode, lr, weight decay) with validation scores along the way; None when stopped early."""
  t0 = time.perf_counter()
  total = total_steps_for(config, data.fit.num_whole)
  every = config.eval_every or input_pipeline.steps_per_epoch(data.fit.num_whole,
                                                                config.batch_size)
  state = steps.state(lr, wd)
  swept = wd if config.decay_axis else None  # one weight decay: the folders and keys of old runs
  ckpt = Checkpoints(checkpoint_dir(workdir, config.method_name(mode), lr, swept))
  what = f'{mode} lr {config_key(lr, swept)}'  # for the log
  record = ckpt.start(config, wd)
  if record['done']:
    return record
  train_fn, eval_fn = steps.train, steps.evaluate  # the mode's: compiled once for the grid
  best = max((p['val_top1'], -p['val_loss']) for p in record['curve']) if record['curve'] else None

  def score(state, done: int) -> None:
    """The validation point at step ``done``, then the state (latest, best if better) and curve."""
    nonlocal best, t0
    top1, loss = val_score(apply_to_split(eval_fn, state, data.val, config.batch_size, mesh),
                           data.val.whole_labels)
    record['curve'].append({'step': done, 'val_top1': top1, 'val_loss': loss})
    improved = best is None or (top1, -loss) > best
    best = max(best, (top1, -loss)) if best is not None else (top1, -loss)
    record['done'] = done == total
    record['wall_s'] += time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpt.save(record, state, improved)

  if config.resume and ckpt.has('latest'):
    state = ckpt.restore('latest', state, mesh)
    restored = int(state.step)
    log.info('%s: resumed from step %d', what, restored)
    if (restored and (restored % every == 0 or restored == total)
        and restored not in {p['step'] for p in record['curve']}):
      # Killed after this step's state was saved but before its validation point was: score
      # the restored state again (the same weights, the same numbers), so the curve, best/
      # and the selection are an uninterrupted run's.
      log.info('%s: step %d was saved without its validation score; scoring it', what, restored)
      score(state, restored)
  start = int(state.step)
  end = total if config.stop_after is None else min(total, max(config.stop_after, start))
  bar = tqdm.tqdm(total=total, initial=start, desc=f'finetune {what}', unit='step',
                  file=sys.stderr, disable=not config.progress, dynamic_ncols=True)
  t_steady, steady, t_scoring = None, 0, 0.0  # scoring: validation + checkpoints, not training
  batches = input_pipeline.Prefetch(data.fit, config.batch_size, start, end, config.seed,
                                    config.augment, place=lambda b: shard_batch(b, mesh),
                                    shards=data.fit.shards)
  try:
    for step, batch in zip(range(start, end), batches):
      state, m = train_fn(state, batch)
      if step == start:  # the mode's first step compiles (its first configuration's): time the rest
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
        score(state, done)
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
    log.warning('%s: the loss became NaN/inf at step %d; configuration dropped', what,
                record['diverged_at_step'])
    record['done'] = True
    record['wall_s'] += time.perf_counter() - t0
    ckpt.save_record(record)  # a resumed run does not train it again
    return record
  if end < total:
    log.warning('%s: stopped after step %d of %d; continue with --resume', what, end,
                total)
    return None
  return record


def refit(mode: str, lr: float, wd: float, num_steps: int, steps: ModeSteps, data: Data,
          config: Config, mesh: Mesh):
  """The chosen configuration trained again on fit ∪ validation for its chosen ``num_steps``.

  The same schedule (its length is the sweep's), seed and compiled step; no
  validation scores, since there is no held-out data left to score.
  """
  state = steps.state(lr, wd)
  for step in tqdm.trange(num_steps, desc=f'finetune {mode} final fit', unit='step', file=sys.stderr,
                          disable=not config.progress, dynamic_ncols=True):
    batch = input_pipeline.train_batch(data.fit_and_val, config.batch_size, step, config.seed,
                                       config.augment, data.fit_and_val.shards)
    state, _ = steps.train(state, shard_batch(batch, mesh))
  return state


def finetune_mode(mode: str, pretrained: models.Pretrained, data: Data, config: Config,
                  workdir: str, mesh: Mesh, initialised) -> Optional[dict]:
  """Every (lr, weight decay) of the grid, the best (lr, wd, step) on validation, eval scored once.

  Returns ``{name: entry}`` (plus ``name+wise`` with ``--wise``), None when stopped early.
  """
  t0 = time.perf_counter()
  # Once for the mode: the lr and weight decay are data in each configuration's state.
  steps = mode_steps(pretrained, len(data.class_names), mode, config,
                     total_steps_for(config, data.fit.num_whole), initialised, mesh)
  records = {}
  for lr, wd in config.configurations():
    record = train_config(mode, lr, wd, steps, data, config, workdir, mesh)
    if record is None:
      return None  # stopped early (--stop_after): resume finishes the grid
    records[lr, wd] = record
  scored = [(p['val_top1'], -p['val_loss'], lr, wd, p['step'])
            for (lr, wd), r in records.items() if 'diverged_at_step' not in r for p in r['curve']]
  if not scored:
    raise UserError(f'mode {mode}: every learning rate diverged (NaN/inf loss) '
                    f'({", ".join(f"{lr:g}" for lr in config.lrs)}); try smaller --lr values')
  # Ties: the smaller lr, then the smaller weight decay.
  _, _, lr, wd, step = max(scored, key=lambda s: (s[0], s[1], -s[2], -s[3]))
  swept = wd if config.decay_axis else None
  name = config.method_name(mode)
  ckpt = Checkpoints(checkpoint_dir(workdir, name, lr, swept))
  if config.final_fit == 'fit+validation':
    # The chosen configuration again, from the start, on fit ∪ validation.
    state = refit(mode, lr, wd, step, steps, data, config, mesh)
    ckpt.save_final(state)
  else:
    state = ckpt.restore('best', steps.state(lr, wd), mesh)
  key = lambda lr_wd: config_key(lr_wd[0], lr_wd[1] if config.decay_axis else None)
  eval_fn, trainable, plan = steps.evaluate, steps.trainable, steps.plan
  t_eval = time.perf_counter()
  logits = apply_to_split(eval_fn, state, data.eval, config.batch_size, mesh)
  entry = metrics_lib.classification(logits, data.eval.whole_labels, data.class_names)
  now = time.perf_counter()
  sweep_s = sum(r['wall_s'] for r in records.values())
  entry.update({
      # The sweep's own clock survives --resume (curve.json); this call's covers the eval too.
      'wall_s': data.wall_s + max(now - t0, sweep_s),
      'cost': 'its own data preparation, every configuration of the lr (× weight decay) grid '
              '(with validation scoring) and the one eval pass',
      'eval_wall_s': now - t_eval,
      'trainable_params': groups.count(state.params, trainable),
      'total_params': groups.count(state.params),
      'images_per_s': records[lr, wd].get('images_per_s'),
      'grid': [float(v) for v in config.lrs], 'weight_decay_grid': list(config.weight_decay),
      'selected': {'lr': lr, 'step': step, **({'weight_decay': wd} if config.decay_axis else {})},
      'weight_decay': wd,
      'curves': {key(k): r['curve'] for k, r in records.items()},
      'diverged': {key(k): r['diverged_at_step'] for k, r in records.items()
                   if 'diverged_at_step' in r},
      'config_wall_s': {key(k): r['wall_s'] for k, r in records.items()},
      'steps': total_steps_for(config, data.fit.num_whole), 'batch_size': config.batch_size,
      'backbone_lr_factor': config.backbone_lr_factor if mode == 'differential' else None,
      'rules': [[r, s] for r, s in plan.rules], 'head_init': config.head_init,
      'final_fit': config.final_fit,
  })
  out = {name: entry}
  if config.wise:
    out[config.method_name(mode, wise=True)] = wise.wise_ft(entry, initialised, state, eval_fn, data, config, mesh)
  return out

