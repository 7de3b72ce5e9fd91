"""A run's chosen rung as one classifier: probe:DIR, zeroshot:DIR or finetune:WORKDIR.

``open_rung(spec, mode)`` reads what a finished run left on disk (metrics.json,
the saved head, a fine-tune mode's ``best/`` Orbax checkpoint) and refuses, in
one line, a run that is incomplete, interrupted or diverged, before any model
is loaded. ``Rung.logits_fn(pretrained)`` is the jitted uint8 NHWC → logits
function (normalisation, backbone and head in one program) that
``pipelines.predict`` runs and ``finetune.export`` serialises;
``Rung.feature_logits`` applies a probe/zero-shot head to stored embeddings.

Fine-tune workdirs are read through their on-disk format:
``checkpoints/<method>/lr=<lr>/{best,curve.json}`` and metrics.json's
``selected`` {lr, step} (WiSE-FT: ``selected.alpha`` on the ``+wise`` entry).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Optional

import numpy as np

from clip_transfer.errors import UserError
from clip_transfer.protocol import heads

KINDS = ('probe', 'zeroshot', 'finetune')
PROBE_METHOD, ZEROSHOT_METHOD, WISE = 'jax', 'zeroshot', '+wise'
ANCHORED_PROBE_METHOD = 'zeroshot-anchored'  # methods.AnchoredMethod.name (methods imports JAX; this must not)


@dataclasses.dataclass
class Rung:
  """What a chosen rung needs to classify: its weights' record, classes and head."""

  kind: str  # probe | zeroshot | finetune
  path: str  # the run directory
  method: str  # the metrics.json key ('jax', 'zeroshot', 'full', 'full@probe+wise', …)
  class_names: list[str]
  model: dict  # metrics.json's model record: name, weights_sha256, …
  entry: dict  # metrics.json's methods[method]
  header: dict  # metrics.json without its methods (dataset, validation, eval)
  feature: str  # what the head reads: 'embedding' (pooled) or 'projected'
  head: dict  # probe: kernel, bias, mean, std; zeroshot: kernel, bias (on normalised features)
  checkpoint: Optional[str] = None  # finetune: the best/ directory of the selected config
  step: Optional[int] = None  # finetune: the selected step
  alpha: Optional[float] = None  # finetune +wise: the WiSE-FT mixing weight
  head_init: str = 'zeros'  # finetune: where its head started (the WiSE-FT start)

  @property
  def spec(self) -> str:
    return f'{self.kind}:{self.path}'

  @property
  def weights_sha256(self) -> Optional[str]:
    return self.model.get('weights_sha256')

  @property
  def dtype(self) -> str:
    """The compute dtype the run scored with (fine-tune's --dtype, the embed's)."""
    if self.kind == 'finetune':
      return self.model.get('dtype') or 'float32'
    meta = (self.header.get('metadata') or {}).get('model') or {}
    return meta.get('compute_dtype') or 'float32'

  def check_model(self, pretrained) -> None:
    """Refuses weights other than the ones the run was made with (one line)."""
    want, got = self.weights_sha256, pretrained.checksum()
    if want != got:
      raise UserError(f'{self.spec} was made with other weights ({str(want)[:12]}…, model '
                      f'{self.model.get("name")!r}) than {pretrained.name} ({got[:12]}…)')

  # ------------------------------------------------------------------ heads

  def feature_logits(self, x, xp=np):
    """Logits of a probe/zero-shot head on stored features (numpy, or jnp inside jit)."""
    h = self.head
    if self.kind == 'probe':  # exactly as the probe scored its eval split
      if self.feature == 'projected':  # the zero-shot-anchored probe's head: normalised first
        x = x / xp.linalg.norm(x, axis=-1, keepdims=True)
      return ((x - h['mean']) / h['std']) @ h['kernel'] + h['bias']
    if self.kind == 'zeroshot':
      x = x / xp.linalg.norm(x, axis=-1, keepdims=True)
      return x @ h['kernel'] + h['bias']
    raise ValueError('a fine-tuned rung has no head on stored features')

  # ------------------------------------------------------------ the network

  def params(self, pretrained) -> dict:
    """The weights ``logits_fn`` takes: backbone (+ projection) and head, as arrays."""
    if self.kind == 'finetune':
      return _finetuned_params(self, pretrained)
    _, vision_vars = pretrained.vision_tower()
    out = {'backbone': vision_vars['params'],
           'head': {k: np.asarray(v, np.float32) for k, v in self.head.items()}}
    kernel = pretrained.image_projection()[1] if self.feature == 'projected' else None
    if kernel is not None:  # SigLIP's projected feature is its pooled one: nothing to apply
      out['projection'] = {'kernel': kernel}
    return out

  def logits_fn(self, pretrained) -> Callable:
    """``fn(params, uint8 NHWC) -> float32 logits`` (not jitted: jit or export it)."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from clip_transfer.data.preprocess import normalize  # pylint: disable=g-import-not-at-top

    backbone, _ = pretrained.vision_tower()
    cfg = pretrained.preprocess
    if self.kind == 'finetune':
      from clip_transfer.models.clip import Classifier  # pylint: disable=g-import-not-at-top
      projected = self.feature == 'projected'
      project = projected and pretrained.image_projection()[1] is not None
      model = Classifier(len(self.class_names), backbone,
                         pretrained.projection_dim if project else None, normalize=projected)

      def finetuned(params, pixels):
        return model.apply({'params': params}, normalize(pixels, cfg)).astype(jnp.float32)
      return finetuned

    def with_head(params, pixels):
      x = backbone.apply({'params': params['backbone']}, normalize(pixels, cfg)).pooler_output
      x = x.astype(jnp.float32)  # the head as the probe applied it: float32 features
      if 'projection' in params:
        x = x @ params['projection']['kernel'].astype(jnp.float32)
      head = dataclasses.replace(self, head=params['head'])
      return head.feature_logits(x, jnp)
    return with_head


def open_rung(spec: str, mode: Optional[str] = None, flag: str = '--head') -> Rung:
  """``probe:DIR``, ``zeroshot:DIR`` or ``finetune:WORKDIR`` (``mode``: which fine-tuned method)."""
  kind, _, path = spec.partition(':')
  if kind not in KINDS or not path:
    raise UserError(f'{flag}={spec!r}: use probe:DIR, zeroshot:DIR or finetune:WORKDIR')
  if not os.path.isdir(path):
    raise UserError(f'{flag}={spec}: no such directory {path}')
  if mode and kind != 'finetune':
    raise UserError(f'--mode picks a fine-tuned method; {flag}={spec} is a {kind} run')
  metrics = _read_metrics(path, kind, flag)
  header = {k: v for k, v in metrics.items() if k != 'methods'}
  methods = metrics.get('methods') or {}
  names = [str(n) for n in metrics.get('class_names') or []]
  model = metrics.get('model') or {}
  if not model.get('weights_sha256'):
    raise UserError(f'{path}/metrics.json records no model.weights_sha256 to check the weights '
                    'against')
  if kind == 'probe':
    head = heads.load_head(path)
    # A head on projected features is the zero-shot-anchored probe's (probe.train --method).
    method = PROBE_METHOD if head.feature == 'embedding' else ANCHORED_PROBE_METHOD
    entry = _entry(methods, method, path)
    h = {'kernel': head.kernel, 'bias': head.bias, 'mean': head.mean, 'std': head.std}
    rung = Rung(kind, path, method, names, model, entry, header, head.feature, h)
    _check_head(rung, head.class_names, head.kernel.shape[1])
    return rung
  if kind == 'zeroshot':
    entry = _entry(methods, ZEROSHOT_METHOD, path)
    head = heads.load_zeroshot_head(path)
    kernel, bias = head.dense()
    rung = Rung(kind, path, ZEROSHOT_METHOD, names, model, entry, header, 'projected',
                {'kernel': kernel, 'bias': bias})
    _check_head(rung, head.class_names, kernel.shape[1])
    return rung
  return _open_finetune(path, mode, metrics, header, names, model)


def _read_metrics(path: str, kind: str, flag: str) -> dict:
  f = os.path.join(path, 'metrics.json')
  if not os.path.exists(f):
    # Every stage writes metrics.json last: without it the run did not finish.
    raise UserError(f'{flag}={kind}:{path} holds no metrics.json: not a {kind} run, or one that '
                    'was interrupted; finish it first')
  try:
    with open(f) as fh:
      m = json.load(fh)
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {f} ({type(e).__name__})') from None
  if m.get('stage') != kind:
    raise UserError(f'{f} is a {m.get("stage")!r} run, not a {kind} run; use '
                    f'{flag}={m.get("stage")}:{path}')
  return m


def _entry(methods: dict, method: str, path: str) -> dict:
  if method not in methods:
    raise UserError(f'{path}/metrics.json has no {method!r} result (has: '
                    f'{", ".join(methods) or "none"})')
  return methods[method]


def _check_head(rung: Rung, head_names: list[str], columns: int) -> None:
  if columns != len(rung.class_names) or list(head_names) != rung.class_names:
    raise UserError(f'{rung.path}: the saved head has {columns} classes '
                    f'({", ".join(head_names[:5])}…) but metrics.json records '
                    f'{len(rung.class_names)}; the run directory is inconsistent')


# --------------------------------------------------------------------------
# Fine-tune workdirs
# --------------------------------------------------------------------------


def config_key(lr: float, weight_decay: Optional[float] = None) -> str:
  """A configuration's name (its folder, its key in metrics.json): 'lr=…' plus ',wd=…' when swept."""
  return f'{lr:g}' if weight_decay is None else f'{lr:g},wd={weight_decay:g}'


def checkpoint_dir(workdir: str, method: str, lr: Optional[float] = None,
                   weight_decay: Optional[float] = None) -> str:
  """A fine-tuned method's checkpoints, or one configuration's (``lr``, swept ``weight_decay``) below it."""
  path = os.path.abspath(os.path.join(workdir, 'checkpoints', method.replace(':', '_')))
  return path if lr is None else os.path.join(path, f'lr={config_key(lr, weight_decay)}')


def wise_mix(alpha, start, tuned):
  """WiSE-FT's θ_α = (1−α)·θ_start + α·θ_tuned, jitted (fine-tune scores it; predict rebuilds it)."""
  return _wise_mix_jit()(alpha, start, tuned)


@functools.lru_cache(maxsize=None)
def _wise_mix_jit():
  import jax  # pylint: disable=g-import-not-at-top
  return jax.jit(lambda a, s, t: jax.tree.map(lambda x, y: ((1 - a) * x + a * y).astype(y.dtype),
                                              s, t))


def _trained(methods: dict) -> list[str]:
  return [k for k, v in methods.items() if not k.endswith(WISE) and 'lr' in v.get('selected', {})]


def _open_finetune(path, mode, metrics, header, names, model) -> Rung:
  methods = metrics.get('methods') or {}
  if not mode:
    bases = sorted({k[:-len(WISE)] if k.endswith(WISE) else k for k in methods})
    if len(bases) != 1:
      raise UserError(f'{path} holds several fine-tuned methods ({", ".join(bases) or "none"}); '
                      'pick one with --mode')
    mode = bases[0] + WISE if bases[0] + WISE in methods else bases[0]
  if mode not in methods:
    raise UserError(_missing_method(path, mode, methods))
  base = mode[:-len(WISE)] if mode.endswith(WISE) else mode
  if base not in _trained(methods):
    raise UserError(f'{path}: method {base!r} trained only the head and was solved exactly as '
                    'the probe solves it, so no weights were saved; use the probe '
                    '(--head=probe:DIR), the same classifier')
  entry, base_entry = methods[mode], methods[base]
  lr, step = float(base_entry['selected']['lr']), int(base_entry['selected']['step'])
  weight_decay = base_entry['selected'].get('weight_decay')  # present when it was swept
  ckpt = checkpoint_dir(path, base, lr, weight_decay)
  curve = _read_curve(ckpt, path, base)
  if not curve.get('done'):
    raise UserError(f'{path}: {base} lr={lr:g} was interrupted before it finished; finish it '
                    'with finetune.train --resume')
  if 'diverged_at_step' in curve:
    raise UserError(f'{path}: {base} lr={lr:g} diverged (NaN/inf loss at step '
                    f'{curve["diverged_at_step"]}); there is no model to use')
  best = os.path.join(ckpt, 'best')
  steps = sorted(int(d) for d in os.listdir(best) if d.isdigit()) if os.path.isdir(best) else []
  if step not in steps:
    raise UserError(f'{path}: the selected checkpoint of {base} (lr={lr:g}, step {step}) is '
                    f'missing from {best}')
  if not (isinstance(entry.get('top1'), float) and math.isfinite(entry['top1'])):
    raise UserError(f'{path}: {mode} has no finite top-1; the run diverged')
  projected = bool(base_entry.get('head_init', 'zeros').startswith('zeroshot:'))
  alpha = entry['selected']['alpha'] if mode.endswith(WISE) else None
  return Rung('finetune', path, mode, names, model, entry, header,
              'projected' if projected else 'embedding', {}, checkpoint=best, step=step,
              alpha=alpha, head_init=base_entry.get('head_init', 'zeros'))


def _read_curve(ckpt: str, path: str, base: str) -> dict:
  f = os.path.join(ckpt, 'curve.json')
  try:
    with open(f) as fh:
      return json.load(fh)
  except (OSError, ValueError):
    raise UserError(f'{path}: no readable {f}; the checkpoints of {base} are missing') from None


def _missing_method(path: str, mode: str, methods: dict) -> str:
  """Why a fine-tuned method has no result: interrupted, diverged, or never run."""
  base = mode[:-len(WISE)] if mode.endswith(WISE) else mode
  root = checkpoint_dir(path, base)
  curves = []
  if os.path.isdir(root):
    for d in sorted(os.listdir(root)):
      try:
        with open(os.path.join(root, d, 'curve.json')) as fh:
          curves.append(json.load(fh))
      except (OSError, ValueError):
        curves.append({'done': False})
  if curves and all('diverged_at_step' in c for c in curves):
    return f'{path}: {base} diverged at every learning rate; there is no model to use'
  if curves:
    return (f'{path}: {base} was interrupted before it was scored; finish it with '
            'finetune.train --resume')
  return f'{path}/metrics.json has no method {mode!r} (has: {", ".join(methods) or "none"})'


def restore_here(directory: str, step: Optional[int] = None):
  """(step, state as a plain tree on this process's first device) of a fine-tune checkpoint.

  Whatever devices and processes saved it (a 4-device or a multi-host run):
  Orbax would otherwise refuse a checkpoint saved on other devices. ``step``:
  the latest when None; (None, None) when the directory holds none.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  mgr = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
  try:
    step = mgr.latest_step() if step is None else step
    if step is None:
      return None, None
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                          mgr.item_metadata(step))
    return step, mgr.restore(step, args=ocp.args.StandardRestore(target))
  finally:
    mgr.close()


def _finetuned_params(rung: Rung, pretrained) -> dict:
  """The selected best/ state's params; mixed with the start for WiSE-FT, as fine-tune did."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  try:
    _, state = restore_here(rung.checkpoint, rung.step)
  except Exception as e:  # truncated files, another layout
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f'cannot read checkpoint {rung.checkpoint}/{rung.step} '
                    f'({type(e).__name__}: {reason})') from None
  params = jax.tree.map(jnp.asarray, state['params'])
  kernel = params['head']['kernel']
  if kernel.shape[-1] != len(rung.class_names):
    raise UserError(f'{rung.checkpoint}: the head has {kernel.shape[-1]} classes, metrics.json '
                    f'{len(rung.class_names)}')
  if rung.alpha is None:
    return params
  start = _start_params(rung, pretrained, params)
  return wise_mix(jnp.float32(rung.alpha), start, params)  # fine-tune's own mix: the same bits


def _start_params(rung: Rung, pretrained, tuned: dict) -> dict:
  """θ_start of WiSE-FT: the pretrained backbone (and projection) and the initial head."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  _, vision_vars = pretrained.vision_tower()
  start: dict[str, Any] = {'backbone': vision_vars['params']}
  kind, _, path = rung.head_init.partition(':')
  if kind == 'probe':
    kernel, bias = heads.load_head(path).folded()
  elif kind == 'zeroshot':
    kernel, bias = heads.load_zeroshot_head(path).dense()
  else:  # the Flax guide's zero-initialised head
    kernel, bias = np.zeros(tuned['head']['kernel'].shape), np.zeros(tuned['head']['bias'].shape)
  start['head'] = {'kernel': jnp.asarray(kernel, jnp.float32), 'bias': jnp.asarray(bias, jnp.float32)}
  if 'projection' in tuned:
    start['projection'] = pretrained.variables['params']['visual_projection']
  return start
