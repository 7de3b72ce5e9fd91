"""The probe's flags and the checks on its inputs (flags, splits, shot counts), each one line."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Sequence

import numpy as np

from probe import core
from clip_transfer import distributed
from clip_transfer import flags
from clip_transfer.protocol import heads as heads_lib
from clip_transfer.protocol import methods as methods_lib
from clip_transfer.errors import UserError

BASELINES = ('sklearn',)
FEW_SHOT_SELECTION = ('within-shots', 'validation')
OWNED_FILES = ('metrics.json', 'metrics.json.tmp', 'head.npz')  # what a probe run writes


@dataclasses.dataclass
class ProbeConfig(distributed.DistributedOptions):
  """Every probe flag, declared once (``python -m probe.train --help`` lists them)."""

  embeddings: str = flags.field(help='embedding dataset directory (pipelines.embed)')
  output_dir: str = flags.field(help='where metrics.json and head.npz go')
  train_split: str = flags.field('train', 'split the head is fit (and validated) on')
  eval_split: str = flags.field('test', 'split scored once, with the chosen head')
  val_fraction: float = flags.val_fraction('the L2')
  seed: int = flags.field(0, 'validation split and few-shot draws')
  method: str = flags.field(
      'linear', 'the JAX head: linear (on the pooled embedding, standardised) or '
      'zeroshot-anchored (on L2-normalised projected features, pulled towards the '
      '--zeroshot head)', choices=core.PROBE_METHODS)
  zeroshot: Optional[str] = flags.field(None, 'a probe.zeroshot --output_dir (same weights and '
                                        'classes): the head --method=zeroshot-anchored starts '
                                        'at and is pulled towards')
  l2_grid: Optional[tuple[float, ...]] = flags.field(
      None, 'L2 strengths on the mean loss; sklearn gets C = 1/(N*l2). Default: '
      f'{",".join(map(str, core.DEFAULT_L2_GRID))} (linear); '
      f'{",".join(map(str, methods_lib.DEFAULT_ANCHOR_GRID))} (zeroshot-anchored: the penalty on '
      'the offset from zero-shot; inf is zero-shot itself)')
  solver: str = flags.field('lbfgs', 'the JAX head\'s solver', choices=core.linear.SOLVERS)
  baselines: Optional[tuple[str, ...]] = flags.field(
      None, "comma-separated; '' for none. Default: sklearn beside the linear probe, none "
      'beside the anchored one (the baseline is the plain probe\'s)')
  final_fit: str = flags.field(
      'fit', 'what the chosen L2 is finally fit on: fit (the fit part alone, as fine-tune) or '
      'fit+validation (refit on fit and validation after selection, the CLIP paper\'s and '
      'ELEVATER\'s protocol); few-shot fits use their shots only either way',
      choices=methods_lib.FINAL_FITS)
  shots: tuple[int, ...] = flags.field((), 'few-shot sizes (examples per class), e.g. 1,5,10')
  seeds: int = flags.field(3, 'few-shot draws per size')
  few_shot_selection: str = flags.field(
      'within-shots', 'how a few-shot fit chooses its L2: within-shots (true few-shot: '
      'cross-validation inside the k shots; k=1 takes the grid\'s largest L2) or validation '
      '(the common protocol: the whole validation split, labels beyond the shots)',
      choices=FEW_SHOT_SELECTION)
  max_iter: int = flags.field(core.linear.MAX_ITER, 'solver iterations, both methods')
  tol: float = flags.field(core.linear.TOL, 'stop at max |gradient| <= tol')
  progress: bool = flags.field(True, 'progress bars on stderr')
  overwrite: bool = flags.field(False, 'replace the probe run this tool wrote in --output_dir '
                                '(nothing else is ever removed)')

  def __post_init__(self):
    """Every flag checked before any data is read."""
    if self.method not in core.PROBE_METHODS:
      raise UserError(f'--method must be one of {", ".join(core.PROBE_METHODS)}, '
                      f'got {self.method!r}')
    anchored = self.method == 'zeroshot-anchored'
    if self.zeroshot and not anchored:
      raise UserError('--zeroshot is the head --method=zeroshot-anchored starts from; pass '
                      'that too, or drop --zeroshot')
    if self.l2_grid is None:
      self.l2_grid = methods_lib.DEFAULT_ANCHOR_GRID if anchored else core.DEFAULT_L2_GRID
    self.l2_grid = tuple(float(v) for v in self.l2_grid)
    # inf (stay at zero-shot) only means something for the anchored head.
    if not self.l2_grid or any(math.isnan(v) or v <= 0 or (math.isinf(v) and not anchored)
                               for v in self.l2_grid):
      raise UserError(f'--l2_grid needs positive numbers{" (or inf)" if anchored else ""}, got '
                      f'{list(self.l2_grid)}')
    if self.baselines is None:
      self.baselines = () if anchored else BASELINES
    self.baselines = tuple(self.baselines)
    if anchored and self.baselines:
      raise UserError('--baselines: the sklearn baseline is the plain probe\'s; run it with '
                      '--method=linear (report.compare puts both runs side by side)')
    if self.final_fit not in methods_lib.FINAL_FITS:
      raise UserError(f'--final_fit must be one of {", ".join(methods_lib.FINAL_FITS)}')
    if self.solver not in core.linear.SOLVERS:
      raise UserError(f'--solver must be one of {", ".join(core.linear.SOLVERS)}, '
                      f'got {self.solver!r}')
    unknown = [b for b in self.baselines if b not in BASELINES]
    if unknown:
      raise UserError(f'unknown baseline {unknown[0]!r}; choose from {", ".join(BASELINES)}')
    flags.check_shared(self)
    bad = [k for k in self.shots if k < 1]
    if bad:
      raise UserError(f'--shots must be positive integers, got {bad[0]}')
    if self.seeds < 1:
      raise UserError(f'--seeds must be at least 1, got {self.seeds}')
    if self.few_shot_selection not in FEW_SHOT_SELECTION:
      raise UserError(f'--few_shot_selection must be one of {", ".join(FEW_SHOT_SELECTION)}')
    if self.max_iter < 1 or not self.tol > 0:
      raise UserError('--max_iter must be >= 1 and --tol > 0')
    if self.train_split == self.eval_split:
      raise UserError(f'--train_split and --eval_split are both {self.train_split!r}; the L2 is '
                      'chosen on part of train, so evaluate on another split')
    if self.output_dir and os.path.isfile(self.output_dir):
      raise UserError(f'--output_dir {self.output_dir} is a file; pass a directory')

  def methods(self, zeroshot_head: Optional[heads_lib.ZeroshotHead] = None) -> list[core.Method]:
    """The JAX head first (the one saved), then the baselines."""
    kw = dict(solver=self.solver, max_iter=self.max_iter, tol=self.tol)
    if self.method == 'zeroshot-anchored':
      jax_method = core.AnchoredMethod(anchor=np.asarray(zeroshot_head.head, np.float32).T,
                                       scale=float(np.exp(zeroshot_head.logit_scale)), **kw)
    else:
      jax_method = core.JaxMethod(**kw)
    return [jax_method] + [core.METHODS[b](max_iter=self.max_iter, tol=self.tol)
                           for b in self.baselines]


def check_split(name: str, x: np.ndarray, y: np.ndarray, num_classes: int,
                ids: Optional[Sequence[str]] = None) -> None:
  """One clear error for each way a split can be unusable."""
  if len(x) == 0:
    raise UserError(f'split {name!r} is empty')
  if x.ndim != 2:
    raise UserError(f'split {name!r}: embeddings must be (N, D), got shape {x.shape}')
  bad = ~np.isfinite(x).all(axis=1)
  if bad.any():
    first = ids[int(np.argmax(bad))] if ids is not None else int(np.argmax(bad))
    raise UserError(f'split {name!r}: {int(bad.sum())} embeddings hold NaN or inf '
                    f'(first: {first}); re-run the embed stage on those inputs')
  out = (y < 0) | (y >= num_classes)
  if out.any():
    raise UserError(f'split {name!r}: label {int(y[np.argmax(out)])} is out of range for '
                    f'{num_classes} classes')


def check_splits(train: tuple, evaluation: tuple, num_classes: int,
                 names: tuple[str, str] = ('train', 'test')) -> None:
  """Per-split checks, then the ones between splits."""
  for name, split in zip(names, (train, evaluation)):
    check_split(name, *split, num_classes)
  if train[0].shape[1] != evaluation[0].shape[1]:
    raise UserError(f'embedding width differs between splits: {names[0]!r} has '
                    f'{train[0].shape[1]}, {names[1]!r} has {evaluation[0].shape[1]}')
  if len(np.unique(train[1])) < 2:
    raise UserError(f'split {names[0]!r} holds a single class ({int(train[1][0])}); a probe '
                    'needs at least two')


def check_shots(shots: Sequence[int], y_fit: np.ndarray, class_names: Sequence[str]) -> None:
  if not shots:
    return
  counts = np.bincount(y_fit, minlength=len(class_names))
  present = counts[counts > 0]
  if max(shots) > present.min():
    c = int(np.flatnonzero(counts == present.min())[0])
    raise UserError(f'--shots {max(shots)}: class {class_names[c]!r} has only {present.min()} '
                    'training examples outside the validation split; use at most that many')
