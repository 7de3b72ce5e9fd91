"""train_and_evaluate(config, workdir): every mode of one fine-tune run, into one metrics.json.

The majority of logic lives in libraries beside it (config, steps, checkpoints,
sweep, wise, head_init, head_only, splits) so tests and notebooks can import
them; ``finetune.train`` is only flags and one call to ``train_and_evaluate``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import flax
import jax

from finetune import groups
from finetune import head_init
from finetune import head_only
from finetune import input_pipeline
from finetune import model as model_lib
from finetune import splits
from finetune import sweep
from finetune.config import Config
from finetune.steps import check_batch_size, make_mesh
from clip_transfer import models
from clip_transfer import outputs
from clip_transfer.data import base as data_base
from clip_transfer.data import sources
from clip_transfer.errors import UserError
from clip_transfer.protocol import metrics as metrics_lib
from clip_transfer.protocol import validation

log = logging.getLogger(__name__)

# What a fine-tune run writes in its workdir (the rest is the user's, and never touched).
OWNED_FILES = ('metrics.json', 'metrics.json.tmp', 'checkpoints/*', '.scratch-*',
               'dead_letters.*.jsonl')


def _write_metrics(workdir: str, header: dict, methods: dict) -> dict:
  """Merges into an existing metrics.json of the same run (other modes kept)."""
  path = os.path.join(workdir, 'metrics.json')
  header = json.loads(json.dumps(header))  # tuples → lists, as read back from the file
  out = {**header, 'methods': {}}
  if os.path.exists(path):
    try:
      with open(path) as fh:
        old = json.load(fh)
      same = all(old.get(k) == header[k] for k in ('dataset', 'model', 'num_train', 'num_eval',
                                                     'validation', 'eval'))
      if same:
        out['methods'] = dict(old.get('methods', {}))
    except (OSError, ValueError):
      pass  # unreadable: replace it
  out['methods'].update(methods)
  metrics_lib.write(workdir, out)
  return out


def train_and_evaluate(config: Config, workdir: str) -> dict:
  """Fine-tunes ``config.modes`` one after another; returns (and writes) metrics.json."""
  mesh = make_mesh()
  check_batch_size(config.batch_size, mesh)
  # Refuses a file, a read-only directory or one holding files this tool did not write.
  outputs.prepare_output_dir(workdir, overwrite=True, kind='fine-tune workdir',
                             owned=OWNED_FILES, flag='--workdir', clear=False)
  source = sources.open_source(config.dataset, config.data_dir,
                               **sources.source_options(config))
  class_names = list(source.class_names)
  if config.num_classes is not None and config.num_classes != len(class_names):
    raise UserError(f'--num_classes {config.num_classes} but {config.dataset} has '
                    f'{len(class_names)} classes')
  for split in (config.train_split, config.eval_split):
    source.check_split(split)
  shared = source.shared_inputs((config.train_split, config.eval_split))
  if shared:
    log.warning('%d image(s) are listed in both %s and %s: scores on %s are not held out for '
                'them', shared, config.train_split, config.eval_split, config.eval_split)
  pretrained = models.load(config.model, config.dtype)
  head, projected = head_init.initial_head(config, pretrained, class_names)  # checked before the data
  with tempfile.TemporaryDirectory(dir=workdir, prefix='.scratch-') as scratch:
    data = splits.prepare_data(source, pretrained, config, scratch)
    input_pipeline.steps_per_epoch(len(data.fit), config.batch_size)  # batch fits the data
    header = metrics_lib.header(
        'finetune',
        dataset={'spec': config.dataset, 'name': source.name, 'version': source.version,
                 'train_split': config.train_split, 'eval_split': config.eval_split},
        model={'name': pretrained.name, 'revision': pretrained.revision,
               'weights_sha256': pretrained.checksum(),
               'preprocess': pretrained.preprocess.to_json(), 'dtype': config.dtype},
        class_names=class_names, num_train=len(data.fit) + len(data.val),
        num_eval=len(data.eval), num_fit=len(data.fit), validation=data.validation,
        final_fit='fit', eval=validation.eval_record(data.eval.ids, data.eval.labels),
        dead_lettered={k: len(v) for k, v in data.dead.items()}, data_wall_s=data.wall_s,
        devices={'count': mesh.size, 'platform': jax.local_devices()[0].platform})
    for split, dead in data.dead.items():  # beside metrics.json, as embed writes them
      data_base.write_dead_letters(workdir, split, dead)
    out = _write_metrics(workdir, header, {})
    initialised = model_lib.create(pretrained, len(class_names), config.seed, head=head,
                                   projected=projected)  # once for all modes
    params = flax.core.unfreeze(initialised[1])['params']
    for mode in config.modes:
      plan = groups.plan(mode, params, backbone_lr_factor=config.backbone_lr_factor,
                         custom_rules=config.rules)
      if head is None and plan.head_only(params):
        entries = {mode: head_only.solve_head_only(plan, pretrained, data, config, mesh)}
      else:
        entries = sweep.finetune_mode(mode, pretrained, data, config, workdir, mesh, initialised)
      if entries is not None:
        out = _write_metrics(workdir, header, entries)
  return out
