r"""Classifies a dataset with a chosen rung and writes the predictions as Parquet.

  python -m pipelines.predict --dataset=folder:new_images --head=probe:runs/demo/probe \
      --output_dir=runs/demo/predictions

``--head`` is ``probe:DIR`` or ``zeroshot:DIR`` (the backbone the run recorded, its saved
head folded into the jitted forward) or ``finetune:WORKDIR`` (the selected configuration;
``--mode`` picks among several methods, ``full+wise`` the WiSE-FT model). ``--embeddings=DIR``
with a probe or zero-shot head classifies stored embeddings with no backbone pass.
``--dataset`` takes every source the embed stage reads; unlabelled inputs are fine
(a folder ``PATH/<split>/<image>``, a CSV with only image paths), their ``label`` is null.

The files it writes and their readers are ``pipelines.predictions``. Reads, decodes and
batches exactly as ``pipelines.embed`` (the same readers, the
same ``Preprocess`` step, the same RunInference handler with the head inside), and
writes ``<split>-NNNNN-of-MMMMM.parquet`` (id, prediction, prediction_name,
top_k_names, top_k_probabilities, label, label_name), sharded by a hash of the id
and sorted within a shard (reruns are byte-identical), ``dead_letters.<split>.jsonl``
and, last, ``predictions.json`` (head, model, class names, counts: found =
predicted + dead-lettered). Any Beam option (``--runner=DataflowRunner`` …) is passed on.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Any, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

import clip_transfer
from clip_transfer import flags
from clip_transfer import models
from clip_transfer import outputs
from clip_transfer.data import embeddings as emb_lib
from clip_transfer.data import sources as sources_lib
from clip_transfer.errors import Parser, UserError, cli_main
from clip_transfer.protocol import metrics as metrics_lib
from clip_transfer.protocol import rungs
from pipelines import embed
from pipelines import summaries
# read_predictions, RUN_FILE: where callers of this CLI have always found them.
from pipelines.predictions import (OWNED_FILES, RUN_FILE, SUMMARY_FILE, finalize,  # pylint: disable=unused-import
                                   read_predictions, read_summary, rows_for, write_shard,
                                   write_summary)
from pipelines.jax_handler import ClipVisionModelHandler, VisionModel

EXAMPLES_PER_SHARD = 100_000  # Parquet rows per shard (a few MB)


@dataclasses.dataclass
class PredictConfig(sources_lib.SourceOptions):
  """The predict stage's own flags (every other flag goes to Beam's PipelineOptions)."""

  head: str = flags.field(help='probe:DIR, zeroshot:DIR or finetune:WORKDIR')
  output_dir: str = flags.field(help='local path or any Beam filesystem (gs://…)')
  dataset: Optional[str] = flags.field(None, 'any source pipelines.embed reads (digits, '
                                       'folder:PATH, csv:PATH, parquet:GLOB, wds:PATTERN, TFDS)')
  embeddings: Optional[str] = flags.field(
      None, 'an embedding dataset to classify instead of --dataset (probe/zero-shot heads; no '
      'backbone pass)')
  mode: Optional[str] = flags.field(None, 'finetune: the method to use when WORKDIR holds '
                                    'several (a metrics.json key: full, full@probe+wise, …)')
  splits: tuple[str, ...] = flags.field((), 'comma-separated splits; empty: every split of '
                                        'the source')
  data_dir: Optional[str] = flags.field(None, 'TFDS data_dir for catalog datasets / digits')
  model: Optional[str] = flags.field(None, 'where the weights are now (default: the model the '
                                     'run recorded); refused unless its checksum matches')
  top_k: int = flags.field(5, 'class names and probabilities kept per image')
  batch_size: int = flags.field(32, 'fixed device batch (the last batch is padded)')
  examples_per_shard: int = flags.field(EXAMPLES_PER_SHARD, 'rows per Parquet shard')
  overwrite: bool = flags.field(False, 'replace predictions this tool wrote in --output_dir')
  preprocess_threads: int = flags.field(0, 'threads per worker process that decode and resize '
                                        '(0: one per core; 1: inline)')
  fast_decode: bool = flags.field(False, 'decode JPEGs at reduced DCT scale first (as embed)')
  dtype: Optional[str] = flags.field(None, 'compute dtype (default: the one the run used)')

  def __post_init__(self):
    if (self.dataset is None) == (self.embeddings is None):
      raise UserError('pass exactly one of --dataset (images) and --embeddings (an embedding '
                      'dataset)')
    if self.embeddings and self.head.startswith('finetune:'):
      raise UserError('--embeddings works with probe:DIR or zeroshot:DIR heads; a fine-tuned '
                      'model needs the images (--dataset)')
    for name in ('top_k', 'batch_size', 'examples_per_shard'):
      if getattr(self, name) < 1:
        raise UserError(f'--{name} must be >= 1, got {getattr(self, name)}')
    if self.preprocess_threads < 0:
      raise UserError('--preprocess_threads must be >= 0 (0: one per core)')
    if self.dtype is not None and self.dtype not in models.DTYPES:
      raise UserError(f'--dtype must be one of {", ".join(models.DTYPES)}, got {self.dtype!r}')
    for split in self.splits:
      if not embed.SPLIT_NAME.fullmatch(split):
        raise UserError(f'--splits: {split!r} is not a split name (letters, digits, _ and -)')


def parse_args(argv) -> tuple[PredictConfig, list[str]]:
  """(our config, the remaining flags for Beam)."""
  p = Parser(prog='python -m pipelines.predict', description=__doc__.split('\n\n')[0])
  flags.add_flags(p, PredictConfig)
  args, beam_args = p.parse_known_args(argv)
  # Beam's own options pass on; a near miss of ours (--bacth_size) is refused, not ignored.
  flags.refuse_near_misses(p, beam_args, set(PipelineOptions([]).get_all_options()))
  return flags.from_args(PredictConfig, args), beam_args


# --------------------------------------------------------------------------
# Rows and shards
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Beam
# --------------------------------------------------------------------------


class ClassifierModelHandler(ClipVisionModelHandler):
  """uint8 HWC images → (logits (C,),): the rung's backbone and head in one jitted function."""

  def __init__(self, rung: rungs.Rung, model: str, batch_size: int, dtype: str = 'float32'):
    # batched: each element is one stacked device batch (embed.Preprocess(batch=…)).
    super().__init__(model, batch_size, dtype=dtype, batched=True)
    # Workers need the head and what the network is built from, not metrics.json (its
    # per-example lists): Beam pickles the handler into the job, bz2 at level 9, on the
    # launcher, and each worker unpickles it; the time grows with every byte shipped.
    self._rung = dataclasses.replace(rung, header={}, entry={})

  def load_model(self) -> VisionModel:
    pre = models.load(self._model_name, self._dtype)
    # Weights are arguments, not constants baked into the program (see jax_handler).
    fn, params = logits_jit(self._rung, pre), self._rung.params(pre)
    return VisionModel(lambda pixels: (fn(params, pixels),), self._batch_size,
                       pre.preprocess.output_shape)


# jax.jit caches compilations on the function object: a fresh jax.jit per load traced and
# compiled the whole network again on every run in a process (most of predict's start-up in
# the profile: benchmark repeats, tests, notebooks). Weights and head values are arguments,
# so one program serves every rung of one structure; the key is what ``Rung.logits_fn``
# builds the program from (the params' pytree and shapes are jit's own key).
_LOGITS: dict[tuple, Any] = {}
_LOGITS_LOCK = threading.Lock()  # RunInference may load from several threads at once
_LOGITS_KEPT = 8  # programs kept per process (executables and a head; no backbone weights)


def logits_jit(rung: rungs.Rung, pretrained):
  """``jax.jit(rung.logits_fn(pretrained))``, built once per process for each structure."""
  import jax  # pylint: disable=g-import-not-at-top

  key = (pretrained.module, pretrained.preprocess, rung.kind, rung.feature,
         len(rung.class_names))
  with _LOGITS_LOCK:
    if key not in _LOGITS:
      while len(_LOGITS) >= _LOGITS_KEPT:
        del _LOGITS[next(iter(_LOGITS))]  # the oldest
      _LOGITS[key] = jax.jit(rung.logits_fn(pretrained))
    return _LOGITS[key]


class ToRow(beam.DoFn):
  """((split, ids, labels), PredictionResult of n rows) → ((split, shard), [row, …]).

  One output per shard the batch touches: the shard grouping moves lists, not single rows.
  """

  def __init__(self, class_names: list[str], label_map: list[int], top_k: int,
               num_shards: dict[str, int]):
    self._names, self._label_map, self._top_k = class_names, label_map, top_k
    self._num_shards = num_shards
    self._predicted = beam.metrics.Metrics.counter('predict', 'predicted')

  def process(self, element):
    (split, ids, labels), result = element
    (logits,) = result.inference
    head_labels = [self._label_map[label] if label is not None and label >= 0 else None
                   for label in labels]
    self._predicted.inc(len(ids))
    for index, rows in emb_lib.group_by_shard(
        rows_for(ids, logits, head_labels, self._names, self._top_k), lambda row: row['id'],
        self._num_shards[split]):
      yield (split, index), rows


def _write(element, output_dir, num_shards):
  (split, index), row_lists = element
  rows = [row for rows in row_lists for row in rows]
  return split, index, write_shard(output_dir, split, index, num_shards[split], rows)


def build(p: beam.Pipeline, args: PredictConfig, source: sources_lib.Source, rung: rungs.Rung,
          pretrained, label_map: list[int], splits: list[str], summary: dict,
          show_progress: bool = False) -> None:
  """Adds the predict transforms for ``splits`` to ``p``."""
  cfg = dataclasses.replace(pretrained.preprocess, fast_decode=args.fast_decode)
  threads = args.preprocess_threads
  window = 2 * args.batch_size if threads != 1 else 1  # as embed: two device batches ahead
  num_shards, prepared, dead_counts, founds, totals = {}, [], [], [], []
  for split in splits:
    total = source.num_examples(split)
    totals.append(total)
    num_shards[split] = (emb_lib.num_shards_for(total, args.examples_per_shard)
                         if total is not None else max(1, source.num_parts(split) or 1))
    ok, dead, found = embed.read_and_prepare(p, source, split, args.data_dir, cfg.to_json(),
                                             threads, window, args.batch_size)
    founds.append(found | f'KeyFound[{split}]' >> beam.Map(
        lambda n, split=split: (split, int(n))))
    prepared.append(ok)
    dead_counts.append(
        dead | f'FlattenDead[{split}]' >> beam.Flatten()
        | f'KeyDead[{split}]' >> beam.Map(lambda row, split=split: (split, row))
        | f'GroupDead[{split}]' >> embed._GroupWithEmpty(split)  # pylint: disable=protected-access
        | f'WriteDead[{split}]' >> beam.Map(embed.write_dead_letters, args.output_dir))
  handler = KeyedModelHandler(ClassifierModelHandler(rung, args.model, args.batch_size,
                                                     args.dtype))
  total = None if None in totals else sum(totals)
  results = (prepared
             | 'FlattenSplits' >> beam.Flatten()
             | 'RunInference' >> RunInference(handler)
             | 'Progress' >> beam.ParDo(embed.Progress(total, 'predict', show_progress,
                                                      batched=True))
             | 'ToRow' >> beam.ParDo(ToRow(rung.class_names, label_map, args.top_k, num_shards))
             | 'GroupShards' >> beam.GroupByKey()
             | 'WriteShard' >> beam.Map(_write, args.output_dir, num_shards))
  deads = dead_counts | 'FlattenDeadCounts' >> beam.Flatten()
  found = founds | 'FlattenFound' >> beam.Flatten()
  _ = (p
       | 'Once' >> beam.Create([None])
       | 'Finalize' >> beam.Map(finalize, args.output_dir, beam.pvalue.AsList(results),
                                beam.pvalue.AsList(deads), beam.pvalue.AsList(found),
                                num_shards, summary))


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def label_map(source_names, head_names, what: str) -> list[int]:
  """Source label index → the head's index; refuses a source whose classes the head lacks."""
  unknown = [n for n in source_names if n not in head_names]
  if unknown:
    raise UserError(f'{what} has classes the head does not know ({", ".join(unknown[:3])}'
                    f'{" …" if len(unknown) > 3 else ""}); the head was trained on '
                    f'{len(head_names)} classes: {", ".join(head_names[:10])}'
                    f'{" …" if len(head_names) > 10 else ""}')
  return [head_names.index(n) for n in source_names]


def _summary(args, rung: rungs.Rung, model: Optional[dict], source_record: dict) -> dict:
  return {'head': {'spec': rung.spec, 'method': rung.method, 'top1': rung.entry.get('top1'),
                   'top1_ci95': rung.entry.get('top1_ci95')},
          'model': model, 'class_names': rung.class_names, 'top_k': args.top_k,
          'source': source_record, 'code_version': clip_transfer.__version__}


def claim(output_dir: str, overwrite: bool, clear: bool = True) -> None:
  outputs.prepare_output_dir(output_dir, overwrite, 'predictions', OWNED_FILES,
                             complete=SUMMARY_FILE, clear=clear)


def open_head(spec: str, mode: Optional[str]) -> rungs.Rung:
  """The rung ``--head`` names, refused in one line on the launcher when it cannot be used.

  Incomplete, interrupted and diverged runs are refused by ``rungs.open_rung``. Heads are
  read here, on the launcher, from a local directory; a fine-tuned model is read again by
  every worker, so its class count is checked now (from the checkpoint's metadata, no
  weights loaded), not when the workers load it after the pipeline has started.
  """
  kind, _, path = spec.partition(':')
  scheme = FileSystems.get_scheme(path) if kind in rungs.KINDS else None  # gs, s3, …
  if scheme:
    where = ('a local path, the same on the launcher and on every worker (each worker '
             'restores the checkpoint from it)' if kind == 'finetune' else 'a local path')
    raise UserError(f'--head={spec}: the run directory must be {where}; a {scheme}:// '
                    'directory is not supported: copy it to local disk first')
  rung = rungs.open_rung(spec, mode)
  if rung.kind == 'finetune':
    columns = _finetuned_head_columns(rung)
    if columns != len(rung.class_names):
      raise UserError(f'{rung.path}: the selected checkpoint of {rung.method} ({rung.checkpoint}/'
                      f'{rung.step}) has a head of {columns} classes but metrics.json records '
                      f'{len(rung.class_names)} ({", ".join(rung.class_names[:5])}'
                      f'{" …" if len(rung.class_names) > 5 else ""}); the workdir is inconsistent')
  return rung


def _finetuned_head_columns(rung: rungs.Rung) -> int:
  """The number of classes of a fine-tuned checkpoint's head, from its metadata alone."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  try:
    mgr = ocp.CheckpointManager(rung.checkpoint, item_handlers=ocp.StandardCheckpointHandler())
    try:
      return int(mgr.item_metadata(rung.step)['params']['head']['kernel'].shape[-1])
    finally:
      mgr.close()
  except Exception as e:  # truncated files, another layout: as the workers would say it
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f'cannot read checkpoint {rung.checkpoint}/{rung.step} '
                    f'({type(e).__name__}: {reason})') from None


def run(argv=None, test_pipeline=None) -> dict[str, Any]:
  """Runs the pipeline; returns the summary (counts per split, seconds, output_dir)."""
  args, beam_args = parse_args(argv)
  rung = open_head(args.head, args.mode)
  if args.embeddings:
    return _run_embeddings(args, rung)
  # Unlabelled inputs (a folder's <split>/<image>, a CSV row with no label) are predicted too.
  source = sources_lib.open_source(args.dataset, args.data_dir, labels_optional=True,
                                   **sources_lib.source_options(args))
  splits = list(args.splits or source.splits or ['test'])
  for split in splits:
    source.check_split(split)
  labels = label_map(list(source.class_names), rung.class_names, f'--dataset={args.dataset}')
  # Claimed before the model loads: a file in the way or foreign files fail here.
  claim(args.output_dir, args.overwrite, clear=False)
  args.model = args.model or rung.model.get('name')
  args.dtype = args.dtype or rung.dtype
  pretrained = models.load(args.model, args.dtype)
  rung.check_model(pretrained)  # a head from other weights: one line, before any inference
  claim(args.output_dir, args.overwrite)
  summary = _summary(args, rung, {'name': args.model, 'weights_sha256': pretrained.checksum(),
                                  'compute_dtype': args.dtype},
                     {'spec': args.dataset, 'name': source.name, 'splits': splits})
  options = PipelineOptions(beam_args)
  options.view_as(SetupOptions).save_main_session = False  # code ships as a package
  local = test_pipeline is None and options.view_as(StandardOptions).runner is None
  start = time.perf_counter()
  p = test_pipeline or beam.Pipeline(
      runner=embed._local_runner() if local else None, options=options)  # pylint: disable=protected-access
  build(p, args, source, rung, pretrained, labels, splits, summary, show_progress=local)
  result = p.run()
  dry_run = summaries.dry_run(args.output_dir, options, result)
  if dry_run:  # DataflowRunner --dry_run=True: the job built, nothing submitted or run
    return dry_run
  result.wait_until_finish()
  return _finish(args, start, 'FnApiRunner (local)' if local else type(p.runner).__name__)


def _finish(args, start: float, runner: str) -> dict[str, Any]:
  seconds = time.perf_counter() - start
  failure = emb_lib.read_failure(args.output_dir)
  if failure:
    raise UserError(failure)
  counts = read_summary(args.output_dir)['counts']
  total = sum(c['read'] for c in counts.values())
  info = {'wall_s': seconds, 'num_images': total, 'images_per_s': total / seconds if seconds
          else 0.0, 'runner': runner, 'batch_size': args.batch_size}
  with outputs.create_file(FileSystems.join(args.output_dir, RUN_FILE)) as fh:
    fh.write(json.dumps(info, indent=1, sort_keys=True).encode())
  return {'output_dir': args.output_dir, 'counts': counts, 'seconds': seconds,
          'images_per_second': info['images_per_s']}


def _run_embeddings(args: PredictConfig, rung: rungs.Rung) -> dict[str, Any]:
  """A probe/zero-shot head over stored embeddings: no backbone, no Beam (arrays in memory)."""
  start = time.perf_counter()
  metadata = emb_lib.read_metadata(args.embeddings)
  recorded = metrics_lib.weights_checksum(metadata.get('model') or {})
  if recorded != rung.weights_sha256:
    raise UserError(f'{args.embeddings} was embedded with other weights ({str(recorded)[:12]}…) '
                    f'than {rung.spec} was made with ({str(rung.weights_sha256)[:12]}…)')
  labels = label_map(emb_lib.class_names(args.embeddings), rung.class_names,
                     f'--embeddings={args.embeddings}')
  splits = list(args.splits or (metadata.get('source') or {}).get('splits') or ['test'])
  claim(args.output_dir, args.overwrite)
  written, num_shards, counts = {}, {}, {}
  for split in splits:
    x, y, ids = emb_lib.read_split(args.embeddings, split, feature=rung.feature)
    num_shards[split] = emb_lib.num_shards_for(len(ids), args.examples_per_shard)
    rows = rows_for(ids, rung.feature_logits(x), [labels[v] for v in y], rung.class_names,
                    args.top_k)
    written[split] = {i: write_shard(args.output_dir, split, i, num_shards[split], rs)
                      for i, rs in emb_lib.group_by_shard(rows, lambda r: r['id'],
                                                          num_shards[split])}
    counts[split] = {'read': len(ids), 'written': len(ids), 'dead_lettered': 0}
  summary = _summary(args, rung, metadata.get('model'),
                     {'embeddings': args.embeddings, 'splits': splits})
  write_summary(args.output_dir, written, num_shards, {**summary, 'counts': counts})
  return _finish(args, start, 'in-process (stored embeddings)')


def summary_lines(summary: dict[str, Any]) -> list[str]:
  lines = [f'{split}: found {c["read"]}, predicted {c["written"]}, dead-lettered '
           f'{c["dead_lettered"]}' for split, c in summary['counts'].items()]
  return lines + [summaries.throughput_line(summary)]


# Defined here, not built by a helper: cli_main tells `python -m` runs by main's module.
@cli_main
def main(argv=None):
  print(summaries.run_for_cli(run, summary_lines, argv))


if __name__ == '__main__':
  main()
