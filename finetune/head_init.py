"""--head_init: the head another stage saved (probe, zero-shot), checked against this run first."""

from __future__ import annotations

from typing import Optional

import numpy as np

from finetune.config import Config
from clip_transfer import models
from clip_transfer.errors import UserError
from clip_transfer.protocol import heads
from clip_transfer.protocol import metrics as metrics_lib

def _check_source_run(path: str, pretrained: models.Pretrained, class_names) -> None:
  """A head from another stage's run must come from the same weights and classes."""
  try:
    m = metrics_lib.read(path)
  except UserError as e:
    raise UserError(f'--head_init: {e}') from None
  got = metrics_lib.weights_checksum(m.get('model'))
  if got != pretrained.checksum():
    raise UserError(f'--head_init: {path} was made with other weights ({str(got)[:12]}…) than '
                    f'{pretrained.name} ({pretrained.checksum()[:12]}…)')
  if list(m.get('class_names') or []) != list(class_names):
    raise UserError(f'--head_init: {path} has classes {m.get("class_names")}, the dataset '
                    f'{list(class_names)}')


def initial_head(config: Config, pretrained: models.Pretrained,
                 class_names) -> tuple[Optional[tuple[np.ndarray, np.ndarray]], bool]:
  """((kernel, bias) or None, head on projected features?) from ``--head_init``."""
  kind, _, path = config.head_init.partition(':')
  if kind == 'zeros':
    return None, False
  _check_source_run(path, pretrained, class_names)
  try:
    if kind == 'probe':  # the probe's standardisation folded into the Dense head
      head = heads.load_head(path)  # the zero-shot-anchored probe's reads normalised projected
      return head.folded(), head.feature == 'projected'
    # Zero-shot: exp(logit_scale) · cos(image, class text) = a head on normalised features.
    return heads.load_zeroshot_head(path).dense(), True
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f'--head_init: cannot read the head in {path} ({type(e).__name__})') from None

