"""The anchored probe's start: the zero-shot head, refused unless it fits the embeddings."""

from __future__ import annotations

import os
from typing import Sequence

from clip_transfer.errors import UserError
from clip_transfer.protocol import heads as heads_lib
from clip_transfer.protocol import metrics as metrics_lib


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
