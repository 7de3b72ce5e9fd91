"""Fine-tuning library: TrainState, pure jitted steps, data parallelism, checkpoints, metrics.

The majority of logic lives here so tests and notebooks can import it;
``finetune.train`` is only flags and one call to ``train_and_evaluate``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import sys
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
from transfer import clip
from transfer import metrics as metrics_lib
from transfer import preprocess
from transfer import sources
from transfer.errors import UserError

log = logging.getLogger(__name__)

# Config fields that must not change between a run and its --resume.
RESUME_KEYS = ('dataset', 'train_split', 'model', 'rules', 'backbone_lr_factor', 'epochs',
               'steps', 'batch_size', 'lr', 'warmup', 'weight_decay', 'clip_norm', 'dtype',
               'augment', 'seed', 'limit_train')


@dataclasses.dataclass
class Config:
  """Everything a fine-tune run depends on (the CLI flags, one for one)."""

  dataset: str = 'digits'  # 'digits', 'folder:PATH' or a TFDS name
  data_dir: Optional[str] = None  # TFDS data_dir
  train_split: str = 'train'
  eval_split: str = 'test'
  model: str = clip.DEFAULT_MODEL  # hub id, save_pretrained dir or random:<preset>
  modes: Sequence[str] = ('linear',)  # each one trained from the same pretrained weights
  rules: Optional[str] = None  # JSON text or file for mode 'custom'
  backbone_lr_factor: float = 0.1  # mode 'differential': backbone lr = lr × this
  epochs: float = 3.0  # ignored when steps is set
  steps: Optional[int] = None  # total optimizer steps
  batch_size: int = 64  # global; split evenly over the local devices
  lr: float = 1e-3  # peak learning rate (after warmup)
  warmup: float = 0.1  # fraction of the steps spent warming up linearly from 0
  weight_decay: float = 1e-4  # AdamW decay, on kernels only
  clip_norm: float = 1.0  # global gradient norm clip (0 = off)
  dtype: str = 'float32'  # compute dtype: float32 or bfloat16 (params stay float32)
  augment: bool = False  # random shifts of up to 1/8 of the image
  seed: int = 0  # shuffling, augmentation and head init
  num_classes: Optional[int] = None  # must equal the dataset's classes when given
  limit_train: Optional[int] = None  # use only the first N training examples
  limit_eval: Optional[int] = None
  resume: bool = False  # continue from the latest checkpoint in workdir
  stop_after: Optional[int] = None  # stop (checkpointed) once this many steps are done
  checkpoint_every: Optional[int] = None  # steps between checkpoints (default: one epoch)
  log_every: int = 10  # steps between progress-bar metric updates (each one syncs)
  progress: bool = True


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


def rules_for(mode: str, params, config: Config) -> list[groups.Rule]:
  if mode == 'custom':
    if not config.rules:
      raise UserError('mode custom needs --rules (JSON text or a JSON file)')
    return groups.parse_rules(config.rules)
  return groups.mode_rules(mode, params, config.backbone_lr_factor)


def schedule_for(config: Config, total_steps: int):
  warmup = int(round(config.warmup * total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=0.0)


def create_state(pretrained: clip.Pretrained, num_classes: int, mode: str, config: Config,
                 total_steps: int, initialised=None, mesh: Optional[Mesh] = None):
  """(TrainState with pretrained weights, trainable mask, rules) for one mode.

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
  rules = rules_for(mode, params, config)
  trainable = groups.trainable_mask(params, rules)
  tx = groups.make_optimizer(params, rules, schedule_for(config, total_steps),
                             weight_decay=config.weight_decay, clip_norm=config.clip_norm)
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rest=variables)
  state = state.replace(step=jnp.zeros((), jnp.int32))  # not a weak-typed Python int
  if mesh is not None:
    state = jax.device_put(state, NamedSharding(mesh, P()))
  return state, trainable, rules


def total_steps_for(config: Config, num_train: int) -> int:
  per_epoch = input_pipeline.steps_per_epoch(num_train, config.batch_size)
  if config.steps is not None:
    if config.steps <= 0:
      raise UserError('--steps must be positive')
    return int(config.steps)
  if config.epochs <= 0:
    raise UserError('--epochs must be positive')
  return max(1, int(round(config.epochs * per_epoch)))


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------


def checkpoint_dir(workdir: str, mode: str) -> str:
  return os.path.abspath(os.path.join(workdir, 'checkpoints', mode.replace(':', '_')))


def _manager(path: str):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=2,
                                                                          create=True))


def _resume_config(config: Config) -> dict:
  return {k: getattr(config, k) for k in RESUME_KEYS}


def restore_state(path: str, state: TrainState, mesh: Mesh, config: Config) -> TrainState:
  """The latest checkpoint in ``path`` restored into ``state``'s structure, replicated."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  saved_cfg = os.path.join(path, 'config.json')
  if os.path.exists(saved_cfg):
    with open(saved_cfg) as fh:
      saved = json.load(fh)
    now = json.loads(json.dumps(_resume_config(config)))
    diff = [k for k in RESUME_KEYS if saved.get(k) != now.get(k)]
    if diff:
      k = diff[0]
      raise UserError(f'cannot --resume: {k} was {saved.get(k)!r} in the checkpointed run, '
                      f'now {now.get(k)!r} (delete {path} to start over)')
  mgr = _manager(path)
  step = mgr.latest_step()
  repl = NamedSharding(mesh, P())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), state)
  try:
    restored = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # truncated files, wrong shapes, another model's checkpoint
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f'cannot read checkpoint {path}/{step} ({type(e).__name__}: {reason}); '
                    'delete it or run without --resume') from None
  finally:
    mgr.close()
  return restored


def load_checkpoint(workdir: str, mode: str) -> dict:
  """The latest saved state of ``mode`` as a plain tree (for inspection and tests)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  mgr = _manager(checkpoint_dir(workdir, mode))
  try:
    step = mgr.latest_step()
    if step is None:
      raise UserError(f'no checkpoint for mode {mode} in {workdir}')
    return mgr.restore(step, args=ocp.args.StandardRestore())
  finally:
    mgr.close()


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def train_mode(mode: str, pretrained: clip.Pretrained, train: input_pipeline.Split,
               evaluation: input_pipeline.Split, class_names: Sequence[str], config: Config,
               workdir: str, mesh: Mesh, initialised=None) -> Optional[dict]:
  """Trains and evaluates one mode; returns its metrics entry (None if stopped early)."""
  t0 = time.perf_counter()
  total = total_steps_for(config, len(train))
  per_epoch = input_pipeline.steps_per_epoch(len(train), config.batch_size)
  state, trainable, rules = create_state(pretrained, len(class_names), mode, config, total,
                                         initialised, mesh)
  n_trainable = groups.count(state.params, trainable)

  path = checkpoint_dir(workdir, mode)
  if config.resume and os.path.isdir(path):
    state = restore_state(path, state, mesh, config)
    log.info('%s: resumed from step %d', mode, int(state.step))
  elif os.path.isdir(path):
    shutil.rmtree(path)  # a fresh run: never mix its checkpoints with an older run's
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as fh:
    json.dump(_resume_config(config), fh, indent=1)
  start = int(state.step)
  end = total if config.stop_after is None else min(total, max(config.stop_after, start))
  every = config.checkpoint_every or per_epoch

  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mgr = _manager(path)
  train_fn, eval_fn = jit_steps(mesh, trainable, pretrained.preprocess)
  last = {}
  t_steady, steady_steps = None, 0
  bar = tqdm.tqdm(total=total, initial=start, desc=f'finetune {mode}', unit='step',
                  file=sys.stderr, disable=not config.progress, dynamic_ncols=True)
  try:
    for step in range(start, end):
      batch = input_pipeline.train_batch(train, config.batch_size, step, config.seed,
                                         config.augment)
      state, m = train_fn(state, shard_batch(batch, mesh))
      if step == start:  # the first step compiles: time the rest
        jax.block_until_ready(state)
        t_steady = time.perf_counter()
      else:
        steady_steps += 1
      done = step + 1
      if done % config.log_every == 0 or done == end:
        last = {k: float(v) for k, v in jax.device_get(m).items()}
        bar.set_postfix(loss=f'{last["loss"]:.4f}', acc=f'{last["accuracy"]:.3f}')
      if done % every == 0 or done == end:
        mgr.save(done, args=ocp.args.StandardSave(state), force=True)
      bar.update(1)
    jax.block_until_ready(state)
    t_train_end = time.perf_counter()
    mgr.wait_until_finished()
  finally:
    bar.close()
    mgr.close()
  if end < total:
    log.warning('%s: stopped after step %d of %d; continue with --resume', mode, end, total)
    return None
  images_per_s = None
  if steady_steps and t_steady is not None:
    images_per_s = steady_steps * config.batch_size / (t_train_end - t_steady)

  t_eval = time.perf_counter()
  logits, labels = [], []
  for batch in input_pipeline.eval_batches(evaluation, config.batch_size):
    out = np.asarray(jax.device_get(eval_fn(state, shard_batch(batch, mesh))))
    logits.append(out[batch['mask']])
    labels.append(batch['label'][batch['mask']])
  entry = metrics_lib.classification(np.concatenate(logits), np.concatenate(labels), class_names)
  now = time.perf_counter()
  entry.update({
      'wall_s': now - t0,
      'train_wall_s': t_train_end - t0,
      'eval_wall_s': now - t_eval,
      'trainable_params': n_trainable,
      'total_params': groups.count(state.params),
      'images_per_s': images_per_s,
      'steps': total,
      'epochs': total / per_epoch,
      'batch_size': config.batch_size,
      'lr': config.lr,
      'backbone_lr_factor': config.backbone_lr_factor if mode == 'differential' else None,
      'rules': [[r, s] for r, s in rules],
      'final_train_loss': last.get('loss'),
      'final_train_accuracy': last.get('accuracy'),
  })
  log.info('%s: top1 %.4f, %s trainable params, %.1f s', mode, entry['top1'], n_trainable,
           entry['wall_s'])
  return entry


def _write_metrics(workdir: str, header: dict, methods: dict) -> dict:
  """Merges into an existing metrics.json of the same dataset/model (other modes kept)."""
  path = os.path.join(workdir, 'metrics.json')
  header = json.loads(json.dumps(header))  # tuples → lists, as read back from the file
  out = {**header, 'methods': {}}
  if os.path.exists(path):
    try:
      with open(path) as fh:
        old = json.load(fh)
      same = all(old.get(k) == header[k] for k in ('dataset', 'model', 'num_train', 'num_eval'))
      if same:
        out['methods'] = dict(old.get('methods', {}))
    except (OSError, ValueError):
      pass  # unreadable: replace it
  out['methods'].update(methods)
  tmp = path + '.tmp'
  with open(tmp, 'w') as fh:
    json.dump(out, fh, indent=1)
  os.replace(tmp, path)  # readers never see a half-written file
  return out


def validate_modes(config: Config) -> None:
  if not config.modes:
    raise UserError('no --mode given')
  for mode in config.modes:
    if mode == 'custom':
      if not config.rules:
        raise UserError('mode custom needs --rules (JSON text or a JSON file)')
      groups.parse_rules(config.rules)
    elif mode.startswith('last:'):
      if not mode[len('last:'):].isdigit():
        raise UserError(f'mode {mode!r}: expected last:N with an integer N, e.g. last:2')
    elif mode not in ('linear', 'full', 'differential'):
      raise UserError(f'unknown mode {mode!r}; choose from {", ".join(groups.MODES)}')


def train_and_evaluate(config: Config, workdir: str) -> dict:
  """Fine-tunes ``config.modes`` one after another; returns (and writes) metrics.json."""
  validate_modes(config)  # fail on a typo before minutes of data loading
  if config.dtype not in clip.DTYPES:
    raise UserError(f'--dtype {config.dtype!r}: choose float32 or bfloat16')
  mesh = make_mesh()
  check_batch_size(config.batch_size, mesh)
  os.makedirs(workdir, exist_ok=True)

  source = sources.open_source(config.dataset, config.data_dir)
  class_names = list(source.class_names)
  if config.num_classes is not None and config.num_classes != len(class_names):
    raise UserError(f'--num_classes {config.num_classes} but {config.dataset} has '
                    f'{len(class_names)} classes')
  pretrained = clip.load(config.model, config.dtype)
  t_data = time.perf_counter()
  cache = os.path.join(workdir, 'cache')
  train = input_pipeline.load_split(source, config.train_split, pretrained.preprocess,
                                    config.limit_train, cache, progress=config.progress)
  evaluation = input_pipeline.load_split(source, config.eval_split, pretrained.preprocess,
                                         config.limit_eval, cache, progress=config.progress)
  for split in (train, evaluation):
    input_pipeline.check_labels(split, len(class_names))
  data_wall_s = time.perf_counter() - t_data

  header = {
      'stage': 'finetune',
      'num_train': len(train),
      'num_eval': len(evaluation),
      'num_classes': len(class_names),
      'class_names': class_names,
      'dataset': {'spec': config.dataset, 'name': source.name, 'version': source.version,
                  'train_split': config.train_split, 'eval_split': config.eval_split,
                  'skipped': {'train': train.skipped, 'eval': evaluation.skipped}},
      'model': {'name': pretrained.name, 'revision': pretrained.revision,
                'checksum': pretrained.checksum(),
                'preprocess': pretrained.preprocess.to_json(), 'dtype': config.dtype},
      'devices': {'count': mesh.size, 'platform': jax.local_devices()[0].platform},
      'data_wall_s': data_wall_s,
  }
  out = _write_metrics(workdir, header, {})
  initialised = model_lib.create(pretrained, len(class_names), config.seed)  # once for all modes
  for mode in config.modes:
    entry = train_mode(mode, pretrained, train, evaluation, class_names, config, workdir, mesh,
                       initialised)
    if entry is not None:
      out = _write_metrics(workdir, header, {mode: entry})
  return out
