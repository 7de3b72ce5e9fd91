"""The frozen vision tower as one jitted function: uint8 images in, pooled (and projected) features out.

The one home of "the feature a probe sees": the embed stage's Beam handler
(``pipelines.jax_handler``) and fine-tune's exact head-only solve both call
``vision_features``, so the two stages cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from clip_transfer.data.preprocess import normalize
from clip_transfer.errors import UserError


def vision_features(pretrained, projected: bool = False) -> tuple[Callable, Any]:
  """``(fn, weights)``: ``fn(weights, uint8 NHWC) → (pooled (B, D), projected (B, P) or None)``.

  ``pretrained`` is a ``clip_transfer.models.Pretrained``; normalisation runs
  inside jit, outputs are float32 whatever the compute dtype. Place ``weights``
  where the batches go (replicated over a mesh) before calling ``fn``.
  """
  vision, vision_vars = pretrained.vision_tower()
  project, proj_params = None, None
  if projected:
    if pretrained.projection_dim is None:
      raise UserError(f'{pretrained.name} has no visual_projection; drop --projected')
    # CLIP: visual_projection; SigLIP: the pooled feature itself (Pretrained.image_projection).
    project, proj_params = pretrained.image_projection()
  cfg = pretrained.preprocess

  # Weights are arguments, not closed-over constants: closed-over arrays would
  # be baked into the compiled program (slow compiles, a weights-sized
  # executable, no reuse from a compilation cache).
  @jax.jit
  def clip_vision_forward(weights, pixels):
    variables, proj = weights
    pooled = vision.apply(variables, normalize(pixels, cfg)).pooler_output
    if project is None:
      return pooled.astype(jnp.float32), None
    return pooled.astype(jnp.float32), project(proj, pooled).astype(jnp.float32)

  return clip_vision_forward, (vision_vars, proj_params)
