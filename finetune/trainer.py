"""train_and_evaluate(config, workdir): every mode of one fine-tune run, into one metrics.json.

The majority of logic lives in libraries beside it (config, steps, checkpoints,
sweep, wise, head_init, head_only, splits) so tests and notebooks can import
them; ``finetune.train`` is only flags and one call to ``train_and_evaluate``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from typing import Optional

import flax
import jax

from finetune import checkpoints
from finetune import groups
from finetune import head_init
from finetune import head_only
from finetune import input_pipeline
from finetune import model as model_lib
from finetune import splits
from finetune import sweep
from finetune.config import Config
from finetune.steps import check_batch_size, make_mesh
from clip_transfer import distributed
from clip_transfer import models
from clip_transfer import outputs
from clip_transfer.data import base as data_base
from clip_transfer.data import sources
from clip_transfer.errors import UserError
from clip_transfer.protocol import metrics as metrics_lib
from clip_transfer.protocol import validation

log = logging.getLogger(__name__)

# What a fine-tune run writes in its workdir (the rest is the user's, and never touched):
# fnmatch patterns, so a user's file anywhere under checkpoints/ is foreign (the run is refused).
OWNED_FILES = ('metrics.json', 'metrics.json.tmp', '.scratch-*',
                 'dead_letters.*.jsonl') + checkpoints.OWNED_FILES


def _write_metrics(workdir: str, header: dict, methods: dict, before: Optional[dict] = None) -> dict:
  """Merges into an existing metrics.json of the same run (other modes kept).

  Process 0 alone writes; the others return what it writes of this run
  (``before``: what the previous call returned).
  """
  header = json.loads(json.dumps(header))  # tuples → lists, as read back from the file
  if not distributed.is_writer():
    return {**header, 'methods': {**(before or {}).get('methods', {}), **methods}}
  out = {**header, 'methods': {}}
  if os.path.exists(os.path.join(workdir, 'metrics.json')):
    try:
      old = metrics_lib.read(workdir)
      same = all(old.get(k) == header[k] for k in ('dataset', 'model', 'num_train', 'num_eval',
                                                     'validation', 'eval', 'final_fit'))
      if same:
        out['methods'] = dict(old['methods'])
    except UserError:
      pass  # unreadable or not a metrics.json: replace it
  out['methods'].update(methods)
  metrics_lib.write(workdir, out)
  return out


def _check_wise(config: Config, solved: list[str]) -> None:
  """--wise mixes fine-tuned weights with the start: refused where no mode has any."""
  if not config.wise or not solved:
    return
  why = (f'--mode {", ".join(solved)} trains only the head from zeros, solved exactly (no '
         'fine-tuned weights to mix with the start)')
  if len(solved) == len(config.modes):
    raise UserError(f'--wise does not apply: {why}; drop --wise, or start the head from '
                    '--head_init=probe:DIR or zeroshot:DIR to fine-tune it')
  log.info('--wise applies to %s only: %s', ', '.join(m for m in config.modes if m not in solved),
           why)


def fit_batch_size(config: Config, num_fit: int, num_devices: int,
                   smallest_share: Optional[int] = None) -> Config:
  """The config with --batch_size at most the fit examples (a multiple of the devices), noted.

  ``smallest_share``: the fewest fit examples one device draws its part of each
  batch from (``input_pipeline.Shards``); the batch takes at most that many per device.
  """
  most = num_fit if smallest_share is None else min(num_fit, smallest_share * num_devices)
  if config.batch_size <= most:
    return config
  batch = most - most % num_devices
  if batch < 1:
    raise UserError(f'{num_fit} fit examples cannot fill one batch over the {num_devices} '
                    'devices; use more data or fewer devices')
  if most == num_fit:
    log.info('--batch_size %d is larger than the %d fit examples: using %d', config.batch_size,
             num_fit, batch)
  else:
    log.info('--batch_size %d takes more than the %d fit examples the smallest of the %d '
             "devices' shares holds per device: using %d", config.batch_size, smallest_share,
             num_devices, batch)
  return dataclasses.replace(config, batch_size=batch)


def train_and_evaluate(config: Config, workdir: str) -> dict:
  """Fine-tunes ``config.modes`` one after another; returns (and writes) metrics.json."""
  if distributed.process_count() > 1:
    distributed.check_balanced()
  mesh = make_mesh()
  check_batch_size(config.batch_size, mesh)
  # Refuses a file, a read-only directory or one holding files this tool did not write.
  # Process 0 claims it; the others write only their scratch files and checkpoint shards.
  distributed.on_writer(outputs.prepare_output_dir, workdir, overwrite=True,
                        kind='fine-tune workdir', owned=OWNED_FILES, flag='--workdir',
                        clear=False)
  if not distributed.is_writer():  # one set of progress bars
    config = dataclasses.replace(config, progress=False)
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
  initialised = model_lib.create(pretrained, len(class_names), config.seed, head=head,
                                 projected=projected)  # once for all modes
  params = flax.core.unfreeze(initialised[1])['params']
  plans = {mode: groups.plan(mode, params, backbone_lr_factor=config.backbone_lr_factor,
                             custom_rules=config.rules) for mode in config.modes}
  solved = [m for m, plan in plans.items() if head is None and plan.head_only(params)]
  _check_wise(config, solved)
  with tempfile.TemporaryDirectory(dir=workdir, prefix='.scratch-') as scratch:
    data = splits.prepare_data(source, pretrained, config, scratch)
    for split in (data.fit, data.fit_and_val):
      if split is not None:
        split.shards = input_pipeline.device_shards(split, mesh.size)
    config = fit_batch_size(config, data.fit.num_whole, mesh.size, data.fit.shards.smallest)
    devices = {'count': mesh.size, 'platform': jax.local_devices()[0].platform}
    if distributed.process_count() > 1:
      devices['processes'] = distributed.process_count()
    header = metrics_lib.header(
        'finetune',
        dataset={'spec': config.dataset, 'name': source.name, 'version': source.version,
                 'train_split': config.train_split, 'eval_split': config.eval_split},
        model={'name': pretrained.name, 'revision': pretrained.revision,
               metrics_lib.WEIGHTS_CHECKSUM: pretrained.checksum(),
               'preprocess': pretrained.preprocess.to_json(), 'dtype': config.dtype},
        class_names=class_names, num_train=data.fit.num_whole + data.val.num_whole,
        num_eval=data.eval.num_whole, num_fit=data.fit.num_whole, validation=data.validation,
        final_fit=config.final_fit,
        eval=validation.eval_record(data.eval.whole_ids, data.eval.whole_labels),
        dead_lettered={k: len(v) for k, v in data.dead.items()}, data_wall_s=data.wall_s,
        devices=devices)
    if distributed.is_writer():
      for split, dead in data.dead.items():  # beside metrics.json, as embed writes them
        data_base.write_dead_letters(workdir, split, dead)
    out = _write_metrics(workdir, header, {})
    for mode, plan in plans.items():
      if mode in solved:
        entries = {mode: head_only.solve_head_only(plan, pretrained, data, config, mesh)}
      else:
        entries = sweep.finetune_mode(mode, pretrained, data, config, workdir, mesh, initialised)
      if entries is not None:
        out = _write_metrics(workdir, header, entries, out)
  return out
