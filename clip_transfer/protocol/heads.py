"""The heads other stages start from, as saved files: numpy only (no JAX to import).

``LinearHead`` is the probe's (``head.npz``: a Dense head on standardised
features plus the statistics; the zero-shot-anchored probe's reads
L2-normalised ``projected`` features instead of ``embedding``); ``ZeroshotHead`` is zero-shot's
(``zeroshot_head.npz``: the class text embeddings and CLIP's temperature).
The probe and zero-shot write them; ``probe.predict`` applies the first;
fine-tune's ``--head_init`` starts from either.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from clip_transfer.errors import UserError


def fold(kernel: np.ndarray, bias: np.ndarray, mean: np.ndarray,
         std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """A head on standardised features as (kernel, bias) of a Dense head on raw features."""
  kernel = np.asarray(kernel, np.float32) / np.asarray(std, np.float32)[:, None]
  return kernel, np.asarray(bias, np.float32) - np.asarray(mean, np.float32) @ kernel


HEAD_FILE = 'head.npz'
# What a LinearHead reads: the pooled `embedding`, or `projected` L2-normalised
# (the zero-shot head's input, so a head anchored at it keeps its geometry).
FEATURES = ('embedding', 'projected')


@dataclasses.dataclass
class LinearHead:
  """logits = ((x - mean) / std) @ kernel + bias: nn.Dense params with train-split statistics.

  ``feature='projected'``: x is the projected feature, L2-normalised first.
  """

  kernel: np.ndarray  # (D, C) float32, the Dense 'kernel'
  bias: np.ndarray  # (C,) float32
  mean: np.ndarray  # (D,) float32
  std: np.ndarray  # (D,) float32
  class_names: list[str]
  l2: float
  feature: str = 'embedding'  # one of FEATURES

  @property
  def dim(self) -> int:
    return self.kernel.shape[0]

  def params(self) -> dict:
    """The head's Flax params, to apply with clip_transfer.protocol.linear.make_head(num_classes)."""
    return {'kernel': self.kernel, 'bias': self.bias}

  def folded(self) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) of the same head on raw (``projected``: L2-normalised) features (LP-FT starts from it)."""
    return fold(self.kernel, self.bias, self.mean, self.std)

  def logits(self, embeddings: np.ndarray) -> np.ndarray:
    """Logits of raw ``self.feature`` rows (normalised here when the head reads projected)."""
    x = np.asarray(embeddings, np.float32)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise UserError(f'{self.feature} features of shape {x.shape} do not fit this head, which '
                      f'takes (N, {self.dim})')
    if self.feature == 'projected':
      norm = np.linalg.norm(x, axis=1, keepdims=True)
      x = x / np.where(norm > 0, norm, 1)
    return ((x - self.mean) / self.std) @ self.kernel + self.bias

  def save(self, output_dir: str) -> str:
    path = os.path.join(output_dir, HEAD_FILE)
    # npz with plain arrays (no pickle): readable by anything that reads numpy.
    np.savez(path, kernel=self.kernel, bias=self.bias, mean=self.mean, std=self.std,
             class_names=np.asarray(self.class_names, dtype=str), l2=np.float64(self.l2),
             feature=np.asarray(self.feature))
    return path


def load_head(path: str) -> LinearHead:
  """Loads a head from probe.train's output directory (or the head.npz in it)."""
  if os.path.isdir(path):
    path = os.path.join(path, HEAD_FILE)
  if not os.path.exists(path):
    raise UserError(f'no probe head at {path}; pass the --output_dir of a probe.train run')
  f = _read(path, ('kernel', 'bias', 'mean', 'std', 'class_names', 'l2'), 'probe head',
            optional=('feature',))
  # Heads saved before `feature` was recorded read the pooled embedding.
  feature = str(f['feature']) if 'feature' in f else 'embedding'
  if feature not in FEATURES:
    raise UserError(f'{path}: unknown feature {feature!r} (a newer version wrote it?)')
  head = LinearHead(kernel=f['kernel'], bias=f['bias'], mean=f['mean'], std=f['std'],
                    class_names=[str(n) for n in f['class_names']], l2=float(f['l2']),
                    feature=feature)
  d, c = head.kernel.shape if head.kernel.ndim == 2 else (None, None)
  if (d is None or head.bias.shape != (c,) or head.mean.shape != (d,) or head.std.shape != (d,)
      or len(head.class_names) != c):
    raise UserError(f'{path}: not a probe head (kernel {head.kernel.shape}, bias '
                    f'{head.bias.shape}, mean {head.mean.shape}, std {head.std.shape}, '
                    f'{len(head.class_names)} class names do not fit together)')
  return head


def _read(path: str, keys: tuple[str, ...], what: str,
          optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """The arrays ``keys`` (and those of ``optional`` present) of an npz file, or one line saying why it is not a ``what``."""
  try:
    with np.load(path, allow_pickle=False) as f:  # never unpickle: a head file holds no code
      missing = [k for k in keys if k not in f.files]
      if missing:
        raise UserError(f'{path}: not a {what} file (no {missing[0]!r} array)')
      return {k: f[k] for k in keys + optional if k in f.files}
  except UserError:
    raise
  except Exception as e:  # not a zip, truncated, an object array (pickle)
    if 'pickle' in str(e):  # numpy's message advises allow_pickle: never the fix here
      raise UserError(f'{path}: not a {what} file (it holds pickled Python objects, which are '
                      'never loaded: they could run code)') from None
    reason = (str(e).strip().splitlines() or [''])[0][:200]
    raise UserError(f'{path}: not a readable {what} file ({type(e).__name__}: {reason})') from None


ZEROSHOT_HEAD_FILE = 'zeroshot_head.npz'


@dataclasses.dataclass
class ZeroshotHead:
  """logits = exp(logit_scale) · normalize(projected) @ head.T + logit_bias: the class text embeddings."""

  head: np.ndarray  # (C, P) float32, L2-normalised class text embeddings
  logit_scale: float  # log-space temperature, as CLIP stores it
  class_names: list[str]
  templates: list[str]
  logit_bias: float = 0.0  # SigLIP's learned bias (its scores are sigmoid(logits)); CLIP has none

  def dense(self) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) of a Dense head on L2-normalised projected features."""
    kernel = np.exp(np.float32(self.logit_scale)) * np.asarray(self.head, np.float32).T
    return kernel, np.full(kernel.shape[1], self.logit_bias, np.float32)

  def save(self, output_dir: str) -> str:
    path = os.path.join(output_dir, ZEROSHOT_HEAD_FILE)
    np.savez(path, head=np.asarray(self.head, np.float32),
             logit_scale=np.float32(self.logit_scale), logit_bias=np.float32(self.logit_bias),
             class_names=np.asarray(list(self.class_names)),
             templates=np.asarray(list(self.templates)))
    return path


def load_zeroshot_head(output_dir: str) -> ZeroshotHead:
  """What probe.zeroshot saved in ``output_dir``."""
  path = os.path.join(output_dir, ZEROSHOT_HEAD_FILE)
  if not os.path.exists(path):
    raise UserError(f'no zero-shot head at {path}; pass the --output_dir of a probe.zeroshot run')
  z = _read(path, ('head', 'logit_scale', 'class_names', 'templates'), 'zero-shot head',
            optional=('logit_bias',))
  head = ZeroshotHead(z['head'], float(z['logit_scale']), [str(c) for c in z['class_names']],
                      [str(t) for t in z['templates']], float(z.get('logit_bias', 0.0)))
  if head.head.ndim != 2 or head.head.shape[0] != len(head.class_names):
    raise UserError(f'{path}: not a zero-shot head ({head.head.shape} class embeddings for '
                    f'{len(head.class_names)} class names)')
  return head
