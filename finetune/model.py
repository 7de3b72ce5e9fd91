"""The Flax transfer-learning guide's model: Classifier(backbone, head) + pretrained weights."""

from __future__ import annotations

from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from clip_transfer.models import Pretrained
from clip_transfer.models.clip import Classifier
from clip_transfer.errors import UserError


class TransferError(UserError):
  """Pretrained variables that do not fit the initialised classifier."""


def create(pretrained: Pretrained, num_classes: int, seed: int = 0, *,
           head: Optional[tuple[np.ndarray, np.ndarray]] = None, projected: bool = False):
  """Returns ``(Classifier, variables)`` with the pretrained backbone transferred in.

  ``head``: a ``(kernel, bias)`` to start from instead of zeros (LP-FT, zero-shot
  initialisation). ``projected``: the head sits on L2-normalised projected
  features, the pretrained ``visual_projection`` transferred in as ``projection``.
  """
  backbone, backbone_vars = pretrained.vision_tower()
  if projected and pretrained.projection_dim is None:
    raise TransferError(f'{pretrained.name} has no visual_projection to put a head on')
  # SigLIP's image-text space is the pooled feature: normalised, nothing to project.
  project = projected and pretrained.image_projection()[1] is not None
  model = Classifier(num_classes=num_classes, backbone=backbone,
                     projection_dim=pretrained.projection_dim if project else None,
                     normalize=projected)
  h, w, c = pretrained.preprocess.output_shape
  # Shapes only: every leaf but the zero-initialised head is replaced by ``transfer`` below, so
  # running ``model.init`` (jitted: seconds of compiling, even for a micro model) would build a
  # whole random backbone only to discard it.
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(seed),
                             jnp.zeros((1, h, w, c), jnp.float32))
  variables = transfer(variables, backbone_vars)
  if project:
    variables = transfer(variables, {'params': pretrained.variables['params']['visual_projection']},
                         name='projection')
  if head is not None:
    kernel, bias = head
    variables = transfer(variables, {'params': {'kernel': np.asarray(kernel, np.float32),
                                                'bias': np.asarray(bias, np.float32)}},
                         name='head')
  # What no transfer replaced (the head, unless given) starts as Classifier's init: zeros.
  variables = jax.tree.map(
      lambda v: jnp.zeros(v.shape, v.dtype) if isinstance(v, jax.ShapeDtypeStruct) else v,
      variables)
  return model, variables


def transfer(variables, backbone_vars, name: str = 'backbone'):
  """Puts ``backbone_vars`` (all collections) under ``variables[col][name]``.

  Checks that the pretrained tree matches the initialised one leaf for leaf
  (paths and shapes) and raises TransferError naming the first mismatch.
  Accepts and returns dicts or FrozenDicts (the output has the input's type).
  """
  frozen = isinstance(variables, flax.core.FrozenDict)
  out = flax.core.unfreeze(variables)
  src = flax.core.unfreeze(backbone_vars)
  for col in src:
    if col not in out or name not in out[col]:
      raise TransferError(f'pretrained collection {col!r} has no place in the classifier '
                          f'(it has {sorted(out)})')
    out[col][name] = _checked(out[col][name], src[col], f'{col}/{name}')
  for col in out:  # e.g. batch_stats the backbone defines but the checkpoint lacks
    if name in out[col] and col not in src:
      raise TransferError(f'pretrained variables lack the collection {col!r} the backbone uses')
  return flax.core.freeze(out) if frozen else out


def _checked(target, source, where: str):
  t = traverse_util.flatten_dict(target, sep='/')
  s = traverse_util.flatten_dict(source, sep='/')
  for path, leaf in t.items():  # tree order: the first mismatch is the shallowest one
    if path not in s:
      raise TransferError(f'pretrained weights lack {where}/{path} '
                          f'(shape {tuple(leaf.shape)}); is it the same architecture?')
    if tuple(s[path].shape) != tuple(leaf.shape):
      raise TransferError(f'{where}/{path}: pretrained shape {tuple(s[path].shape)} != '
                          f'initialised shape {tuple(leaf.shape)}')
  extra = [p for p in s if p not in t]
  if extra:
    more = f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''
    raise TransferError(f'pretrained weights have {where}/{extra[0]}{more}, which the '
                        'classifier does not')
  # Copies: training donates its buffers, and the pretrained ones must outlive it.
  return traverse_util.unflatten_dict(
      {tuple(p.split('/')): jnp.array(s[p], t[p].dtype, copy=True) for p in t})

