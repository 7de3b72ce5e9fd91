"""Fine-tuning library: TrainState, pure jitted steps, data parallelism, checkpoints, metrics.

The majority of logic lives here so tests and notebooks can import it;
``finetune.train`` is only flags and one call to ``train_and_evaluate``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from finetune import groups
from finetune import input_pipeline
from finetune import model as model_lib
from clip_transfer import models
from clip_transfer.data import files as file_sources
from clip_transfer import flags
from clip_transfer.protocol import heads
from clip_transfer.protocol import linear
from clip_transfer.protocol import metrics as metrics_lib
from clip_transfer import outputs
from clip_transfer.data import preprocess
from clip_transfer.data import sources
from clip_transfer.protocol import validation
from clip_transfer.errors import UserError

log = logging.getLogger(__name__)

# Config fields that must not change between a run and its --resume.
RESUME_KEYS = ('dataset', 'class_names', 'image_column', 'label_column', 'label_field',
               'default_split', 'train_split', 'model', 'head_init', 'rules', 'backbone_lr_factor', 'epochs',
               'steps', 'batch_size', 'warmup', 'weight_decay', 'clip_norm', 'dtype',
               'augment', 'seed', 'limit_train', 'val_fraction', 'eval_every')
# Learning rates tried when --lr is not given (peak AdamW rates, after warmup). Wide on
# purpose: real CLIP weights want ~1e-5 for the backbone, a random or small model ~1e-3.
DEFAULT_LR_GRID = (1e-5, 1e-4, 1e-3)
HEAD_INITS = ('zeros', 'probe', 'zeroshot')
# What a fine-tune run writes in its workdir (the rest is the user's, and never touched).
OWNED_FILES = ('metrics.json', 'metrics.json.tmp', 'checkpoints/*', '.scratch-*')


@dataclasses.dataclass
class Config(file_sources.SourceOptions):
  """Everything a fine-tune run depends on; each field is also its CLI flag (clip_transfer.flags)."""

  dataset: str = flags.field('digits', "'digits', 'folder:PATH' or a TFDS name")
  data_dir: Optional[str] = flags.field(None, 'TFDS data_dir')
  train_split: str = flags.field('train', 'split trained on (and validated on: see --val_fraction)')
  eval_split: str = flags.field('test', 'split scored once, for the selected configuration')
  model: str = flags.field(models.DEFAULT_MODEL,
                           'hub id, save_pretrained directory, or random:tiny / random:vit-b32')
  modes: tuple[str, ...] = flags.field(('linear',), 'comma-separated: ' + ', '.join(groups.MODES)
                                       + '; each trained from the same pretrained weights',
                                       flag='mode')
  rules: Optional[str] = flags.field(
      None, 'mode custom: JSON (or a JSON file) [[regex, null|"frozen"|lr_mult > 0], …] over '
      "'/'-joined param paths, e.g. '[[\"backbone/.*\", null], [\"head/.*\", 1]]'")
  backbone_lr_factor: float = flags.field(0.1, 'mode differential: backbone lr = lr × this (> 0)')
  lr: tuple[float, ...] = flags.field(
      (), 'peak learning rates to try, comma-separated; the best (lr, step) on the validation '
      f'split wins (default: {",".join(map(str, DEFAULT_LR_GRID))}). Modes that train only the '
      'head are solved exactly instead (see --l2_grid)')
  l2_grid: tuple[float, ...] = flags.field(
      linear.DEFAULT_L2_GRID, 'head-only modes (linear, last:0): L2 strengths tried, as the probe')
  head_init: str = flags.field(
      'zeros', 'where the head starts: zeros (the Flax guide), probe:DIR (LP-FT: the head '
      'probe.train saved in DIR, its standardisation folded in) or zeroshot:DIR (the class text '
      'embeddings probe.zeroshot saved, on L2-normalised projected features)')
  wise: tuple[float, ...] = flags.field(
      (), 'WiSE-FT: mixing weights α in [0, 1] to try, e.g. 0,0.25,0.5,0.75,1; the model '
      '(1-α)·start + α·fine-tuned with the best α on validation is scored too')
  val_fraction: float = flags.field(validation.DEFAULT_FRACTION,
                                    'fraction of each train class held out to choose lr and step '
                                    '(the same examples the probe validates on)')
  epochs: float = flags.field(3.0, 'training length per configuration (ignored with --steps)')
  steps: Optional[int] = flags.field(None, 'total optimizer steps per configuration')
  eval_every: Optional[int] = flags.field(None, 'steps between validation scores (default: one '
                                          'epoch)')
  batch_size: int = flags.field(64, 'global batch, divisible by the number of local devices')
  warmup: float = flags.field(0.1, 'fraction of the steps spent warming up linearly from 0')
  weight_decay: float = flags.field(1e-4, 'AdamW decay, on kernels only')
  clip_norm: float = flags.field(1.0, 'global gradient norm clip (0 = off)')
  dtype: str = flags.field('float32', 'compute dtype (params stay float32)',
                           choices=tuple(models.DTYPES))
  augment: bool = flags.field(False, 'random shifts of up to 1/8 of the image')
  seed: int = flags.field(0, 'validation split, shuffling, augmentation and head init')
  num_classes: Optional[int] = flags.field(None, 'optional check: the dataset must have this many '
                                           'classes')
  limit_train: Optional[int] = flags.field(None, 'use only the first N training examples')
  limit_eval: Optional[int] = flags.field(None, 'use only the first N eval examples')
  resume: bool = flags.field(False, 'continue from the latest checkpoints in workdir')
  stop_after: Optional[int] = flags.field(None, 'stop (checkpointed) once a configuration has '
                                          'done this many steps; finish with --resume')
  log_every: int = flags.field(10, 'steps between progress-bar metric updates (each one syncs)')
  progress: bool = flags.field(True, 'progress bars on stderr')

  def __post_init__(self):
    """Every flag checked before any data or model is loaded."""
    self.modes = tuple(m.strip() for m in self.modes if m.strip())
    if not self.modes:
      raise UserError('no --mode given')
    for mode in self.modes:
      groups.check_mode(mode, self.rules)
    for name in ('lr', 'l2_grid'):
      bad = [v for v in getattr(self, name) if not (math.isfinite(v) and v > 0)]
      if bad:
        raise UserError(f'--{name} values must be finite and > 0, got {bad[0]}')
    if not self.l2_grid:
      raise UserError('--l2_grid is empty')
    if not 0 < self.val_fraction < 1:
      raise UserError(f'--val_fraction must be in (0, 1): lr and step are chosen on it, got '
                      f'{self.val_fraction}')
    if self.steps is not None and self.steps <= 0:
      raise UserError('--steps must be positive')
    if not (math.isfinite(self.epochs) and self.epochs > 0):
      raise UserError('--epochs must be positive')
    if self.eval_every is not None and self.eval_every < 1:
      raise UserError('--eval_every must be >= 1')
    if self.batch_size < 1:
      raise UserError(f'--batch_size must be >= 1, got {self.batch_size}')
    if not 0 <= self.warmup < 1 or self.weight_decay < 0 or self.clip_norm < 0:
      raise UserError('--warmup must be in [0, 1); --weight_decay and --clip_norm >= 0')
    if self.dtype not in models.DTYPES:
      raise UserError(f'--dtype {self.dtype!r}: choose float32 or bfloat16')
    if self.train_split == self.eval_split:
      raise UserError(f'--train_split and --eval_split are both {self.train_split!r}')
    kind, _, path = self.head_init.partition(':')
    if kind not in HEAD_INITS or (kind == 'zeros') != (not path):
      raise UserError(f'--head_init {self.head_init!r}: use zeros, probe:DIR or zeroshot:DIR')
    if path and not os.path.isdir(path):
      raise UserError(f'--head_init {self.head_init!r}: no such directory {path}')
    bad = [a for a in self.wise if not 0 <= a <= 1]
    if bad:
      raise UserError(f'--wise values must be in [0, 1], got {bad[0]}')

  def method_name(self, mode: str) -> str:
    """The metrics.json key: the mode, plus where the head started when not zeros."""
    kind = self.head_init.partition(':')[0]
    return mode if kind == 'zeros' else f'{mode}@{kind}'

  @property
  def lrs(self) -> tuple[float, ...]:
    return tuple(self.lr) or DEFAULT_LR_GRID


class TrainState(train_state.TrainState):
  """flax's TrainState plus the non-trained collections (e.g. batch_stats) of the backbone."""

  rest: Any = flax.struct.field(default_factory=dict)


# --------------------------------------------------------------------------
# Pure steps
# --------------------------------------------------------------------------


def train_step(state: TrainState, batch, *, trainable, pre: preprocess.PreprocessConfig):
  """One optimizer step: (state, {'image': uint8 NHWC, 'label'}) → (state, metrics)."""

  def loss_fn(params):
    # Frozen leaves are constants: JAX then skips their backward pass entirely
    # (linear mode costs about one forward), and their gradients are exact zeros.
    params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
    x = preprocess.normalize(batch['image'], pre)
    logits = state.apply_fn({'params': params, **state.rest}, x).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    return loss, logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  accuracy = (logits.argmax(-1) == batch['label']).mean()
  grad_norm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads)))
  return state, {'loss': loss, 'accuracy': accuracy, 'grad_norm': grad_norm}


def eval_step(state: TrainState, batch, *, pre: preprocess.PreprocessConfig):
  """Logits (float32) for a batch of uint8 images."""
  x = preprocess.normalize(batch['image'], pre)
  return state.apply_fn({'params': state.params, **state.rest}, x).astype(jnp.float32)


def make_mesh() -> Mesh:
  """A 1-D data-parallel mesh over all local devices."""
  return Mesh(np.array(jax.local_devices()), ('data',))


def jit_steps(mesh: Mesh, trainable, pre: preprocess.PreprocessConfig):
  """train/eval steps jitted for the mesh: batch sharded over 'data', state replicated."""
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  train = jax.jit(functools.partial(train_step, trainable=trainable, pre=pre),
                  in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, pre=pre), in_shardings=(repl, data),
                     out_shardings=data)
  return train, evaluate


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = mesh.size
  if batch_size < 1:
    raise UserError(f'--batch_size must be >= 1, got {batch_size}')
  if batch_size % n:
    raise UserError(f'--batch_size {batch_size} is not divisible by the {n} local devices; '
                    f'use a multiple of {n}')


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  return jax.device_put(batch, NamedSharding(mesh, P('data')))


# --------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------


def schedule_for(config: Config, lr: float, total_steps: int):
  warmup = int(round(config.warmup * total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=0.0)


def create_state(pretrained: models.Pretrained, num_classes: int, mode: str, config: Config,
                 total_steps: int, initialised=None, mesh: Optional[Mesh] = None,
                 lr: Optional[float] = None):
  """(TrainState with pretrained weights, trainable mask, groups.Plan) for one mode and lr.

  ``initialised``: a ``(model, variables)`` from ``model.create`` to reuse
  across modes (it is copied, never donated). With ``mesh`` the state is
  placed replicated on it, as the jitted step returns it (else the second step
  would compile again for the changed input shardings).
  """
  if initialised is None:
    initialised = model_lib.create(pretrained, num_classes, config.seed)
  model, variables = initialised
  # Copies: the train step donates the state's buffers.
  variables = jax.tree.map(jnp.copy, flax.core.unfreeze(variables))
  params = variables.pop('params')
  plan = groups.plan(mode, params, backbone_lr_factor=config.backbone_lr_factor,
                     custom_rules=config.rules)
  lr = config.lrs[0] if lr is None else lr
  tx = plan.optimizer(schedule_for(config, lr, total_steps), weight_decay=config.weight_decay,
                      clip_norm=config.clip_norm)
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rest=variables)
  state = state.replace(step=jnp.zeros((), jnp.int32))  # not a weak-typed Python int
  if mesh is not None:
    state = jax.device_put(state, NamedSharding(mesh, P()))
  return state, plan.trainable, plan


def total_steps_for(config: Config, num_train: int) -> int:
  per_epoch = input_pipeline.steps_per_epoch(num_train, config.batch_size)
  if config.steps is not None:
    return int(config.steps)
  return max(1, int(round(config.epochs * per_epoch)))


# --------------------------------------------------------------------------
# Checkpoints: per configuration, the latest state (resume) and the best on validation
# --------------------------------------------------------------------------


def checkpoint_dir(workdir: str, mode: str, lr: Optional[float] = None) -> str:
  """A mode's checkpoints, or one configuration's (``lr``) below it."""
  path = os.path.abspath(os.path.join(workdir, 'checkpoints', mode.replace(':', '_')))
  return path if lr is None else os.path.join(path, f'lr={lr:g}')


def _manager(path: str):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=1,
                                                                          create=True))


def _resume_config(config: Config) -> dict:
  return json.loads(json.dumps({k: getattr(config, k) for k in RESUME_KEYS}))


def _restore(path: str, state: TrainState, mesh: Mesh) -> TrainState:
  """The latest checkpoint in ``path`` restored into ``state``'s structure, replicated."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  mgr = _manager(path)
  step = mgr.latest_step()
  repl = NamedSharding(mesh, P())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), state)
  try:
    return mgr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # truncated files, wrong shapes, another model's checkpoint
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f'cannot read checkpoint {path}/{step} ({type(e).__name__}: {reason}); '
                    'delete it or run without --resume') from None
  finally:
    mgr.close()


@dataclasses.dataclass
class Checkpoints:
  """One configuration's directory: ``latest/`` (for --resume), ``best/``, ``curve.json``."""

  path: str

  def __post_init__(self):
    self.curve_file = os.path.join(self.path, 'curve.json')

  def start(self, config: Config) -> dict:
    """The saved curve when resuming (after checking the config), else a fresh directory."""
    if config.resume and os.path.exists(self.curve_file):
      with open(self.curve_file) as fh:
        saved = json.load(fh)
      now = _resume_config(config)
      diff = [k for k in RESUME_KEYS if saved['config'].get(k) != now.get(k)]
      if diff:
        k = diff[0]
        raise UserError(f'cannot --resume: {k} was {saved["config"].get(k)!r} in the '
                        f'checkpointed run, now {now.get(k)!r} (delete {self.path} to start over)')
      return saved
    if os.path.isdir(self.path):
      shutil.rmtree(self.path)  # a fresh run: never mix its checkpoints with an older run's
    os.makedirs(self.path)
    return {'config': _resume_config(config), 'curve': [], 'done': False, 'wall_s': 0.0}

  def save(self, record: dict, state: TrainState, best: bool) -> None:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    step = int(state.step)
    for name in ('latest',) + (('best',) if best else ()):
      mgr = _manager(os.path.join(self.path, name))
      try:
        mgr.save(step, args=ocp.args.StandardSave(state), force=True)
        mgr.wait_until_finished()
      finally:
        mgr.close()
    self.save_record(record)  # after the states: the curve never names a missing step

  def save_record(self, record: dict) -> None:
    tmp = self.curve_file + '.tmp'
    with open(tmp, 'w') as fh:
      json.dump(record, fh, indent=1)
    os.replace(tmp, self.curve_file)

  def has(self, which: str) -> bool:
    return os.path.isdir(os.path.join(self.path, which))

  def restore(self, which: str, state: TrainState, mesh: Mesh) -> TrainState:
    return _restore(os.path.join(self.path, which), state, mesh)


def load_checkpoint(workdir: str, mode: str, lr: float, which: str = 'latest') -> dict:
  """A configuration's saved state as a plain tree (for inspection and tests)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  mgr = _manager(os.path.join(checkpoint_dir(workdir, mode, lr), which))
  try:
    step = mgr.latest_step()
    if step is None:
      raise UserError(f'no checkpoint for mode {mode}, lr {lr:g} in {workdir}')
    return mgr.restore(step, args=ocp.args.StandardRestore())
  finally:
    mgr.close()


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def predict(fn, arg, split: input_pipeline.Split, batch_size: int, mesh: Mesh) -> np.ndarray:
  """``fn(arg, batch)`` (logits, features) for every example of ``split``, in its order."""
  out = []
  for batch in input_pipeline.eval_batches(split, batch_size):
    got = np.asarray(jax.device_get(fn(arg, shard_batch(batch, mesh))))
    out.append(got[batch['mask']])
  return np.concatenate(out)


def val_score(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  """(top-1, log-loss): the selection key, as the probe's (accuracy first, loss breaks ties)."""
  if not np.isfinite(logits).all():
    return 0.0, math.inf
  return linear.score(logits, labels)


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
  """The prepared splits of one run: fit and validation (from train), eval (sorted by id)."""

  fit: input_pipeline.Split
  val: input_pipeline.Split
  eval: input_pipeline.Split
  class_names: list
  validation: dict  # the record metrics.json carries
  wall_s: float  # reading + decoding + resizing, counted into every row's cost
  skipped: dict  # inputs found but unusable, per split ('train', 'eval')


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
  try:
    for step in range(start, end):
      batch = input_pipeline.train_batch(data.fit, config.batch_size, step, config.seed,
                                         config.augment)
      state, m = train_fn(state, shard_batch(batch, mesh))
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
        top1, loss = val_score(predict(eval_fn, state, data.val, config.batch_size, mesh),
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
  logits = predict(eval_fn, state, data.eval, config.batch_size, mesh)
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
    out[f'{name}+wise'] = wise_ft(entry, initialised, state, eval_fn, data, config, mesh)
  return out


def wise_ft(entry: dict, initialised, tuned: TrainState, eval_fn, data: Data, config: Config,
            mesh: Mesh) -> dict:
  """WiSE-FT: θ_α = (1−α)·θ_start + α·θ_tuned for each α, α chosen on validation, no retraining.

  θ_start is the initialised model (pretrained backbone + initial head). Records
  the whole curve (validation and eval) in ``entry['wise']``; returns the entry
  of the chosen α, whose eval score is the one the report uses.
  """
  t0 = time.perf_counter()
  repl = NamedSharding(mesh, P())
  start = jax.device_put(flax.core.unfreeze(initialised[1])['params'], repl)
  mix = jax.jit(lambda a, s, t: jax.tree.map(lambda x, y: ((1 - a) * x + a * y).astype(y.dtype),
                                             s, t))
  curve, logits = [], {}
  for alpha in config.wise:
    state = tuned.replace(params=mix(jnp.float32(alpha), start, tuned.params))
    top1, loss = val_score(predict(eval_fn, state, data.val, config.batch_size, mesh),
                           data.val.labels)
    logits[alpha] = predict(eval_fn, state, data.eval, config.batch_size, mesh)
    curve.append((alpha, top1, loss, float(np.mean(logits[alpha].argmax(-1) == data.eval.labels))))
  chosen = max(curve, key=lambda c: (c[1], -c[2]))[0]
  entry['wise'] = {'alphas': [c[0] for c in curve], 'val_top1': [c[1] for c in curve],
                   'val_loss': [c[2] for c in curve], 'eval_top1': [c[3] for c in curve],
                   'selected_alpha': chosen}
  out = metrics_lib.classification(logits[chosen], data.eval.labels, data.class_names)
  out.update({
      'wall_s': entry['wall_s'] + time.perf_counter() - t0,
      'cost': 'the fine-tune run it mixes, plus scoring every α on validation and eval (no '
              'retraining)',
      'trainable_params': entry['trainable_params'], 'selected': {'alpha': chosen},
      'head_init': config.head_init,  # the α curve is on the fine-tuned method's entry
  })
  return out


def _check_source_run(path: str, pretrained: models.Pretrained, class_names) -> None:
  """A head from another stage's run must come from the same weights and classes."""
  try:
    with open(os.path.join(path, 'metrics.json')) as fh:
      m = json.load(fh)
  except (OSError, ValueError) as e:
    raise UserError(f'--head_init: cannot read {path}/metrics.json ({type(e).__name__})') from None
  got = (m.get('model') or {}).get('weights_sha256')
  if got != pretrained.checksum():
    raise UserError(f'--head_init: {path} was made with other weights ({str(got)[:12]}…) than '
                    f'{pretrained.name} ({pretrained.checksum()[:12]}…)')
  if list(m.get('class_names') or []) != list(class_names):
    raise UserError(f'--head_init: {path} has classes {m.get("class_names")}, the dataset '
                    f'{list(class_names)}')


def initial_head(config: Config, pretrained: models.Pretrained,
                 class_names) -> tuple[Optional[tuple[np.ndarray, np.ndarray]], bool]:
  """((kernel, bias) or None, head on projected features?) from ``--head_init``."""
  kind, _, path = config.head_init.partition(':')
  if kind == 'zeros':
    return None, False
  _check_source_run(path, pretrained, class_names)
  try:
    if kind == 'probe':  # the probe's standardisation folded into the Dense head
      head = heads.load_head(path)  # the zero-shot-anchored probe's reads normalised projected
      return head.folded(), head.feature == 'projected'
    # Zero-shot: exp(logit_scale) · cos(image, class text) = a head on normalised features.
    return heads.load_zeroshot_head(path).dense(), True
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f'--head_init: cannot read the head in {path} ({type(e).__name__})') from None


def features(pretrained: models.Pretrained, splits: Sequence[input_pipeline.Split],
             batch_size: int, mesh: Mesh) -> list[np.ndarray]:
  """The frozen backbone's pooled features of every example (what the probe embeds), per split."""
  backbone, variables = pretrained.vision_tower()
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  pre = pretrained.preprocess
  # One jitted function for every split: one compilation for the fixed batch shape.
  fn = jax.jit(lambda v, b: backbone.apply(v, preprocess.normalize(b['image'], pre)).pooler_output
               .astype(jnp.float32), in_shardings=(repl, data), out_shardings=data)
  return [predict(fn, variables, split, batch_size, mesh) for split in splits]


def solve_head_only(plan: groups.Plan, pretrained: models.Pretrained, data: Data, config: Config,
                    mesh: Mesh) -> dict:
  """A mode that trains only the head is the probe's convex problem: solved as the probe solves it.

  Standardised frozen features, the L2 grid in one vmapped L-BFGS solve, the
  L2 chosen on the validation split, the standardisation folded into the
  Dense head — so `linear` here and `probe:jax` agree up to float noise.
  """
  t0 = time.perf_counter()
  x = dict(zip(('fit', 'val', 'eval'),
               features(pretrained, (data.fit, data.val, data.eval), config.batch_size, mesh)))
  fitted = linear.select_and_fit(linear.JaxMethod(), x['fit'], data.fit.labels, x['val'],
                                 data.val.labels, x['eval'], len(data.class_names),
                                 config.l2_grid, progress=config.progress)
  kernel, bias = heads.fold(fitted.kernel, fitted.bias, fitted.standardizer.mean,
                             fitted.standardizer.std)
  logits = x['eval'] @ kernel + bias  # = the Classifier with this head on the eval images
  entry = metrics_lib.classification(logits, data.eval.labels, data.class_names)
  entry.update({
      'wall_s': data.wall_s + time.perf_counter() - t0,
      'cost': 'its own data preparation, one frozen-backbone pass over fit/validation/eval and '
              'the exact solve of the L2 grid',
      'trainable_params': int(kernel.size + bias.size),
      'grid': list(config.l2_grid), 'selected': {'l2': fitted.l2}, 'sweep': fitted.sweep,
      'solver': 'lbfgs (exact, as the probe)', 'rules': [[r, s] for r, s in plan.rules],
  })
  return entry


def _write_metrics(workdir: str, header: dict, methods: dict) -> dict:
  """Merges into an existing metrics.json of the same run (other modes kept)."""
  path = os.path.join(workdir, 'metrics.json')
  header = json.loads(json.dumps(header))  # tuples → lists, as read back from the file
  out = {**header, 'methods': {}}
  if os.path.exists(path):
    try:
      with open(path) as fh:
        old = json.load(fh)
      same = all(old.get(k) == header[k] for k in ('dataset', 'model', 'num_train', 'num_eval',
                                                     'validation', 'eval'))
      if same:
        out['methods'] = dict(old.get('methods', {}))
    except (OSError, ValueError):
      pass  # unreadable: replace it
  out['methods'].update(methods)
  metrics_lib.write(workdir, out)
  return out


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
  return Data(train.subset(val.fit, 'fit'), train.subset(val.val, 'validation'),
              evaluation.sorted_by_id(), class_names, val.record, time.perf_counter() - t0,
              {'train': train.skipped, 'eval': evaluation.skipped})


def train_and_evaluate(config: Config, workdir: str) -> dict:
  """Fine-tunes ``config.modes`` one after another; returns (and writes) metrics.json."""
  mesh = make_mesh()
  check_batch_size(config.batch_size, mesh)
  # Refuses a file, a read-only directory or one holding files this tool did not write.
  outputs.prepare_output_dir(workdir, overwrite=True, kind='fine-tune workdir',
                             owned=OWNED_FILES, flag='--workdir', clear=False)
  source = sources.open_source(config.dataset, config.data_dir,
                               **file_sources.source_options(config))
  class_names = list(source.class_names)
  if config.num_classes is not None and config.num_classes != len(class_names):
    raise UserError(f'--num_classes {config.num_classes} but {config.dataset} has '
                    f'{len(class_names)} classes')
  for split in (config.train_split, config.eval_split):
    source.check_split(split)
  pretrained = models.load(config.model, config.dtype)
  head, projected = initial_head(config, pretrained, class_names)  # checked before the data
  with tempfile.TemporaryDirectory(dir=workdir, prefix='.scratch-') as scratch:
    data = prepare_data(source, pretrained, config, scratch)
    input_pipeline.steps_per_epoch(len(data.fit), config.batch_size)  # batch fits the data
    header = metrics_lib.header(
        'finetune',
        dataset={'spec': config.dataset, 'name': source.name, 'version': source.version,
                 'train_split': config.train_split, 'eval_split': config.eval_split},
        model={'name': pretrained.name, 'revision': pretrained.revision,
               'weights_sha256': pretrained.checksum(),
               'preprocess': pretrained.preprocess.to_json(), 'dtype': config.dtype},
        class_names=class_names, num_train=len(data.fit) + len(data.val),
        num_eval=len(data.eval), num_fit=len(data.fit), validation=data.validation,
        final_fit='fit', eval=validation.eval_record(data.eval.ids, data.eval.labels),
        skipped=data.skipped, data_wall_s=data.wall_s,
        devices={'count': mesh.size, 'platform': jax.local_devices()[0].platform})
    out = _write_metrics(workdir, header, {})
    initialised = model_lib.create(pretrained, len(class_names), config.seed, head=head,
                                   projected=projected)  # once for all modes
    params = flax.core.unfreeze(initialised[1])['params']
    for mode in config.modes:
      plan = groups.plan(mode, params, backbone_lr_factor=config.backbone_lr_factor,
                         custom_rules=config.rules)
      if head is None and plan.head_only(params):
        entries = {mode: solve_head_only(plan, pretrained, data, config, mesh)}
      else:
        entries = finetune_mode(mode, pretrained, data, config, workdir, mesh, initialised)
      if entries is not None:
        out = _write_metrics(workdir, header, entries)
  return out
