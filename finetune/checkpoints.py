"""Orbax checkpoints per configuration (latest for --resume, best on validation) and resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Optional

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from finetune.config import Config, RESUME_KEYS
from finetune import steps
from finetune.steps import TrainState
from clip_transfer import distributed
from clip_transfer.errors import UserError
from clip_transfer.protocol import rungs

log = logging.getLogger(__name__)

# What a configuration's directory holds: Orbax's folders and the curve (fnmatch patterns
# relative to the workdir; '*' crosses '/'). Only these are ever removed.
BEST_TMP = 'best.tmp'  # best/'s next step while its files are linked in (Checkpoints.save)
SAVED = ('latest', 'best', BEST_TMP, 'final', 'curve.json', 'curve.json.tmp')
OWNED_FILES = ('checkpoints/*/lr=*/curve.json', 'checkpoints/*/lr=*/curve.json.tmp',
               'checkpoints/*/lr=*/latest/*', 'checkpoints/*/lr=*/best/*',
               f'checkpoints/*/lr=*/{BEST_TMP}/*',
               'checkpoints/*/lr=*/final/*',
               'checkpoints/*/lr=*/')  # the empty folder of a configuration killed before it saved


def checkpoint_dir(workdir: str, mode: str, lr: Optional[float] = None,
                   weight_decay: Optional[float] = None) -> str:
  """A mode's checkpoints, or one configuration's (``lr``, swept ``weight_decay``) below it."""
  # The layout's one home is the library: pipelines.predict and finetune.export read it too.
  return rungs.checkpoint_dir(workdir, mode, lr, weight_decay)


def _manager(path: str):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  # The handler named: item_metadata (the saved tree's layout) needs it.
  return ocp.CheckpointManager(path, item_handlers=ocp.StandardCheckpointHandler(),
                               options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))


def _link_or_copy(src: str, dst: str) -> None:
  # Orbax never rewrites a committed step's files (a new step is a new folder), so latest/
  # and best/ may share them; a filesystem without hard links gets copies.
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


def _resume_config(config: Config, weight_decay: float) -> dict:
  # The configuration's own weight decay, as one number (as files from before the grid say it).
  return json.loads(json.dumps({**{k: getattr(config, k) for k in RESUME_KEYS},
                                'weight_decay': weight_decay}))


def _restore(path: str, state: TrainState, mesh: Mesh) -> TrainState:
  """The latest checkpoint in ``path`` restored into ``state``'s structure, replicated."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  mgr = _manager(path)
  step = mgr.latest_step()
  repl = NamedSharding(mesh, P())
  abstract = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), tree)
  try:
    if steps.legacy_checkpoint(mgr.item_metadata(step)):
      # Written before the lr and weight decay were data in the optimizer state: its state
      # is the inner one of today's, restored as such; lr and decay are this run's (the same,
      # as Checkpoints.start checked).
      log.info('%s/%d: an optimizer state from before the lr was data; carried over', path, step)
      legacy = mgr.restore(step, args=ocp.args.StandardRestore(abstract(
          steps.legacy_layout(state))))
      return steps.from_legacy(legacy, state)
    return mgr.restore(step, args=ocp.args.StandardRestore(abstract(state)))
  except Exception as e:  # truncated files, wrong shapes, another model's checkpoint
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f'cannot read checkpoint {path}/{step} ({type(e).__name__}: {reason}); '
                    'delete it or run without --resume') from None
  finally:
    mgr.close()


@dataclasses.dataclass
class Checkpoints:
  """One configuration's directory: ``latest/`` (for --resume), ``best/``, ``curve.json``.

  Over several processes every one calls ``save`` and ``restore`` (Orbax writes
  and reads a global state together); process 0 alone clears the directory and
  writes ``curve.json``. The workdir must be one filesystem every process sees.
  """

  path: str

  def __post_init__(self):
    self.curve_file = os.path.join(self.path, 'curve.json')

  def start(self, config: Config, weight_decay: float) -> dict:
    """The saved curve when resuming (after checking the config), else a fresh directory."""
    if config.resume and os.path.exists(self.curve_file):
      with open(self.curve_file) as fh:
        saved = json.load(fh)
      now = _resume_config(config, weight_decay)
      diff = [k for k in RESUME_KEYS if saved['config'].get(k) != now.get(k)]
      if diff:
        k = diff[0]
        raise UserError(f'cannot --resume: {k} was {saved["config"].get(k)!r} in the '
                        f'checkpointed run, now {now.get(k)!r} (delete {self.path} to start over)')
      return saved
    distributed.on_writer(self._clear)  # the others wait: nothing of theirs is removed
    return {'config': _resume_config(config, weight_decay), 'curve': [], 'done': False,
            'wall_s': 0.0}

  def _clear(self) -> None:
    for name in SAVED:  # a fresh run: never mix its checkpoints with an older run's
      path = os.path.join(self.path, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
    os.makedirs(self.path, exist_ok=True)

  def save(self, record: dict, state: TrainState, best: bool) -> None:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    step = int(state.step)
    mgr = _manager(os.path.join(self.path, 'latest'))
    try:
      if mgr.latest_step() != step:  # else saved before a crash cut the curve's write: keep it
        mgr.save(step, args=ocp.args.StandardSave(state), force=True)
        mgr.wait_until_finished()
    finally:
      mgr.close()
    if best:
      # best/ holds the very state latest/ now holds: its files linked, not a second save (an
      # Orbax save is most of a small run's checkpoint time and a big model's disk).
      distributed.on_writer(self._link_best, step)
    self.save_record(record)  # after the states: the curve never names a missing step

  def _link_best(self, step: int) -> None:
    """latest/STEP as best/STEP (the only step there), files hard-linked where the disk can."""
    src = os.path.join(self.path, 'latest', str(step))
    best = os.path.join(self.path, 'best')
    if os.path.isdir(os.path.join(best, str(step))):
      return  # linked before a crash cut the curve's write (this very state): keep it
    tmp = os.path.join(self.path, BEST_TMP)
    if os.path.exists(tmp):
      shutil.rmtree(tmp)  # a copy a crash cut short
    shutil.copytree(src, tmp, copy_function=_link_or_copy)
    os.makedirs(best, exist_ok=True)
    old = [n for n in os.listdir(best) if n != str(step)]
    os.rename(tmp, os.path.join(best, str(step)))  # whole or absent, as Orbax's own commits
    for name in old:  # max_to_keep=1, as Orbax keeps it: the older best after the newer lands
      path = os.path.join(best, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

  def save_final(self, state: TrainState) -> None:
    """The model --final_fit=fit+validation trained again (what its eval score is of)."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    mgr = _manager(os.path.join(self.path, 'final'))
    try:
      mgr.save(int(state.step), args=ocp.args.StandardSave(state), force=True)
      mgr.wait_until_finished()
    finally:
      mgr.close()

  def save_record(self, record: dict) -> None:
    if not distributed.is_writer():
      return
    tmp = self.curve_file + '.tmp'
    with open(tmp, 'w') as fh:
      json.dump(record, fh, indent=1)
    os.replace(tmp, self.curve_file)

  def has(self, which: str) -> bool:
    return os.path.isdir(os.path.join(self.path, which))

  def restore(self, which: str, state: TrainState, mesh: Mesh) -> TrainState:
    return _restore(os.path.join(self.path, which), state, mesh)


def load_checkpoint(workdir: str, mode: str, lr: float, which: str = 'latest',
                    weight_decay: Optional[float] = None) -> dict:
  """A configuration's saved state as a plain tree (for inspection and tests).

  On this process's first device, whatever devices or processes saved it.
  """
  path = os.path.join(checkpoint_dir(workdir, mode, lr, weight_decay), which)
  step, state = rungs.restore_here(path) if os.path.isdir(path) else (None, None)
  if step is None:
    raise UserError(f'no checkpoint for mode {mode}, lr {lr:g} in {workdir}')
  return state

