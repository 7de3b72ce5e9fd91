"""A RunInference ModelHandler for the JAX CLIP vision tower (Beam ships none for JAX).

One model load per worker process (RunInference keeps it in a process-wide
``Shared`` handle), one jit compilation per load: batches are fixed at
``batch_size`` and the last one is padded, because jit recompiles for every
new shape and ``BatchElements`` would otherwise vary sizes from 1 to 10000.
Only ``uint8`` NHWC crosses to the device; normalisation runs inside jit.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

# Traces of the jitted forward in this process, by model name: tests assert
# that a whole run compiles exactly once (a trace happens on every compile).
COMPILATIONS: dict[str, int] = {}
_LOCK = threading.Lock()
# Loaded models by name, for the life of the process: the launcher's load (for
# the metadata) is reused when the runner works in the same process.
_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


def load_pretrained_once(name: str):
  """``transfer.checkpoints.load_pretrained``, at most once per process and name."""
  from transfer.checkpoints import load_pretrained  # pylint: disable=g-import-not-at-top

  with _MODELS_LOCK:
    if name not in _MODELS:
      _MODELS[name] = load_pretrained(name)
    return _MODELS[name]


@dataclasses.dataclass
class VisionModel:
  """What load_model returns: a jitted uint8 → (pooled, projected) function."""

  forward: Callable  # (B, H, W, 3) uint8 → ((B, D), (B, P) or None)
  batch_size: int
  image_shape: tuple[int, int, int]


def build_forward(pretrained, projected: bool = False) -> Callable:
  """The jitted vision tower of a ``transfer.checkpoints.Pretrained``.

  Extracted with ``bind/unbind`` as in the Flax transfer-learning guide.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from transfer.preprocess import normalize  # pylint: disable=g-import-not-at-top

  bound = pretrained.module.bind(pretrained.variables)
  vision, vision_vars = bound.vision_model.unbind()
  proj_kernel = None
  if projected:
    if pretrained.module.projection_dim is None:
      from transfer.errors import UserError  # pylint: disable=g-import-not-at-top
      raise UserError(f'{pretrained.name} has no visual_projection; drop --projected')
    proj_kernel = pretrained.variables['params']['visual_projection']['kernel']
  cfg, name = pretrained.preprocess, pretrained.name

  # Weights are arguments, not closed-over constants: closed-over arrays would
  # be baked into the compiled program (slow compiles, a weights-sized
  # executable, no reuse from a compilation cache).
  @jax.jit
  def forward(variables, kernel, pixels):
    with _LOCK:  # runs at trace time only: counts compilations
      COMPILATIONS[name] = COMPILATIONS.get(name, 0) + 1
    pooled = vision.apply(variables, normalize(pixels, cfg)).pooler_output
    if kernel is None:
      return pooled, None
    return pooled, pooled @ kernel

  return functools.partial(forward, vision_vars, proj_kernel)


class ClipVisionModelHandler(ModelHandler[np.ndarray, tuple, VisionModel]):
  """uint8 HWC images → (embedding (D,), projected (P,) or None) per image."""

  def __init__(self, model: str, batch_size: int, projected: bool = False):
    super().__init__()
    self._model_name = model
    self._batch_size = batch_size
    self._projected = projected

  def load_model(self) -> VisionModel:
    pre = load_pretrained_once(self._model_name)
    forward = build_forward(pre, self._projected)
    return VisionModel(forward, self._batch_size, pre.preprocess.output_shape)

  def run_inference(self, batch: Sequence[np.ndarray], model: VisionModel,
                    inference_args: Optional[dict[str, Any]] = None) -> Iterable[PredictionResult]:
    out = []
    for start in range(0, len(batch), model.batch_size):
      chunk = batch[start:start + model.batch_size]
      pixels = np.zeros((model.batch_size, *model.image_shape), np.uint8)  # pad to a fixed shape
      for i, image in enumerate(chunk):
        pixels[i] = image
      pooled, projected = model.forward(pixels)
      pooled = np.asarray(pooled)[:len(chunk)]
      projected = None if projected is None else np.asarray(projected)[:len(chunk)]
      for i in range(len(chunk)):
        # example=None: the image is not carried past inference (memory).
        out.append(PredictionResult(None, (pooled[i], None if projected is None else projected[i])))
    return out

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    return sum(int(np.asarray(b).nbytes) for b in batch)

  def get_metrics_namespace(self) -> str:
    return 'ClipVisionModelHandler'

  def batch_elements_kwargs(self):
    # Fixed batches: the jitted function compiles once (the last one is padded).
    return {'min_batch_size': self._batch_size, 'max_batch_size': self._batch_size}
