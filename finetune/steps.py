"""The pure jitted steps, the data-parallel mesh and the state they run on."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from finetune import groups
from finetune import input_pipeline
from finetune import model as model_lib
from finetune.config import Config
from clip_transfer import distributed
from clip_transfer import models
from clip_transfer.data import preprocess
from clip_transfer.errors import UserError
from clip_transfer.protocol import methods

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
  """A 1-D data-parallel mesh over every device of every process (the local ones for one)."""
  return distributed.mesh()


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
    where = ('local devices' if distributed.process_count() == 1 else
             f'devices of the {distributed.process_count()} processes')
    raise UserError(f'--batch_size {batch_size} is not divisible by the {n} {where}; '
                    f'use a multiple of {n}')


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """A batch (this process's rows of it, over several processes) → global arrays on ``mesh``."""
  return distributed.global_rows(batch, mesh)


def schedule_for(config: Config, total_steps: int):
  """The lr's shape over a configuration's steps: warmup then cosine decay, peak 1.

  The peak lr multiplies it inside the optimizer (``groups.Plan.optimizer``), as
  data: optax's schedule branches in Python on ``peak_value == 0``, which a traced
  peak cannot do.
  """
  warmup = int(round(config.warmup * total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=1.0, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=0.0)


@dataclasses.dataclass
class ModeSteps:
  """One mode's optimizer and jitted steps, built once for its whole (lr, weight decay) grid.

  The lr and weight decay are data in each state's opt_state, and every state's
  static part (apply_fn, tx) is this object's, so every configuration, the
  refit, the final eval and WiSE-FT run the same two compiled programs (a new
  tx or a new ``jax.jit`` per configuration would trace and compile again).
  """

  plan: groups.Plan
  model: Any  # the Classifier
  variables: Any  # its initialised variables (copied into each state, never donated)
  tx: optax.GradientTransformation
  mesh: Optional[Mesh]
  train: Any  # jitted train_step: (state, batch) → (state, metrics); None without a mesh
  evaluate: Any  # jitted eval_step: (state, batch) → logits; None without a mesh

  @property
  def trainable(self):
    return self.plan.trainable

  def state(self, lr: float, weight_decay: float) -> TrainState:
    """A fresh TrainState (pretrained weights, step 0) training at peak ``lr``, ``weight_decay``."""
    # Copies: the train step donates the state's buffers.
    variables = jax.tree.map(jnp.copy, flax.core.unfreeze(self.variables))
    params = variables.pop('params')
    state = TrainState.create(apply_fn=self.model.apply, params=params, tx=self.tx,
                              rest=variables)
    state = state.replace(step=jnp.zeros((), jnp.int32),  # not a weak-typed Python int
                          opt_state=groups.with_hyperparams(state.opt_state, lr, weight_decay))
    if self.mesh is not None:
      # Placed as the jitted step returns it (else the second step would compile again for
      # the changed input shardings).
      state = distributed.put_replicated(state, self.mesh)
    return state


def mode_steps(pretrained: models.Pretrained, num_classes: int, mode: str, config: Config,
               total_steps: int, initialised=None, mesh: Optional[Mesh] = None) -> ModeSteps:
  """``ModeSteps`` for one mode: its plan, its one optimizer, its steps jitted for ``mesh``.

  ``initialised``: a ``(model, variables)`` from ``model.create`` to reuse
  across modes (it is copied, never donated).
  """
  if initialised is None:
    initialised = model_lib.create(pretrained, num_classes, config.seed)
  model, variables = initialised
  params = flax.core.unfreeze(variables)['params']
  plan = groups.plan(mode, params, backbone_lr_factor=config.backbone_lr_factor,
                     custom_rules=config.rules)
  tx = plan.optimizer(schedule_for(config, total_steps), clip_norm=config.clip_norm)
  train, evaluate = (jit_steps(mesh, plan.trainable, pretrained.preprocess) if mesh is not None
                     else (None, None))
  return ModeSteps(plan, model, variables, tx, mesh, train, evaluate)


def create_state(pretrained: models.Pretrained, num_classes: int, mode: str, config: Config,
                 total_steps: int, initialised=None, mesh: Optional[Mesh] = None,
                 lr: Optional[float] = None, weight_decay: Optional[float] = None):
  """(TrainState with pretrained weights, trainable mask, groups.Plan) for one mode and lr.

  For one-off callers (tests, benchmarks); a sweep builds ``mode_steps`` once and
  asks it for each configuration's state. With ``mesh`` the state is placed
  replicated on it.
  """
  steps = mode_steps(pretrained, num_classes, mode, config, total_steps, initialised, mesh)
  lr = config.lrs[0] if lr is None else lr
  weight_decay = config.weight_decay[0] if weight_decay is None else weight_decay
  return steps.state(lr, weight_decay), steps.trainable, steps.plan


def legacy_checkpoint(metadata) -> bool:
  """True for a checkpoint (its Orbax tree metadata) written before the lr was data."""
  opt_state = metadata['opt_state']
  return not (isinstance(opt_state, dict) and 'hyperparams' in opt_state)


def legacy_layout(state: TrainState) -> TrainState:
  """``state`` as checkpoints written before the lr was data hold it (no hyperparams)."""
  # Plan.optimizer's inner transform is exactly the optimizer of those runs.
  return state.replace(opt_state=state.opt_state.inner_state)


def from_legacy(restored: TrainState, state: TrainState) -> TrainState:
  """A ``legacy_layout`` state restored from an old checkpoint, with ``state``'s hyperparams."""
  # The count (how many updates the wrapper saw) only feeds schedules given as hyperparams,
  # none here; still the true one: the step, copied (the train step donates both buffers).
  return restored.replace(opt_state=state.opt_state._replace(
      count=jnp.copy(restored.step), inner_state=restored.opt_state))


def total_steps_for(config: Config, num_train: int) -> int:
  per_epoch = input_pipeline.steps_per_epoch(num_train, config.batch_size)
  if config.steps is not None:
    return int(config.steps)
  return max(1, int(round(config.epochs * per_epoch)))


def apply_to_split(fn, arg, split: input_pipeline.Split, batch_size: int, mesh: Mesh) -> np.ndarray:
  """``fn(arg, batch)`` (logits, features) for every example of ``split``, in its order.

  Over several processes: every process's rows, gathered, on every process.
  """
  return split.gather(apply_to_rows(fn, arg, split, batch_size, mesh))


def apply_to_rows(fn, arg, split: input_pipeline.Split, batch_size: int, mesh: Mesh) -> np.ndarray:
  """``fn(arg, batch)`` for this process's rows of ``split`` (all of them for one process)."""
  out = []
  processes = distributed.process_count()
  if processes == 1:
    for batch in input_pipeline.eval_batches(split, batch_size):
      got = np.asarray(jax.device_get(fn(arg, shard_batch(batch, mesh))))
      out.append(got[batch['mask']])
    return np.concatenate(out)
  # Each process brings batch_size / P rows to every global batch (padding once its rows
  # run out), as many batches as the process with the most rows needs.
  per_process = batch_size // processes
  most = int(distributed.allgather(np.int64(len(split))).max())
  mine = range(distributed.process_index() * per_process,
               (distributed.process_index() + 1) * per_process)
  for batch in input_pipeline.eval_batches(split, per_process, -(-most // per_process)):
    got = distributed.process_rows(fn(arg, shard_batch(batch, mesh)), mine)
    out.append(got[batch['mask']])
  return np.concatenate(out)


def val_score(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  """(top-1, log-loss): the selection key, as the probe's (accuracy first, loss breaks ties)."""
  if not np.isfinite(logits).all():
    return 0.0, math.inf
  return methods.score(logits, labels)

