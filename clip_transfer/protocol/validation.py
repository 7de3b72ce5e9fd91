"""The one validation protocol: a stratified, seeded split of the train split, by example id.

Both stages hold out the same examples for the same ids, fraction and seed,
whatever order they read them in (the probe reads embedding shards, fine-tune
the source): within each class, examples are ordered by ``sha256(seed/id)``
and the first ``round(fraction × n)`` go to validation (at least one when
``fraction > 0``, never the class's last one). Every hyperparameter — the
probe's L2, fine-tune's learning rate and step, WiSE-FT's α — is chosen on it;
``record`` goes into metrics.json so ``report.compare`` can check both stages
used the same one. Few-shot draws (``few_shot``) are by id the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

from clip_transfer.errors import UserError

DEFAULT_FRACTION = 0.1


def _key(seed, ex_id: str) -> bytes:
  return hashlib.sha256(f'{seed}/{ex_id}'.encode()).digest()


def ids_sha256(ids: Sequence[str]) -> str:
  """sha256 of the sorted ids, one per line: names a set of examples independent of order."""
  return hashlib.sha256('\n'.join(sorted(ids)).encode()).hexdigest()


def eval_order(ids: Sequence[str]) -> np.ndarray:
  """The order every stage scores its eval examples in (by id): predictions pair up across runs."""
  return np.argsort(np.asarray([str(i) for i in ids], dtype=object), kind='stable')


def eval_record(ids: Sequence[str], labels: np.ndarray) -> dict:
  """metrics.json's ``eval``: which examples (ids in eval order) and their labels, in that order."""
  return {'ids_sha256': ids_sha256(ids), 'labels': np.asarray(labels).astype(int).tolist()}


@dataclasses.dataclass(frozen=True)
class Holdout:
  """The validation split carved from train: fit and validation indices, and its record."""

  fit: np.ndarray  # indices into the train split, sorted
  val: np.ndarray
  record: dict  # {fraction, seed, num_examples, ids_sha256}


def check_fraction(fraction: float) -> None:
  """The range of ``--val_fraction`` (0: no validation split; 1 would leave nothing to fit)."""
  if not (isinstance(fraction, (int, float)) and 0 <= fraction < 1):
    raise UserError(f'--val_fraction must be in [0, 1), got {fraction}')


def split(ids: Sequence[str], labels: np.ndarray, fraction: float = DEFAULT_FRACTION,
          seed: int = 0) -> Holdout:
  """Stratified by label, seeded, a pure function of (ids, labels, fraction, seed)."""
  check_fraction(fraction)
  ids = [str(i) for i in ids]
  labels = np.asarray(labels)
  if len(ids) != len(labels):
    raise ValueError(f'{len(ids)} ids for {len(labels)} labels')
  if len(set(ids)) != len(ids):
    raise UserError('example ids are not unique within the train split; the validation split '
                    'is drawn by id')
  fit, val = [], []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    idx = idx[np.argsort([_key(seed, ids[i]) for i in idx], kind='stable')]
    n_val = int(round(fraction * len(idx)))
    n_val = min(max(n_val, 1 if fraction > 0 else 0), len(idx) - 1)  # keep >= 1 for fitting
    val.append(idx[:n_val])
    fit.append(idx[n_val:])
  fit_idx = np.sort(np.concatenate(fit)) if fit else np.zeros(0, int)
  val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, int)
  record = {'fraction': float(fraction), 'seed': int(seed), 'num_examples': int(len(val_idx)),
            'ids_sha256': ids_sha256([ids[i] for i in val_idx])}
  return Holdout(fit_idx, val_idx, record)


def few_shot(ids: Sequence[str], labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
  """Sorted indices of ``shots`` examples per class: a pure function of (ids, labels, shots, seed).

  Within each class, the examples with the smallest ``sha256('shots<seed>/id')``
  (a key apart from the validation split's), so a seed's k×C examples are the
  same in every stage and every rerun, whatever order they were read in, and
  the k-shot draw holds the (k-1)-shot one (curves over k differ by the added
  shots, not by a fresh draw). Callers check every class has ``shots``.
  """
  ids = [str(i) for i in ids]
  labels = np.asarray(labels)
  if len(ids) != len(labels):
    raise ValueError(f'{len(ids)} ids for {len(labels)} labels')
  out = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    idx = idx[np.argsort([_key(f'shots{seed}', ids[i]) for i in idx], kind='stable')]
    out.append(idx[:shots])
  return np.sort(np.concatenate(out)) if out else np.zeros(0, int)

