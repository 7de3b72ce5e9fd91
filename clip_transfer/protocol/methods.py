"""Ways to fit the linear head (plain, zero-shot-anchored) and the choice of L2 on validation.

``select_and_fit`` is the protocol every stage runs: fit a grid of L2 strengths with a
``Method`` (the solver is ``clip_transfer.protocol.linear``), score each on the
validation split, keep the best, score the eval split once.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Optional, Sequence

import numpy as np

from clip_transfer import distributed
from clip_transfer.protocol.linear import MAX_ITER, TOL, Standardizer, fit_jax, jax_logits

# The anchored head's penalty on its offset from the unit-norm class text
# embeddings (features of norm exp(logit_scale), ~100 for CLIP). inf is the
# zero-shot head itself (no solve), so validation can always keep it; the low
# end must reach a free probe for when zero-shot is poor (demo, random weights:
# validation top-1 0.59 at 1e-2, 0.80 at 1e-5), though features of norm
# exp(logit_scale) make those solves slow to converge (1000 iterations).
DEFAULT_ANCHOR_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, float('inf'))
FINAL_FITS = ('fit', 'fit+validation')  # what the chosen configuration is refit on


def log_loss(logits: np.ndarray, y: np.ndarray) -> float:
  """Mean cross-entropy; the tie-break between L2 values with equal validation accuracy."""
  logits = logits.astype(np.float64)
  m = logits.max(axis=1, keepdims=True)
  lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
  return float(np.mean(lse - logits[np.arange(len(y)), y]))


def score(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """(top-1, log-loss) of held-out logits: what ``select`` ranks, in every stage."""
  return float(np.mean(np.argmax(logits, axis=1) == y)), log_loss(logits, y)


def select(val_scores: Sequence[tuple[float, float]]) -> int:
  """Index of the best (top1, log_loss): highest accuracy, then lowest loss."""
  return min(range(len(val_scores)), key=lambda i: (-val_scores[i][0], val_scores[i][1]))


class Method:
  """One way to fit the head; ``name`` is its metrics.json key."""

  name: str
  solver: str

  def standardizer(self, x_fit: np.ndarray) -> Standardizer:
    """The feature transform, from the fit set alone (every process's rows): per-feature mean/std."""
    return Standardizer.fit_across_processes(x_fit)

  def fit_grid(self, x: np.ndarray, y: np.ndarray, num_classes: int, l2s: Sequence[float], *,
               progress: bool = False) -> tuple[Any, dict]:
    """Fits one head per L2 on standardised ``x``; returns (fitted, {'n_iter', 'converged'})."""
    raise NotImplementedError

  def logits(self, fitted, i: int, x: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes) logits of the i-th fitted head."""
    raise NotImplementedError

  def head(self, fitted, i: int, num_classes: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(kernel (D, C), bias (C,)) of the i-th head, on standardised features."""
    raise NotImplementedError


@dataclasses.dataclass
class JaxMethod(Method):
  """The Flax guide's zero-initialised ``nn.Dense`` head, the whole grid in one vmapped solve."""

  solver: str = 'lbfgs'
  max_iter: int = MAX_ITER
  tol: float = TOL
  name: str = 'jax'

  def fit_grid(self, x, y, num_classes, l2s, *, progress=False):
    mesh = distributed.mesh() if distributed.rows_sharded() else None
    return fit_jax(x, y, num_classes, l2s, solver=self.solver, max_iter=self.max_iter,
                   tol=self.tol, desc=f'jax ({len(l2s)} L2 values)', progress=progress,
                   mesh=mesh)

  def logits(self, fitted, i, x, num_classes):
    return jax_logits({'kernel': fitted['kernel'][i], 'bias': fitted['bias'][i]}, x)

  def head(self, fitted, i, num_classes, dim):
    return np.asarray(fitted['kernel'][i]), np.asarray(fitted['bias'][i])


@dataclasses.dataclass
class AnchoredMethod(JaxMethod):
  """A head W0 + Δ anchored at the zero-shot head W0, on L2-normalised features (module docstring).

  W0 is the class text embeddings (``heads.ZeroshotHead.head.T``) on features
  normalised and scaled by exp(logit_scale), so at Δ = 0 the logits are
  zero-shot's. An infinite L2 is W0 itself, no solve: exactly zero-shot's
  predictions, a choice validation can always make.
  """

  anchor: Optional[np.ndarray] = None  # (D, C) float32, unit-norm columns
  scale: float = 1.0  # exp(logit_scale)
  name: str = 'zeroshot-anchored'

  def standardizer(self, x_fit):
    # No per-feature statistics: W0 is a head on unit-norm features as they are.
    return Standardizer.unit_norm(x_fit.shape[1], self.scale)

  def fit_grid(self, x, y, num_classes, l2s, *, progress=False):
    anchor = np.asarray(self.anchor, np.float32)
    if anchor.shape != (x.shape[1], num_classes):
      raise ValueError(f'anchor of shape {anchor.shape} for {x.shape[1]}-d features and '
                       f'{num_classes} classes')
    kernel = np.zeros((len(l2s), *anchor.shape), np.float32)
    bias = np.zeros((len(l2s), num_classes), np.float32)
    n_iter, converged = [0] * len(l2s), [True] * len(l2s)
    finite = [i for i, l2 in enumerate(l2s) if math.isfinite(l2)]
    if finite:
      delta, info = fit_jax(x, y, num_classes, [l2s[i] for i in finite], solver=self.solver,
                            max_iter=self.max_iter, tol=self.tol, anchor=anchor,
                            desc=f'anchored ({len(finite)} L2 values)', progress=progress)
      for j, i in enumerate(finite):
        kernel[i], bias[i] = delta['kernel'][j], delta['bias'][j]
        n_iter[i], converged[i] = info['n_iter'][j], info['converged'][j]
    return {'kernel': kernel + anchor, 'bias': bias}, {'n_iter': n_iter, 'converged': converged}


@dataclasses.dataclass
class Fitted:
  """One method's chosen head: the L2, the sweep, eval logits, the head on raw features, timings."""

  l2: float
  sweep: dict  # str(l2) -> {'val_top1', 'val_log_loss', 'n_iter', 'converged'}
  eval_logits: np.ndarray
  kernel: np.ndarray  # (D, C): standardised-feature head
  bias: np.ndarray
  standardizer: Standardizer
  n_iter: int
  wall_s: float
  final_fit: str = 'fit'  # what the returned head was fit on (FINAL_FITS)


def select_and_fit(method: Method, x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray,
                   y_val: np.ndarray, x_eval: np.ndarray, num_classes: int,
                   l2s: Sequence[float], *, progress: bool = False,
                   final_fit: str = 'fit') -> Fitted:
  """Fit every L2 on x_fit, choose on (x_val, y_val), score x_eval with the chosen head.

  Inputs are raw features; the statistics come from x_fit alone, so the
  validation data never shapes the model it selects. With a single L2 the
  validation set may be empty. ``final_fit='fit+validation'``: once chosen,
  the L2 is refit on fit ∪ validation (statistics too), the CLIP paper's and
  ELEVATER's protocol; the sweep's scores stay those of the fit-only heads.

  Over several processes each passes its own rows of ``x_*`` and ``y_fit``
  (in the global order), and ``y_val`` whole: the statistics, the solve and
  the logits (gathered in process order) cover every process's rows.
  """
  if final_fit not in FINAL_FITS:
    raise ValueError(f'final_fit must be one of {FINAL_FITS}, got {final_fit!r}')
  t0 = time.perf_counter()
  std = method.standardizer(x_fit)
  fitted, info = method.fit_grid(std(x_fit), y_fit, num_classes, l2s, progress=progress)
  sweep, scores = {}, []
  if len(l2s) > 1:
    zv = std(x_val)
    for i, l2 in enumerate(l2s):
      val_logits = distributed.gather_rows(method.logits(fitted, i, zv, num_classes))
      top1, loss = score(val_logits, y_val)
      scores.append((top1, loss))
      sweep[repr(float(l2))] = {'val_top1': top1, 'val_log_loss': loss,
                                'n_iter': info['n_iter'][i], 'converged': info['converged'][i]}
  b = select(scores) if scores else 0
  l2, n_iter = float(l2s[b]), int(info['n_iter'][b])
  if not len(y_val):
    final_fit = 'fit'  # nothing held out, nothing to add
  if final_fit == 'fit+validation':
    if distributed.process_count() > 1:  # y_val is whole, x_val this process's rows
      raise ValueError('final_fit=fit+validation is not sharded over processes')
    del fitted  # the fit-only heads did their job (selection)
    x_fit, y_fit = np.concatenate([x_fit, x_val]), np.concatenate([y_fit, y_val])
    std = method.standardizer(x_fit)
    fitted, info = method.fit_grid(std(x_fit), y_fit, num_classes, [l2], progress=progress)
    b, n_iter = 0, int(info['n_iter'][0])
  kernel, bias = method.head(fitted, b, num_classes, x_fit.shape[1])
  eval_logits = distributed.gather_rows(method.logits(fitted, b, std(x_eval), num_classes))
  return Fitted(l2, sweep, eval_logits, kernel, bias, std, n_iter, time.perf_counter() - t0,
                final_fit)
