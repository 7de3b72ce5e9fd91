"""The probe's methods on numpy arrays: the JAX head and scikit-learn's baseline behind one interface.

A method fits one head per L2 value of a grid (``fit_grid``) and gives the
logits of the i-th (``logits``). ``select_and_fit`` is the protocol shared by
both: standardise with the fit set's statistics, fit the grid, choose the L2
on the validation examples, score the eval examples with that head. The
final model is the one fit on the fit part alone (``final_fit: fit``), as in
the fine-tune stage.

scikit-learn's LogisticRegression minimises ``C * sum_i loss_i + 1/2 ||w||^2``
(intercept unpenalised); dividing by ``C * N`` gives ``clip_transfer.protocol.linear``'s
objective with ``l2 = 1 / (C * N)``, so ``C = 1 / (N * l2)`` with N the size of
the fit set. sklearn fits the binary case as one logistic (w = w_1 - w_0),
whose optimum has W's two softmax columns at ±w/2, so ``||W||^2 = ||w||^2 / 2``
and the same regularisation needs twice the C: ``C = 2 / (N * l2)``.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from clip_transfer.protocol import linear
from clip_transfer.protocol import methods

DEFAULT_L2_GRID = linear.DEFAULT_L2_GRID


def sklearn_c(l2: float, num_fit: int, num_classes: int) -> float:
  """The C that makes sklearn's objective equal ours at this L2 (see the module docstring)."""
  return (2.0 if num_classes == 2 else 1.0) / (num_fit * l2)


@dataclasses.dataclass
class SklearnMethod(methods.Method):
  """The CLIP paper's baseline: LogisticRegression(lbfgs, max_iter=1000), one fit per L2."""

  max_iter: int = linear.MAX_ITER
  tol: float = linear.TOL
  name: str = 'sklearn'
  solver: str = 'sklearn-lbfgs'

  def fit_grid(self, x, y, num_classes, l2s, *, progress=False):
    from sklearn.exceptions import ConvergenceWarning  # pylint: disable=g-import-not-at-top
    from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
    models, n_iter = [], []
    for l2 in tqdm(l2s, desc='sklearn', file=sys.stderr, leave=False, disable=not progress):
      clf = LogisticRegression(C=sklearn_c(l2, len(x), num_classes), max_iter=self.max_iter,
                               tol=self.tol)
      with warnings.catch_warnings():
        # Not converging in max_iter is part of the protocol; n_iter records it.
        warnings.simplefilter('ignore', ConvergenceWarning)
        clf.fit(x, y)
      models.append(clf)
      n_iter.append(int(np.max(clf.n_iter_)))
    return models, {'n_iter': n_iter, 'converged': [n < self.max_iter for n in n_iter]}

  def logits(self, fitted, i, x, num_classes):
    """Classes absent from the fit set get -inf."""
    clf = fitted[i]
    d = clf.decision_function(x)
    if d.ndim == 1:  # binary: one logit for classes_[1] against classes_[0]
      d = np.stack([np.zeros_like(d), d], axis=1)
    out = np.full((len(x), num_classes), -np.inf, np.float32)
    out[:, clf.classes_] = d
    return out

  def head(self, fitted, i, num_classes, dim):
    clf = fitted[i]
    kernel = np.zeros((dim, num_classes), np.float32)
    bias = np.full((num_classes,), -1e9, np.float32)
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary
      coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-intercept[0] / 2,
                                                                          intercept[0] / 2])
    kernel[:, clf.classes_] = coef.T
    bias[clf.classes_] = intercept
    return kernel, bias


Method, JaxMethod, Fitted, select_and_fit = (methods.Method, methods.JaxMethod, methods.Fitted,
                                             methods.select_and_fit)
AnchoredMethod = methods.AnchoredMethod
METHODS: dict[str, Callable[..., Method]] = {'jax': JaxMethod, 'sklearn': SklearnMethod}
# --method: the JAX head a run fits and saves (its metrics.json key in METHOD_KEYS).
# 'linear' is the probe on pooled embeddings; 'zeroshot-anchored' is named after
# what it is pulled towards, so the flag says which other run it needs.
PROBE_METHODS = ('linear', 'zeroshot-anchored')
METHOD_KEYS = {'linear': JaxMethod.name, 'zeroshot-anchored': AnchoredMethod.name}




def cv_select_l2(method: Method, x_shots: np.ndarray, y_shots: np.ndarray, num_classes: int,
                 l2s: Sequence[float]) -> float:
  """True few-shot: the L2 chosen using only the k shots per class, never other labels.

  k >= 2: k folds, fold j holding out the j-th shot of every class; the L2 with
  the best mean held-out top-1 (then log-loss) wins. k = 1 leaves nothing to
  hold out, so the rule is fixed in advance: the grid's largest L2 (the
  strongest regularisation: the plain head tends to the class-mean directions;
  the anchored one, whose grid ends at inf, stays at the zero-shot head).
  """
  classes = np.unique(y_shots)
  k = int(np.min([np.sum(y_shots == c) for c in classes]))
  if k < 2 or len(l2s) == 1:
    return float(max(l2s))
  # Position of each example among its class's shots: fold j holds out position j.
  position = np.zeros(len(y_shots), int)
  for c in classes:
    idx = np.flatnonzero(y_shots == c)
    position[idx] = np.arange(len(idx))
  top1 = np.zeros(len(l2s))
  loss = np.zeros(len(l2s))
  for j in range(k):
    held = position == j
    std = method.standardizer(x_shots[~held])
    fitted, _ = method.fit_grid(std(x_shots[~held]), y_shots[~held], num_classes, l2s)
    zh = std(x_shots[held])
    for i in range(len(l2s)):
      fold_top1, fold_loss = methods.score(method.logits(fitted, i, zh, num_classes), y_shots[held])
      top1[i] += fold_top1
      loss[i] += fold_loss
  return float(l2s[methods.select(list(zip(top1 / k, loss / k)))])
