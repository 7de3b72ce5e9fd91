"""Linear probe on an embedding dataset, with the CLIP paper's scikit-learn baseline.

    python -m probe.train --embeddings=DIR --output_dir=OUT [--shots=1,5,10 --seeds=3]
    python -m probe.train --embeddings=DIR --output_dir=OUT --method=zeroshot-anchored \
        --zeroshot=ZS_DIR [--shots=…]

``--method=zeroshot-anchored`` fits logistic regression on L2-normalised
``projected`` features with weights W_zs + Δ, W_zs the zero-shot head in
ZS_DIR (probe.zeroshot's output), penalising ||Δ||²: the grid's largest
penalty (inf) is zero-shot itself, a small one a plain probe, so few labels
move the head only as far as they justify.

The L2 is chosen on the shared validation split (``clip_transfer.protocol.validation``, the
same examples fine-tune validates on), the eval split is scored once with the
chosen head, and every accuracy carries a bootstrap 95% interval. Few-shot
fits choose their L2 within the shots (true few-shot) unless
``--few_shot_selection=validation``; a seed's shots are drawn by example id
(``validation.few_shot``), the same in every stage and rerun.
``--final_fit=fit+validation`` refits the chosen L2 on fit ∪ validation.
Writes OUT/metrics.json and OUT/head.npz (apply it with probe.predict). The logic lives in ``train_probe`` /
``train_probe_arrays``, which tests call; ``main`` only parses and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from typing import Any, Optional, Sequence

import numpy as np

from probe import core
from probe.head import LinearHead
from clip_transfer import distributed
from clip_transfer import flags
from clip_transfer.protocol import metrics as metrics_lib
from clip_transfer import outputs
from clip_transfer.protocol import stats
from clip_transfer.protocol import heads as heads_lib
from clip_transfer.protocol import linear
from clip_transfer.protocol import methods
from clip_transfer.protocol import validation
from clip_transfer.errors import UserError, cli_main

BASELINES = ('sklearn',)
FEW_SHOT_SELECTION = ('within-shots', 'validation')
OWNED_FILES = ('metrics.json', 'metrics.json.tmp', 'head.npz')  # what a probe run writes


@dataclasses.dataclass
class ProbeConfig(distributed.DistributedOptions):
  """Every probe flag, declared once (``python -m probe.train --help`` lists them)."""

  embeddings: str = flags.field(help='embedding dataset directory (pipelines.embed)')
  output_dir: str = flags.field(help='where metrics.json and head.npz go')
  train_split: str = flags.field('train', 'split the head is fit (and validated) on')
  eval_split: str = flags.field('test', 'split scored once, with the chosen head')
  val_fraction: float = flags.val_fraction('the L2')
  seed: int = flags.field(0, 'validation split and few-shot draws')
  method: str = flags.field(
      'linear', 'the JAX head: linear (on the pooled embedding, standardised) or '
      'zeroshot-anchored (on L2-normalised projected features, pulled towards the '
      '--zeroshot head)', choices=core.PROBE_METHODS)
  zeroshot: Optional[str] = flags.field(None, 'a probe.zeroshot --output_dir (same weights and '
                                        'classes): the head --method=zeroshot-anchored starts '
                                        'at and is pulled towards')
  l2_grid: Optional[tuple[float, ...]] = flags.field(
      None, 'L2 strengths on the mean loss; sklearn gets C = 1/(N*l2). Default: '
      f'{",".join(map(str, core.DEFAULT_L2_GRID))} (linear); '
      f'{",".join(map(str, methods.DEFAULT_ANCHOR_GRID))} (zeroshot-anchored: the penalty on '
      'the offset from zero-shot; inf is zero-shot itself)')
  solver: str = flags.field('lbfgs', 'the JAX head\'s solver', choices=core.linear.SOLVERS)
  baselines: Optional[tuple[str, ...]] = flags.field(
      None, "comma-separated; '' for none. Default: sklearn beside the linear probe, none "
      'beside the anchored one (the baseline is the plain probe\'s)')
  final_fit: str = flags.field(
      'fit', 'what the chosen L2 is finally fit on: fit (the fit part alone, as fine-tune) or '
      'fit+validation (refit on fit and validation after selection, the CLIP paper\'s and '
      'ELEVATER\'s protocol); few-shot fits use their shots only either way',
      choices=methods.FINAL_FITS)
  shots: tuple[int, ...] = flags.field((), 'few-shot sizes (examples per class), e.g. 1,5,10')
  seeds: int = flags.field(3, 'few-shot draws per size')
  few_shot_selection: str = flags.field(
      'within-shots', 'how a few-shot fit chooses its L2: within-shots (true few-shot: '
      'cross-validation inside the k shots; k=1 takes the grid\'s largest L2) or validation '
      '(the common protocol: the whole validation split, labels beyond the shots)',
      choices=FEW_SHOT_SELECTION)
  max_iter: int = flags.field(core.linear.MAX_ITER, 'solver iterations, both methods')
  tol: float = flags.field(core.linear.TOL, 'stop at max |gradient| <= tol')
  progress: bool = flags.field(True, 'progress bars on stderr')
  overwrite: bool = flags.field(False, 'replace the probe run this tool wrote in --output_dir '
                                '(nothing else is ever removed)')

  def __post_init__(self):
    """Every flag checked before any data is read."""
    if self.method not in core.PROBE_METHODS:
      raise UserError(f'--method must be one of {", ".join(core.PROBE_METHODS)}, '
                      f'got {self.method!r}')
    anchored = self.method == 'zeroshot-anchored'
    if self.zeroshot and not anchored:
      raise UserError('--zeroshot is the head --method=zeroshot-anchored starts from; pass '
                      'that too, or drop --zeroshot')
    if self.l2_grid is None:
      self.l2_grid = methods.DEFAULT_ANCHOR_GRID if anchored else core.DEFAULT_L2_GRID
    self.l2_grid = tuple(float(v) for v in self.l2_grid)
    # inf (stay at zero-shot) only means something for the anchored head.
    if not self.l2_grid or any(math.isnan(v) or v <= 0 or (math.isinf(v) and not anchored)
                               for v in self.l2_grid):
      raise UserError(f'--l2_grid needs positive numbers{" (or inf)" if anchored else ""}, got '
                      f'{list(self.l2_grid)}')
    if self.baselines is None:
      self.baselines = () if anchored else BASELINES
    self.baselines = tuple(self.baselines)
    if anchored and self.baselines:
      raise UserError('--baselines: the sklearn baseline is the plain probe\'s; run it with '
                      '--method=linear (report.compare puts both runs side by side)')
    if self.final_fit not in methods.FINAL_FITS:
      raise UserError(f'--final_fit must be one of {", ".join(methods.FINAL_FITS)}')
    if self.solver not in core.linear.SOLVERS:
      raise UserError(f'--solver must be one of {", ".join(core.linear.SOLVERS)}, '
                      f'got {self.solver!r}')
    unknown = [b for b in self.baselines if b not in BASELINES]
    if unknown:
      raise UserError(f'unknown baseline {unknown[0]!r}; choose from {", ".join(BASELINES)}')
    flags.check_shared(self)
    bad = [k for k in self.shots if k < 1]
    if bad:
      raise UserError(f'--shots must be positive integers, got {bad[0]}')
    if self.seeds < 1:
      raise UserError(f'--seeds must be at least 1, got {self.seeds}')
    if self.few_shot_selection not in FEW_SHOT_SELECTION:
      raise UserError(f'--few_shot_selection must be one of {", ".join(FEW_SHOT_SELECTION)}')
    if self.max_iter < 1 or not self.tol > 0:
      raise UserError('--max_iter must be >= 1 and --tol > 0')
    if self.train_split == self.eval_split:
      raise UserError(f'--train_split and --eval_split are both {self.train_split!r}; the L2 is '
                      'chosen on part of train, so evaluate on another split')
    if self.output_dir and os.path.isfile(self.output_dir):
      raise UserError(f'--output_dir {self.output_dir} is a file; pass a directory')

  def methods(self, zeroshot_head: Optional[heads_lib.ZeroshotHead] = None) -> list[core.Method]:
    """The JAX head first (the one saved), then the baselines."""
    kw = dict(solver=self.solver, max_iter=self.max_iter, tol=self.tol)
    if self.method == 'zeroshot-anchored':
      jax_method = core.AnchoredMethod(anchor=np.asarray(zeroshot_head.head, np.float32).T,
                                       scale=float(np.exp(zeroshot_head.logit_scale)), **kw)
    else:
      jax_method = core.JaxMethod(**kw)
    return [jax_method] + [core.METHODS[b](max_iter=self.max_iter, tol=self.tol)
                           for b in self.baselines]


def check_split(name: str, x: np.ndarray, y: np.ndarray, num_classes: int,
                ids: Optional[Sequence[str]] = None) -> None:
  """One clear error for each way a split can be unusable."""
  if len(x) == 0:
    raise UserError(f'split {name!r} is empty')
  if x.ndim != 2:
    raise UserError(f'split {name!r}: embeddings must be (N, D), got shape {x.shape}')
  bad = ~np.isfinite(x).all(axis=1)
  if bad.any():
    first = ids[int(np.argmax(bad))] if ids is not None else int(np.argmax(bad))
    raise UserError(f'split {name!r}: {int(bad.sum())} embeddings hold NaN or inf '
                    f'(first: {first}); re-run the embed stage on those inputs')
  out = (y < 0) | (y >= num_classes)
  if out.any():
    raise UserError(f'split {name!r}: label {int(y[np.argmax(out)])} is out of range for '
                    f'{num_classes} classes')


def check_splits(train: tuple, evaluation: tuple, num_classes: int,
                 names: tuple[str, str] = ('train', 'test')) -> None:
  """Per-split checks, then the ones between splits."""
  for name, split in zip(names, (train, evaluation)):
    check_split(name, *split, num_classes)
  if train[0].shape[1] != evaluation[0].shape[1]:
    raise UserError(f'embedding width differs between splits: {names[0]!r} has '
                    f'{train[0].shape[1]}, {names[1]!r} has {evaluation[0].shape[1]}')
  if len(np.unique(train[1])) < 2:
    raise UserError(f'split {names[0]!r} holds a single class ({int(train[1][0])}); a probe '
                    'needs at least two')




def json_l2(l2: float):
  """An L2 as metrics.json holds it: inf (the anchored head at zero-shot) as the string 'inf'."""
  return float(l2) if math.isfinite(l2) else 'inf'


def _entry(fitted: core.Fitted, y_eval: np.ndarray, class_names: Sequence[str], method,
           trainable_params: int) -> dict:
  m = metrics_lib.classification(fitted.eval_logits, y_eval, class_names)
  refit = ' and its refit on fit+validation' if fitted.final_fit == 'fit+validation' else ''
  return {**m, 'l2': json_l2(fitted.l2), 'wall_s': fitted.wall_s, 'solver': method.solver,
          'iterations': fitted.n_iter, 'sweep': fitted.sweep, 'final_fit': fitted.final_fit,
          'trainable_params': trainable_params,
          'cost': f'the L2 sweep{refit} and the chosen head\'s eval (the one-off embedding '
                  'apart)'}


def _few_shot(method: core.Method, k: int, x_fit, y_fit, ids_fit, x_val, y_val, x_eval, y_eval,
              class_names, config: ProbeConfig) -> dict:
  """k examples per class from the fit part, drawn by id; the L2 chosen within them or on validation."""
  t0 = time.perf_counter()
  runs, correct = [], []
  for s in range(config.seeds):
    idx = validation.few_shot(ids_fit, y_fit, k, config.seed * 1000 + s)
    if config.few_shot_selection == 'within-shots':
      l2 = core.cv_select_l2(method, x_fit[idx], y_fit[idx], len(class_names), config.l2_grid)
      fitted = core.select_and_fit(method, x_fit[idx], y_fit[idx], x_val[:0], y_val[:0], x_eval,
                                   len(class_names), [l2])
    else:
      fitted = core.select_and_fit(method, x_fit[idx], y_fit[idx], x_val, y_val, x_eval,
                                   len(class_names), config.l2_grid)
    pred = np.argmax(fitted.eval_logits, axis=1)
    ok = pred == y_eval
    correct.append(ok)
    # The draw's ids and predictions let the report pair methods seed by seed.
    runs.append({'top1': float(ok.mean()), 'l2': json_l2(fitted.l2), 'num_fit': int(len(idx)),
                 'draw_sha256': validation.ids_sha256([ids_fit[i] for i in idx]),
                 'predictions': pred.astype(int).tolist()})
  mean_correct = np.mean(correct, axis=0)  # per eval example, over the seeds
  top1s = [r['top1'] for r in runs]
  return {'shots': k, 'seeds': config.seeds, 'selection': config.few_shot_selection,
          'top1': float(np.mean(top1s)), 'top1_std': float(np.std(top1s)), 'top5': None,
          **metrics_lib.summarise(mean_correct, y_eval, class_names),
          'l2': [r['l2'] for r in runs], 'runs': runs, 'wall_s': time.perf_counter() - t0,
          'trainable_params': int(x_eval.shape[1] * len(class_names) + len(class_names))}


def _check_shots(shots: Sequence[int], y_fit: np.ndarray, class_names: Sequence[str]) -> None:
  if not shots:
    return
  counts = np.bincount(y_fit, minlength=len(class_names))
  present = counts[counts > 0]
  if max(shots) > present.min():
    c = int(np.flatnonzero(counts == present.min())[0])
    raise UserError(f'--shots {max(shots)}: class {class_names[c]!r} has only {present.min()} '
                    'training examples outside the validation split; use at most that many')


def _run_record(config: ProbeConfig, val: validation.Holdout, ids_eval, y_eval, dim: int) -> dict:
  """metrics.json's description of the run (before its methods)."""
  anchored = config.method == 'zeroshot-anchored'
  return {'num_train': int(len(val.fit) + len(val.val)), 'num_fit': int(len(val.fit)),
          'num_eval': int(len(y_eval)), 'dim': int(dim), 'validation': val.record,
          'final_fit': config.final_fit, 'eval': validation.eval_record(ids_eval, y_eval),
          'method': config.method,
          'feature': 'projected (L2-normalised)' if anchored else 'embedding (standardised)',
          'l2_grid': [json_l2(v) for v in config.l2_grid], 'solver': config.solver,
          'max_iter': config.max_iter, 'tol': config.tol, 'methods': {}}


def train_probe_arrays(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray,
                       y_eval: np.ndarray, class_names: Sequence[str],
                       output_dir: Optional[str] = None, *,
                       ids_train: Optional[Sequence[str]] = None,
                       ids_eval: Optional[Sequence[str]] = None,
                       header: Optional[dict] = None,
                       zeroshot_head: Optional[heads_lib.ZeroshotHead] = None,
                       **options) -> dict:
  """The probe protocol on arrays; returns the metrics dict (and writes it when output_dir is set).

  ``options`` are ``ProbeConfig`` fields. Without ids, row numbers stand in.
  ``method='zeroshot-anchored'`` takes projected features (normalised here)
  and the ``zeroshot_head`` they are anchored at.
  """
  config = ProbeConfig(embeddings='', output_dir=output_dir or '', **options)
  anchored = config.method == 'zeroshot-anchored'
  if anchored:
    if zeroshot_head is None:
      raise UserError('--method=zeroshot-anchored needs --zeroshot=DIR (a probe.zeroshot run)')
    shape = np.shape(zeroshot_head.head)
    if shape != (len(class_names), np.shape(x_train)[1]):
      raise UserError(f'the zero-shot head is {shape[1]}-d for {shape[0]} classes; the '
                      f'projected features are {np.shape(x_train)[1]}-d for {len(class_names)} '
                      'classes')
  class_names = list(class_names)
  num_classes = len(class_names)
  x_train, x_eval = np.asarray(x_train, np.float32), np.asarray(x_eval, np.float32)
  y_train, y_eval = np.asarray(y_train, np.int64), np.asarray(y_eval, np.int64)
  names = (config.train_split, config.eval_split)
  check_splits((x_train, y_train), (x_eval, y_eval), num_classes, names)
  ids_train = [str(i) for i in (ids_train if ids_train is not None else range(len(y_train)))]
  ids_eval = [str(i) for i in (ids_eval if ids_eval is not None else range(len(y_eval)))]
  # Eval examples in id order: every stage's predictions line up for paired comparisons.
  order = validation.eval_order(ids_eval)
  x_eval, y_eval, ids_eval = x_eval[order], y_eval[order], [ids_eval[i] for i in order]
  val = validation.split(ids_train, y_train, config.val_fraction, config.seed)
  if len(val.val) == 0 and (len(config.l2_grid) > 1 or
                            (config.shots and config.few_shot_selection == 'validation')):
    raise UserError(f'no validation examples (--val_fraction={config.val_fraction} of '
                    f'{len(y_train)}) to choose the L2 on; raise --val_fraction or pass a single '
                    '--l2_grid value')
  x_fit, y_fit = x_train[val.fit], y_train[val.fit]
  ids_fit = [ids_train[i] for i in val.fit]
  x_val, y_val = x_train[val.val], y_train[val.val]
  _check_shots(config.shots, y_fit, class_names)
  del x_train  # selection sees x_fit/x_val only

  head_params = int(x_eval.shape[1] * num_classes + num_classes)  # the Dense head, both methods
  out = dict(header or {}) or {'stage': 'probe', 'class_names': class_names,
                               'num_classes': num_classes}
  out.update(_run_record(config, val, ids_eval, y_eval, x_eval.shape[1]))
  methods = config.methods(zeroshot_head)
  fits = [core.select_and_fit(method, x_fit, y_fit, x_val, y_val, x_eval, num_classes,
                              config.l2_grid, progress=config.progress,
                              final_fit=config.final_fit) for method in methods]
  out['final_fit'] = fits[0].final_fit  # 'fit' when nothing was held out to add
  for method, fitted in zip(methods, fits):
    out['methods'][method.name] = _entry(fitted, y_eval, class_names, method, head_params)
  for k in config.shots:
    for method in methods:
      out['methods'][metrics_lib.method_name(method.name, shots=k)] = _few_shot(
          method, k, x_fit, y_fit, ids_fit, x_val, y_val, x_eval, y_eval, class_names, config)
  jax_fit = fits[0]  # the JAX head (methods() puts it first) is the one saved
  head = LinearHead(kernel=jax_fit.kernel, bias=jax_fit.bias, mean=jax_fit.standardizer.mean,
                    std=jax_fit.standardizer.std, class_names=class_names, l2=jax_fit.l2,
                    feature='projected' if anchored else 'embedding')
  if output_dir:
    os.makedirs(output_dir, exist_ok=True)
    head.save(output_dir)
    metrics_lib.write(output_dir, out)
  return out


def summary_table(metrics: dict) -> str:
  """A few lines: one per method and few-shot entry (top-1 with its 95% interval)."""
  pct = lambda v: '   -  ' if v is None else f'{100 * v:6.2f}'
  lines = [f'{"method":24s} {"top1":>7s} {"95% interval":>15s} {"bal.acc":>7s} {"l2":>9s} '
           f'{"wall_s":>8s}']
  for key, m in metrics['methods'].items():
    lo, hi = m['top1_ci95']
    l2 = float(np.median([float(v) for v in np.atleast_1d(m['l2'])]))  # 'inf' reads as inf
    lines.append(f'{key:24s} {pct(m["top1"]):>7s} {f"[{pct(lo)}, {pct(hi)}]":>15s} '
                 f'{pct(m["balanced_accuracy"]):>7s} {l2:9.1e} {m["wall_s"]:8.2f}')
  return '\n'.join(lines)


def load_anchor(path: str, embeddings: str, metadata: dict,
                class_names: Sequence[str]) -> tuple[heads_lib.ZeroshotHead, dict]:
  """The zero-shot head in ``path`` and its record, refused unless it fits this dataset.

  Same weights (the checksum zero-shot recorded against the one the images
  were embedded with) and the same classes: the same label names, or the
  same number on the same source dataset (zero-shot's --class_names renames
  them for the prompts).
  """
  if not os.path.isdir(path):
    raise UserError(f'--zeroshot {path}: no such directory; pass a probe.zeroshot --output_dir')
  zs = heads_lib.load_zeroshot_head(path)
  zm = metrics_lib.read(path)
  want = metrics_lib.weights_checksum(metadata.get('model') or {})
  got = metrics_lib.weights_checksum(zm.get('model') or {})
  if not want or got != want:
    raise UserError(f'--zeroshot: {path} was made with other weights ({str(got)[:12]}…) than '
                    f'the ones that embedded {embeddings} ({str(want)[:12]}…)')
  same_source = ((zm.get('dataset') or {}).get('name') ==
                 (metadata.get('source') or {}).get('name'))
  if len(zs.class_names) != len(class_names) or (list(zs.class_names) != list(class_names)
                                                 and not same_source):
    raise UserError(f'--zeroshot: {path} classifies {len(zs.class_names)} classes '
                    f'{zs.class_names[:5]}…, {embeddings} has {len(class_names)} '
                    f'{list(class_names)[:5]}…')
  record = {'dir': path, 'logit_scale': zs.logit_scale, 'num_templates': len(zs.templates),
            'top1': ((zm.get('methods') or {}).get('zeroshot') or {}).get('top1')}
  return zs, record


def _header(config: ProbeConfig, metadata: dict, class_names, num_train: int, num_eval: int,
            zeroshot_record: Optional[dict] = None) -> dict:
  from clip_transfer.data import embeddings as emb  # pylint: disable=g-import-not-at-top
  src, model = metadata.get('source', {}), metadata.get('model', {})
  return metrics_lib.header(
      'probe',
      dataset={'spec': src.get('spec'), 'name': src.get('name'), 'version': src.get('version'),
               'train_split': config.train_split, 'eval_split': config.eval_split},
      model={'name': model.get('name'), 'revision': model.get('revision'),
             'weights_sha256': metrics_lib.weights_checksum(model)},
      class_names=class_names, num_train=num_train, num_eval=num_eval,
      embeddings=config.embeddings, metadata=metadata,
      embedding=emb.read_run_info(config.embeddings),  # the one-off cost, for the report
      **({'zeroshot': zeroshot_record} if zeroshot_record else {}))


def train_probe(config: ProbeConfig) -> dict:
  """Reads two splits of an embedding dataset and runs the probe protocol on them."""
  from clip_transfer.data import embeddings as emb  # pylint: disable=g-import-not-at-top
  anchored = config.method == 'zeroshot-anchored'
  if anchored and not config.zeroshot:
    raise UserError('--method=zeroshot-anchored needs --zeroshot=DIR (a probe.zeroshot run on '
                    'the same embeddings)')
  claim = dict(overwrite=config.overwrite, kind='probe run', owned=OWNED_FILES,
               complete='metrics.json')
  if distributed.is_writer():  # process 0 alone writes (clip_transfer.distributed)
    # Refuses a file, a read-only directory, one holding files this tool did not write,
    # or a previous run without --overwrite (the rule of every stage); held exclusively.
    outputs.prepare_output_dir(config.output_dir, clear=False, **claim)
  metadata = emb.read_metadata(config.embeddings)
  class_names = emb.class_names(config.embeddings)
  if distributed.process_count() > 1:
    if anchored or config.final_fit != 'fit':
      raise UserError('--method=zeroshot-anchored and --final_fit=fit+validation are not '
                      'sharded over processes; run them as one process')
    if distributed.is_writer():
      outputs.prepare_output_dir(config.output_dir, **claim)
    return _train_probe_processes(config, metadata, class_names)
  feature, zs, zs_record = 'embedding', None, None
  if anchored:
    if 'projected' not in emb.feature_names(config.embeddings):
      raise UserError(f'{config.embeddings} has no projected feature: '
                      f'{(metadata.get("model") or {}).get("name")} is vision-only (no text '
                      'tower, so no zero-shot head to anchor at) or was embedded without '
                      '--projected; use --method=linear')
    zs, zs_record = load_anchor(config.zeroshot, config.embeddings, metadata, class_names)
    feature = 'projected'
  x_train, y_train, ids_train = emb.read_split(config.embeddings, config.train_split, feature)
  x_eval, y_eval, ids_eval = emb.read_split(config.embeddings, config.eval_split, feature)
  # Checked here too, so NaN errors can name the offending example's id.
  check_split(config.train_split, x_train, y_train, len(class_names), ids_train)
  check_split(config.eval_split, x_eval, y_eval, len(class_names), ids_eval)
  # The inputs hold up: only now remove the previous run's files (--overwrite).
  outputs.prepare_output_dir(config.output_dir, **claim)
  header = _header(config, metadata, class_names, len(y_train), len(y_eval), zs_record)
  options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
             if f.name not in ('embeddings', 'output_dir', 'overwrite')}
  return train_probe_arrays(x_train, y_train, x_eval, y_eval, class_names, config.output_dir,
                            ids_train=ids_train, ids_eval=ids_eval, header=header,
                            zeroshot_head=zs, **options)


def _train_probe_processes(config: ProbeConfig, metadata: dict, class_names) -> dict:
  """The probe over several processes: each reads, standardises and solves on its rows only.

  Labels and ids (small) are gathered to every process, so the validation
  split is the one a single process draws; the feature rows never leave
  their process. Same chosen L2, head and predictions as one process.
  """
  from clip_transfer.data import embeddings as emb  # pylint: disable=g-import-not-at-top
  if config.baselines:
    raise UserError('the scikit-learn baseline needs every embedding in one process; pass '
                    '--baselines= on a multi-host run')
  if config.shots:
    raise UserError('few-shot fits (--shots) are not sharded over processes; run them '
                    'as one process')
  part = (distributed.process_index(), distributed.process_count())
  num_classes = len(class_names)
  x_train, y_local, ids_local = emb.read_split(config.embeddings, config.train_split, part=part)
  x_eval, ye_local, ide_local = emb.read_split(config.embeddings, config.eval_split, part=part)
  for name, x, y, ids in ((config.train_split, x_train, y_local, ids_local),
                          (config.eval_split, x_eval, ye_local, ide_local)):
    if len(x):  # a process may hold no rows of a tiny split; emptiness is checked globally
      check_split(name, x, y, num_classes, ids)
  y_train, ids_train = distributed.gather_rows(y_local), distributed.gather_strings(ids_local)
  y_eval, ids_eval = distributed.gather_rows(ye_local), distributed.gather_strings(ide_local)
  check_splits((np.zeros((len(y_train), x_train.shape[1])), y_train),
               (np.zeros((len(y_eval), x_eval.shape[1])), y_eval), num_classes,
               (config.train_split, config.eval_split))
  val = validation.split(ids_train, y_train, config.val_fraction, config.seed)
  if len(val.val) == 0 and len(config.l2_grid) > 1:
    raise UserError(f'no validation examples (--val_fraction={config.val_fraction} of '
                    f'{len(y_train)}) to choose the L2 on; raise --val_fraction or pass a single '
                    '--l2_grid value')
  # This process's rows of the fit and validation parts, in the global order.
  mine = distributed.local_range(len(y_train))
  local_fit = val.fit[(val.fit >= mine.start) & (val.fit < mine.stop)]
  local_val = val.val[(val.val >= mine.start) & (val.val < mine.stop)]
  method = core.JaxMethod(solver=config.solver, max_iter=config.max_iter, tol=config.tol)
  fitted = core.select_and_fit(method, x_train[local_fit - mine.start], y_train[local_fit],
                               x_train[local_val - mine.start], y_train[val.val], x_eval,
                               num_classes, config.l2_grid,
                               progress=config.progress and distributed.is_writer())
  del x_train
  # Eval examples in id order, as one process scores them (validation.eval_order).
  order = validation.eval_order(ids_eval)
  fitted.eval_logits = fitted.eval_logits[order]
  y_eval, ids_eval = y_eval[order], [ids_eval[i] for i in order]
  out = _header(config, metadata, class_names, len(y_train), len(y_eval))
  out.update(_run_record(config, val, ids_eval, y_eval, x_eval.shape[1]))
  out['processes'] = distributed.process_count()
  head_params = int(x_eval.shape[1] * num_classes + num_classes)
  out['methods'][method.name] = _entry(fitted, y_eval, class_names, method, head_params)
  if distributed.is_writer():
    LinearHead(kernel=fitted.kernel, bias=fitted.bias, mean=fitted.standardizer.mean,
               std=fitted.standardizer.std, class_names=list(class_names),
               l2=fitted.l2).save(config.output_dir)
    metrics_lib.write(config.output_dir, out)
  return out


@cli_main
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  flags.add_flags(p, ProbeConfig)
  config = flags.from_args(ProbeConfig, p.parse_args(argv))
  distributed.initialize(config)
  with distributed.peer_failures():
    metrics = train_probe(config)
  if not distributed.is_writer():
    return
  print(summary_table(metrics))
  print(f'metrics: {os.path.join(config.output_dir, "metrics.json")}')


if __name__ == '__main__':
  main()
