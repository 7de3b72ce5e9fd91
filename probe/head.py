"""The saved probe: a Dense head plus the standardisation it was trained with, and `predict`."""

from __future__ import annotations

import dataclasses
import os
from typing import Union

import numpy as np

from transfer.errors import UserError

HEAD_FILE = 'head.npz'


@dataclasses.dataclass
class LinearHead:
  """logits = ((x - mean) / std) @ kernel + bias: nn.Dense params with train-split statistics."""

  kernel: np.ndarray  # (D, C) float32, the Dense 'kernel'
  bias: np.ndarray  # (C,) float32
  mean: np.ndarray  # (D,) float32
  std: np.ndarray  # (D,) float32
  class_names: list[str]
  l2: float

  @property
  def dim(self) -> int:
    return self.kernel.shape[0]

  def params(self) -> dict:
    """The head's Flax params, to apply with transfer.linear.make_head(num_classes)."""
    return {'kernel': self.kernel, 'bias': self.bias}

  def logits(self, embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings, np.float32)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise UserError(f'embeddings of shape {x.shape} do not fit this head, which takes '
                      f'(N, {self.dim})')
    return ((x - self.mean) / self.std) @ self.kernel + self.bias

  def save(self, output_dir: str) -> str:
    path = os.path.join(output_dir, HEAD_FILE)
    # npz with plain arrays (no pickle): readable by anything that reads numpy.
    np.savez(path, kernel=self.kernel, bias=self.bias, mean=self.mean, std=self.std,
             class_names=np.asarray(self.class_names, dtype=str), l2=np.float64(self.l2))
    return path


def load_head(path: str) -> LinearHead:
  """Loads a head from probe.train's output directory (or the head.npz in it)."""
  if os.path.isdir(path):
    path = os.path.join(path, HEAD_FILE)
  if not os.path.exists(path):
    raise UserError(f'no probe head at {path}; pass the --output_dir of a probe.train run')
  with np.load(path, allow_pickle=False) as f:
    return LinearHead(kernel=f['kernel'], bias=f['bias'], mean=f['mean'], std=f['std'],
                      class_names=[str(n) for n in f['class_names']], l2=float(f['l2']))


def predict(head: Union[str, LinearHead], embeddings: np.ndarray) -> np.ndarray:
  """Predicted class indices (int64) for raw (unstandardised) embeddings."""
  if not isinstance(head, LinearHead):
    head = load_head(head)
  return np.argmax(head.logits(embeddings), axis=1).astype(np.int64)

