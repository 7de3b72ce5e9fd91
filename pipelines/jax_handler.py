"""A RunInference ModelHandler for the JAX CLIP vision tower (Beam ships none for JAX).

One model load per worker process (RunInference keeps it in a process-wide
``Shared`` handle), one jit compilation per load: batches are fixed at
``batch_size`` and the last one is padded, because jit recompiles for every
new shape and ``BatchElements`` would otherwise vary sizes from 1 to 10000.
Only ``uint8`` NHWC crosses to the device; normalisation runs inside jit.
``run_inference`` dispatches every device batch of its input before it waits
for the first result (JAX dispatches asynchronously), and the host-side
preprocessing pool (``clip_transfer.data.preprocess.ParallelPrepare``) keeps preparing
the next images meanwhile. ``dtype='bfloat16'`` computes in bfloat16 with
float32 parameters; embeddings are returned as float32 either way.

``batched=True`` (the embed stage): each element is already a stacked
``(n, H, W, 3)`` batch of at most ``batch_size`` images (``Preprocess`` makes
them), one device batch per element and one result per element holding the
``n`` rows: Beam's per-element work is paid once per batch, not per image.
Beam's ``num_inferences`` then counts batches; ``num_images`` counts images.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult


@dataclasses.dataclass
class VisionModel:
  """What load_model returns: a jitted uint8 → (pooled, projected) function."""

  forward: Callable  # (B, H, W, 3) uint8 → a tuple of (B, …) arrays or None: ((B, D), (B, P) or None)
  batch_size: int
  image_shape: tuple[int, int, int]


def build_forward(pretrained, projected: bool = False) -> Callable:
  """``clip_transfer.models.forward.vision_features`` bound to its weights: uint8 batch → features."""
  from clip_transfer.models import forward  # pylint: disable=g-import-not-at-top

  fn, weights = forward.vision_features(pretrained, projected)
  return functools.partial(fn, weights)


class ClipVisionModelHandler(ModelHandler[np.ndarray, tuple, VisionModel]):
  """uint8 HWC images → (embedding (D,), projected (P,) or None) per image."""

  def __init__(self, model: str, batch_size: int, projected: bool = False,
               dtype: str = 'float32', batched: bool = False):
    super().__init__()
    self._model_name = model
    self._batch_size = batch_size
    self._projected = projected
    self._dtype = dtype
    self._batched = batched

  def load_model(self) -> VisionModel:
    from clip_transfer import models  # pylint: disable=g-import-not-at-top
    pre = models.load(self._model_name, self._dtype)  # bfloat16: compute dtype; params stay fp32
    forward = build_forward(pre, self._projected)
    return VisionModel(forward, self._batch_size, pre.preprocess.output_shape)

  def run_inference(self, batch: Sequence[np.ndarray], model: VisionModel,
                    inference_args: Optional[dict[str, Any]] = None) -> Iterable[PredictionResult]:
    if self._batched:
      return self._run_batches(batch, model)
    shape = (model.batch_size, *model.image_shape)
    dispatched = []
    # Dispatch every device batch first; the device works while we pad the next.
    for start in range(0, len(batch), model.batch_size):
      chunk = batch[start:start + model.batch_size]
      pixels = np.zeros(shape, np.uint8)  # pad to a fixed shape
      for i, image in enumerate(chunk):
        pixels[i] = image
      dispatched.append((len(chunk), model.forward(pixels)))
    out = []
    for n, outputs in dispatched:
      # Each output (embed: pooled, projected or None; predict: logits) cut to the real rows;
      # np.asarray blocks until this batch is done.
      outputs = [None if o is None else np.asarray(o)[:n] for o in outputs]
      for i in range(n):
        # example=None: the image is not carried past inference (memory).
        out.append(PredictionResult(None, tuple(None if o is None else o[i] for o in outputs)))
    return out

  def _run_batches(self, batches: Sequence[np.ndarray], model: VisionModel) -> list:
    """Stacked (n, H, W, 3) batches, n <= batch_size → one result of n rows per batch."""
    shape = (model.batch_size, *model.image_shape)
    dispatched = []
    for pixels in batches:
      n = len(pixels)
      if n != model.batch_size:  # the last batch of a bundle: pad to the one compiled shape
        padded = np.zeros(shape, np.uint8)
        padded[:n] = pixels
        pixels = padded
      dispatched.append((n, model.forward(pixels)))
    out = []
    for n, outputs in dispatched:
      out.append(PredictionResult(None, tuple(None if o is None else np.asarray(o)[:n]
                                              for o in outputs)))
    Metrics.counter(self.get_metrics_namespace(), 'num_images').inc(
        sum(n for n, _ in dispatched))
    return out

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    return sum(int(np.asarray(b).nbytes) for b in batch)

  def get_metrics_namespace(self) -> str:
    return 'ClipVisionModelHandler'

  def batch_elements_kwargs(self):
    if self._batched:  # each element is a device batch already
      return {'min_batch_size': 1, 'max_batch_size': 1}
    # Fixed batches: the jitted function compiles once (the last one is padded).
    return {'min_batch_size': self._batch_size, 'max_batch_size': self._batch_size}
