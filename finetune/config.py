"""Fine-tune's configuration: every field is a CLI flag, every value checked before any work."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

from finetune import groups
from clip_transfer import distributed
from clip_transfer import flags
from clip_transfer import models
from clip_transfer.data import sources
from clip_transfer.errors import UserError
from clip_transfer.protocol import linear
from clip_transfer.protocol import metrics as metrics_lib

# Config fields that must not change between a run and its --resume.
RESUME_KEYS = ('dataset', 'class_names', 'image_column', 'label_column', 'label_field',
               'default_split', 'train_split', 'model', 'head_init', 'rules', 'backbone_lr_factor', 'epochs',
               'steps', 'batch_size', 'warmup', 'weight_decay', 'clip_norm', 'dtype',
               'augment', 'seed', 'limit_train', 'val_fraction', 'eval_every')
# Learning rates tried when --lr is not given (peak AdamW rates, after warmup). Wide on
# purpose: real CLIP weights want ~1e-5 for the backbone, a random or small model ~1e-3.
DEFAULT_LR_GRID = (1e-5, 1e-4, 1e-3)
HEAD_INITS = ('zeros', 'probe', 'zeroshot')
# What the scored model is trained on once its configuration is chosen.
FINAL_FITS = ('fit', 'fit+validation')


@dataclasses.dataclass
class Config(sources.SourceOptions, distributed.DistributedOptions):
  """Everything a fine-tune run depends on; each field is also its CLI flag (clip_transfer.flags)."""

  dataset: str = flags.dataset('digits')
  data_dir: Optional[str] = flags.data_dir()
  train_split: str = flags.field('train', 'split trained on (and validated on: see --val_fraction)')
  eval_split: str = flags.field('test', 'split scored once, for the selected configuration')
  model: str = flags.model()
  modes: tuple[str, ...] = flags.field(('linear',), 'comma-separated: ' + ', '.join(groups.MODES)
                                       + '; each trained from the same pretrained weights',
                                       flag='mode')
  rules: Optional[str] = flags.field(
      None, 'mode custom: JSON (or a JSON file) [[regex, null|"frozen"|lr_mult > 0], …] over '
      "'/'-joined param paths, e.g. '[[\"backbone/.*\", null], [\"head/.*\", 1]]'")
  backbone_lr_factor: float = flags.field(0.1, 'mode differential: backbone lr = lr × this (> 0)')
  lr: tuple[float, ...] = flags.field(
      (), 'peak learning rates to try, comma-separated; the best (lr, step) on the validation '
      f'split wins (default: {",".join(map(str, DEFAULT_LR_GRID))}). Modes that train only the '
      'head are solved exactly instead (see --l2_grid)')
  l2_grid: tuple[float, ...] = flags.field(
      linear.DEFAULT_L2_GRID, 'head-only modes (linear, last:0): L2 strengths tried, as the probe')
  head_init: str = flags.field(
      'zeros', 'where the head starts: zeros (the Flax guide), probe:DIR (LP-FT: the head '
      'probe.train saved in DIR, its standardisation folded in) or zeroshot:DIR (the class text '
      'embeddings probe.zeroshot saved, on L2-normalised projected features)')
  wise: tuple[float, ...] = flags.field(
      (), 'WiSE-FT: mixing weights α in [0, 1] to try, e.g. 0,0.25,0.5,0.75,1; the model '
      '(1-α)·start + α·fine-tuned with the best α on validation is scored too')
  val_fraction: float = flags.val_fraction('lr and step')
  final_fit: str = flags.field(
      'fit', 'what the scored model trains on once chosen: fit (the selected checkpoint itself) '
      'or fit+validation (the chosen configuration trained again on fit ∪ validation for the '
      'chosen number of steps; head-only modes refit at the chosen L2: the CLIP paper\'s '
      'protocol)')
  epochs: float = flags.field(3.0, 'training length per configuration (ignored with --steps)')
  steps: Optional[int] = flags.field(None, 'total optimizer steps per configuration')
  eval_every: Optional[int] = flags.field(None, 'steps between validation scores (default: one '
                                          'epoch)')
  batch_size: int = flags.field(64, 'global batch, divisible by the number of devices (of every '
                                'process)')
  warmup: float = flags.field(0.1, 'fraction of the steps spent warming up linearly from 0')
  weight_decay: tuple[float, ...] = flags.field(
      (1e-4,), 'AdamW decay, on kernels only; several values (comma-separated) are a grid crossed '
      'with --lr, the best (lr, weight decay, step) chosen on the validation split')
  clip_norm: float = flags.field(1.0, 'global gradient norm clip (0 = off)')
  dtype: str = flags.dtype()
  augment: bool = flags.field(False, 'random shifts of up to 1/8 of the image')
  seed: int = flags.field(0, 'validation split, shuffling, augmentation and head init')
  num_classes: Optional[int] = flags.field(None, 'optional check: the dataset must have this many '
                                           'classes')
  limit_train: Optional[int] = flags.field(None, 'use only the first N training examples')
  limit_eval: Optional[int] = flags.field(None, 'use only the first N eval examples')
  resume: bool = flags.field(False, 'continue from the latest checkpoints in workdir')
  stop_after: Optional[int] = flags.field(None, 'stop (checkpointed) once a configuration has '
                                          'done this many steps; finish with --resume')
  log_every: int = flags.field(10, 'steps between progress-bar metric updates (each one syncs)')
  progress: bool = flags.field(True, 'progress bars on stderr')

  def __post_init__(self):
    """Every flag checked before any data or model is loaded."""
    self.modes = tuple(m.strip() for m in self.modes if m.strip())
    if not self.modes:
      raise UserError('no --mode given')
    for mode in self.modes:
      groups.check_mode(mode, self.rules)
    for name in ('lr', 'l2_grid'):
      bad = [v for v in getattr(self, name) if not (math.isfinite(v) and v > 0)]
      if bad:
        raise UserError(f'--{name} values must be finite and > 0, got {bad[0]}')
    if not self.l2_grid:
      raise UserError('--l2_grid is empty')
    flags.check_shared(self)
    if self.val_fraction == 0:  # in range, but fine-tune always has something to choose
      raise UserError('--val_fraction 0: fine-tune chooses lr and step on the validation split; '
                      'use a fraction in (0, 1)')
    if self.steps is not None and self.steps <= 0:
      raise UserError('--steps must be positive')
    if not (math.isfinite(self.epochs) and self.epochs > 0):
      raise UserError('--epochs must be positive')
    if self.eval_every is not None and self.eval_every < 1:
      raise UserError('--eval_every must be >= 1')
    if self.batch_size < 1:
      raise UserError(f'--batch_size must be >= 1, got {self.batch_size}')
    if isinstance(self.weight_decay, (int, float)):  # one value, from a library caller
      self.weight_decay = (float(self.weight_decay),)
    self.weight_decay = tuple(float(v) for v in self.weight_decay)
    if not self.weight_decay or not all(math.isfinite(v) for v in self.weight_decay):
      raise UserError(f'--weight_decay needs finite values, got {list(self.weight_decay)}')
    if not 0 <= self.warmup < 1 or min(self.weight_decay) < 0 or self.clip_norm < 0:
      raise UserError('--warmup must be in [0, 1); --weight_decay and --clip_norm >= 0')
    if self.train_split == self.eval_split:
      raise UserError(f'--train_split and --eval_split are both {self.train_split!r}')
    kind, _, path = self.head_init.partition(':')
    if kind not in HEAD_INITS or (kind == 'zeros') != (not path):
      raise UserError(f'--head_init {self.head_init!r}: use zeros, probe:DIR or zeroshot:DIR')
    if path and not os.path.isdir(path):
      raise UserError(f'--head_init {self.head_init!r}: no such directory {path}')
    if self.final_fit not in FINAL_FITS:
      raise UserError(f'--final_fit must be one of {", ".join(FINAL_FITS)}, got '
                      f'{self.final_fit!r}')
    if self.final_fit != 'fit' and self.wise:
      raise UserError('--wise chooses α on the validation split, which --final_fit='
                      f'{self.final_fit} trains on; use one or the other')
    bad = [a for a in self.wise if not 0 <= a <= 1]
    if bad:
      raise UserError(f'--wise values must be in [0, 1], got {bad[0]}')

  def method_name(self, mode: str, wise: bool = False) -> str:
    """The metrics.json key: the mode, plus where the head started when not zeros (+ WiSE-FT)."""
    kind = self.head_init.partition(':')[0]
    return metrics_lib.method_name(mode, head_init=None if kind == 'zeros' else kind, wise=wise)

  @property
  def lrs(self) -> tuple[float, ...]:
    return tuple(self.lr) or DEFAULT_LR_GRID

  @property
  def decay_axis(self) -> bool:
    """True when weight decay is swept (else each configuration is named by its lr alone)."""
    return len(self.weight_decay) > 1

  def configurations(self) -> list[tuple[float, float]]:
    """The (lr, weight decay) grid one gradient-trained mode runs, lr varying fastest."""
    return [(lr, wd) for wd in self.weight_decay for lr in self.lrs]
