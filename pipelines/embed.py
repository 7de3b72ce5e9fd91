r"""Embeds a dataset with the CLIP vision tower into a TFDS-format embedding dataset.

  python -m pipelines.embed --dataset=digits --model=random:tiny \
      --output_dir=runs/demo/embeddings

Reads ``digits``, ``folder:PATH``, ``csv:PATH``, ``parquet:GLOB``, ``wds:PATTERN`` or a
TFDS catalog name (``clip_transfer.data.sources.open_source``), decodes and
preprocesses on the host (uint8), runs the jitted vision tower through
RunInference with fixed-size batches, and writes ArrayRecord shards through
Beam's FileSystems (local or gs://). Inputs that fail to load, decode or
preprocess go to ``dead_letters.<split>.jsonl`` (id + reason) and are counted.
Any Beam option (``--runner=DataflowRunner``, ``--project``, …) is passed on.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import time
from typing import Any, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

import clip_transfer
from pipelines import reads
from pipelines import summaries
from pipelines import read_common
from pipelines.read_common import DEAD, NAMESPACE
from pipelines.jax_handler import ClipVisionModelHandler
from clip_transfer import models
from clip_transfer.data import embeddings as emb_lib
from clip_transfer import flags
from clip_transfer.data import base as data_base
from clip_transfer.data import sources as sources_lib
from clip_transfer.errors import Parser, UserError, cli_main

SPLIT_NAME = re.compile(r'[\w-]+')  # what TFDS' shard file names can hold


@dataclasses.dataclass
class EmbedConfig(sources_lib.SourceOptions):
  """The embed stage's own flags (every other flag goes to Beam's PipelineOptions)."""

  dataset: str = flags.dataset()
  output_dir: str = flags.field(help='local path or any Beam filesystem (gs://…)')
  data_dir: Optional[str] = flags.data_dir()
  splits: tuple[str, ...] = flags.field(('train', 'test'), 'comma-separated splits to embed')
  model: str = flags.model()
  batch_size: int = flags.field(32, 'fixed device batch (the last batch is padded: one '
                                'compilation)')
  projected: Optional[bool] = flags.field(
      None, 'store the visual_projection output as feature `projected` (zero-shot needs it); '
      'default: when the model has a projection (--no_projected to skip)')
  examples_per_shard: int = flags.field(emb_lib.EXAMPLES_PER_SHARD,
                                        'sets the number of ArrayRecord shards per split')
  overwrite: bool = flags.field(False, 'replace a dataset this tool wrote in --output_dir '
                                '(nothing else is ever removed)')
  preprocess_threads: int = flags.field(0, 'threads per worker process that decode and resize '
                                        '(0: one per core; 1: inline, no pool)')
  fast_decode: bool = flags.field(False, 'decode JPEGs at reduced DCT scale (still >= the resize '
                                  'target) before the exact resize: faster, not bit-identical to '
                                  'CLIPImageProcessor; recorded in metadata')
  dtype: str = flags.dtype()  # recorded in metadata

  def __post_init__(self):
    if self.batch_size < 1:
      raise UserError(f'--batch_size must be >= 1, got {self.batch_size}')
    if self.examples_per_shard < 1:
      raise UserError(f'--examples_per_shard must be >= 1, got {self.examples_per_shard}')
    if not self.splits:
      raise UserError('--splits is empty')
    twice = sorted({s for s in self.splits if self.splits.count(s) > 1})
    if twice:
      raise UserError(f'--splits names {", ".join(twice)} more than once')
    for split in self.splits:
      if not SPLIT_NAME.fullmatch(split):
        raise UserError(f'--splits: {split!r} is not a split name TFDS can store '
                        '(letters, digits, _ and - only)')
    if self.preprocess_threads < 0:
      raise UserError(f'--preprocess_threads must be >= 0 (0: one per core), got '
                      f'{self.preprocess_threads}')
    flags.check_shared(self)


def parse_args(argv) -> tuple[EmbedConfig, list[str]]:
  """(our config, the remaining flags for Beam)."""
  p = Parser(description=__doc__.split('\n\n')[0])  # no abbreviations: see Parser
  flags.add_flags(p, EmbedConfig)
  args, beam_args = p.parse_known_args(argv)
  # Beam's own options pass on; a near miss of ours (--bacth_size) is refused, not ignored.
  flags.refuse_near_misses(p, beam_args, set(PipelineOptions([]).get_all_options()))
  return flags.from_args(EmbedConfig, args), beam_args


# --------------------------------------------------------------------------
# DoFns
# --------------------------------------------------------------------------


class Preprocess(beam.DoFn):
  """(id, label, image) → ((split, id, label), uint8 HWC); failures are dead letters.

  Images are prepared on a process-wide thread pool (``threads``: 0 = one per
  core of the worker, 1 = inline), up to ``window`` ahead, outputs in input
  order: the pool keeps working while RunInference, fused after this step,
  waits on the device.

  ``batch`` > 0 (embed): the prepared images leave stacked, ``batch`` at a time
  (fewer at a bundle's end), as ``((split, ids, labels), uint8 (n, H, W, 3))``:
  every later step pays Beam's per-element cost once per batch. A failed image
  is still dead-lettered alone; its batch is filled by the next images.

  ``reader`` (``reads.Chunks.reader``): elements are chunks of a source's parts, each
  read by the source's reader and prepared in one pool task (``read_prepared``), so a
  folder's file costs no Beam element and no pool task of its own; its dead inputs,
  unreadable or undecodable, leave one by one on the dead-letter output.
  """

  def __init__(self, preprocess_json: dict, split: str, threads: int = 1, window: int = 1,
               batch: int = 0, reader=None):
    self._cfg_json, self._split = preprocess_json, split
    self._threads, self._window, self._batch = threads, window, batch
    self._reader = reader
    self._read, self._dead = read_common.counters(split)  # the readers' counters

  def setup(self):
    from clip_transfer.data.preprocess import PreprocessConfig  # pylint: disable=g-import-not-at-top
    self._cfg = PreprocessConfig.from_json(self._cfg_json)

  def start_bundle(self):
    from clip_transfer.data.preprocess import ParallelPrepare, host_cores  # pylint: disable=g-import-not-at-top
    # A chunk holds many images: two chunks per thread keep every thread busy while the
    # oldest one's results leave.
    window = 2 * (self._threads or host_cores()) if self._reader else self._window
    self._prepare = ParallelPrepare(self._cfg, self._threads, window)
    self._batches: dict = {}  # window → ([ids], [labels], [images]) not yet emitted

  def process(self, element, timestamp=beam.DoFn.TimestampParam,
              window=beam.DoFn.WindowParam):
    if self._reader is not None:
      ready = self._prepare.call((timestamp, window), read_prepared, self._reader, element,
                                 self._cfg)
    else:
      ex_id, label, image = element
      ready = self._prepare.put((ex_id, label, timestamp, window), image)
    for tag, result in ready:
      yield from self._ready(tag, result)

  def finish_bundle(self):
    for tag, result in self._prepare.drain():
      yield from self._ready(tag, result)
    for window, rows in self._batches.items():
      yield self._stacked(window, rows)
    self._batches = {}

  def _ready(self, tag, result):
    if self._reader is None:
      yield from self._output(tag, result)
      return
    if isinstance(result, Exception):
      raise result  # the source's reader failed: the bundle fails, as an inline read does
    from apache_beam.utils.windowed_value import WindowedValue  # pylint: disable=g-import-not-at-top

    timestamp, window = tag
    self._read.inc(len(result))
    for item in result:
      if isinstance(item, data_base.Dead):
        self._dead.inc()
        yield beam.pvalue.TaggedOutput(DEAD, WindowedValue(item, timestamp, [window]))
      else:
        ex_id, label, pixels = item
        yield from self._output((ex_id, label, timestamp, window), pixels)

  def _output(self, tag, result):
    from apache_beam.utils.windowed_value import WindowedValue  # pylint: disable=g-import-not-at-top

    ex_id, label, timestamp, window = tag
    if isinstance(result, Exception):  # ImageError, and anything else PIL raises on odd inputs
      self._dead.inc()
      yield beam.pvalue.TaggedOutput(
          DEAD, WindowedValue(data_base.Dead(ex_id, data_base.failure_reason(result)), timestamp,
                              [window]))
    elif not self._batch:
      yield WindowedValue(((self._split, ex_id, label), result), timestamp, [window])
    else:
      rows = self._batches.setdefault(window, ([], [], []))
      for column, value in zip(rows, (ex_id, label, result)):
        column.append(value)
      if len(rows[0]) == self._batch:
        del self._batches[window]
        yield self._stacked(window, rows)

  def _stacked(self, window, rows):
    import numpy as np  # pylint: disable=g-import-not-at-top
    from apache_beam.utils.windowed_value import WindowedValue  # pylint: disable=g-import-not-at-top

    ids, labels, images = rows
    return WindowedValue(((self._split, tuple(ids), tuple(labels)), np.stack(images)),
                         window.max_timestamp(), [window])


def read_prepared(reader, parts, cfg) -> list:
  """A chunk's inputs (the source's reader) prepared: each a Dead input, or
  ``(id, label, pixels or the exception prepare raised)``."""
  from clip_transfer.data import preprocess  # pylint: disable=g-import-not-at-top

  out = []
  for item in reader(parts):
    if not isinstance(item, data_base.Example):
      out.append(data_base.Dead(*item))
      continue
    try:
      out.append((item.id, item.label, preprocess.prepare(item.image, cfg)))
    except Exception as e:  # pylint: disable=broad-except  (dead-lettered by Preprocess)
      out.append((item.id, item.label, e))
  return out


def read_and_prepare(p, source: sources_lib.Source, split: str, data_dir: Optional[str],
                     preprocess_json: dict, threads: int, window: int, batch: int):
  """A split read and prepared for RunInference (embed and predict): (stacked batches,
  [PCollections of Dead inputs], found: ints summing to the split's inputs).

  A folder's files come in chunks, each read and prepared in one pool task
  (``reads.read_chunks``); every other source through ``reads.read_split``.
  """
  chunks = reads.read_chunks(p, source, split)
  if chunks is not None:
    out = chunks.parts | f'Preprocess[{split}]' >> beam.ParDo(
        Preprocess(preprocess_json, split, threads, window, batch, chunks.reader)).with_outputs(
            DEAD, main='ok')
    return out.ok, [out[DEAD]], chunks.found
  read = reads.read_split(p, source, split, data_dir, threads)
  out = read.examples | f'Preprocess[{split}]' >> beam.ParDo(
      Preprocess(preprocess_json, split, threads, window, batch)).with_outputs(DEAD, main='ok')
  return out.ok, read.dead + [out[DEAD]], read.found


class Encode(beam.DoFn):
  """((split, ids, labels), PredictionResult of n rows) → ((split, shard), [(id, example)]).

  One output per shard the batch touches: the shard grouping moves lists, not single rows.
  """

  def __init__(self, dim: int, class_names: list[str], projected_dim: Optional[int],
               num_shards: dict[str, int]):
    self._args = (dim, class_names, projected_dim)
    self._num_shards = num_shards
    self._written = Metrics.counter(NAMESPACE, 'written')

  def setup(self):
    self._encoder = emb_lib.Encoder(*self._args)

  def process(self, element):
    (split, ids, labels), result = element
    pooled, projected = result.inference
    rows = zip(ids, self._encoder.encode_batch(ids, pooled, labels, projected))
    self._written.inc(len(ids))
    for index, shard_rows in emb_lib.group_by_shard(rows, lambda row: row[0],
                                                    self._num_shards[split]):
      yield (split, index), shard_rows


class Progress(beam.DoFn):
  """A tqdm bar per worker process on local runs (stderr; off when not a terminal)."""

  def __init__(self, total: Optional[int], desc: str, enabled: bool, batched: bool = False):
    self._total, self._desc, self._enabled = total, desc, enabled
    self._batched = batched  # elements are ((split, ids, labels), result): len(ids) images

  def setup(self):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self._bar = tqdm(total=self._total, desc=self._desc, unit='img', file=sys.stderr,
                     disable=None if self._enabled else True, mininterval=1.0)

  def process(self, element):
    self._bar.update(len(element[0][1]) if self._batched else 1)
    yield element

  def teardown(self):
    self._bar.close()


def write_dead_letters(split_and_rows, output_dir: str) -> tuple[str, int]:
  """Sorted JSON lines (id, reason) per split, as every stage writes them."""
  split, rows = split_and_rows
  return split, data_base.write_dead_letters(output_dir, split, rows)


def finalize(_, output_dir, shard_results, dead_counts, found_counts, num_shards, dim,
             class_names, projected_dim, metadata):
  """Runs once after every shard and dead-letter file: metadata, dataset_info.json last.

  Reconciles first: when a split's inputs found != written + dead-lettered, or
  nothing of a split was written, it writes ``failure.json`` (one line) instead
  of the metadata, and ``run`` turns that into the run's error.
  """
  shards: dict[str, dict[int, tuple[int, int]]] = {}
  for split, index, count, nbytes in shard_results:
    shards.setdefault(split, {})[index] = (count, nbytes)
  dead = dict(dead_counts)
  found: dict[str, int] = {}
  for split, n in found_counts:
    found[split] = found.get(split, 0) + n
  counts = {}
  for split in num_shards:
    written = sum(c for c, _ in shards.get(split, {}).values())
    counts[split] = {'read': found.get(split, 0), 'written': written,
                     'dead_lettered': dead.get(split, 0)}
  problem = emb_lib.check_counts(output_dir, counts)
  if problem:
    emb_lib.write_failure(output_dir, problem)
    return
  emb_lib.finalize(output_dir, shards, num_shards, dim, class_names,
                   {**metadata, 'counts': counts}, projected_dim)


# --------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------


def build(p: beam.Pipeline, args, source: sources_lib.Source, pretrained,
          show_progress: bool = False) -> None:
  """Adds the embed transforms for every split of ``args.splits`` to ``p``."""
  cfg = _preprocess_config(args, pretrained)
  dim = pretrained.embedding_dim
  projected_dim = pretrained.projection_dim if args.projected else None
  num_shards, prepared, dead_counts, totals, founds = {}, [], [], [], []
  threads = args.preprocess_threads  # 0 is resolved on the worker: its cores, not the launcher's
  # Two device batches ahead: batch k+1 is ready when batch k's results return.
  window = 2 * args.batch_size if threads != 1 else 1
  for split in args.splits:
    total = source.num_examples(split)
    totals.append(total)
    # An unknown count (WebDataset without a label scan): one output shard per input file.
    num_shards[split] = (emb_lib.num_shards_for(total, args.examples_per_shard)
                         if total is not None else max(1, source.num_parts(split) or 1))
    ok, dead, found = read_and_prepare(p, source, split, args.data_dir, cfg.to_json(), threads,
                                       window, args.batch_size)
    founds.append(found | f'KeyFound[{split}]' >> beam.Map(
        lambda n, split=split: (split, int(n))))
    prepared.append(ok)
    dead_counts.append(
        dead | f'FlattenDead[{split}]' >> beam.Flatten()
        | f'KeyDead[{split}]' >> beam.Map(lambda row, split=split: (split, row))
        | f'GroupDead[{split}]' >> _GroupWithEmpty(split)
        | f'WriteDead[{split}]' >> beam.Map(write_dead_letters, args.output_dir))
  # One RunInference for all splits: one model load and one compilation per process.
  handler = KeyedModelHandler(
      ClipVisionModelHandler(args.model, args.batch_size, projected=args.projected,
                             dtype=args.dtype, batched=True))
  total = None if None in totals else sum(totals)
  results = (prepared
             | 'FlattenSplits' >> beam.Flatten()
             | 'RunInference' >> RunInference(handler)
             | 'Progress' >> beam.ParDo(Progress(total, 'embed', show_progress, batched=True))
             | 'Encode' >> beam.ParDo(Encode(dim, source.class_names, projected_dim, num_shards))
             | 'GroupShards' >> beam.GroupByKey()
             | 'WriteShard' >> beam.Map(_write_shard, args.output_dir, num_shards))
  metadata = _metadata(args, source, pretrained, dim, projected_dim)
  deads = dead_counts | 'FlattenDeadCounts' >> beam.Flatten()
  found = founds | 'FlattenFound' >> beam.Flatten()
  _ = (p
       | 'Once' >> beam.Create([None])
       | 'Finalize' >> beam.Map(
           finalize, args.output_dir, beam.pvalue.AsList(results), beam.pvalue.AsList(deads),
           beam.pvalue.AsList(found), num_shards, dim, source.class_names, projected_dim,
           metadata))


def _write_shard(element, output_dir, num_shards):
  (split, index), lists = element  # lists of (id, example), one per batch that had rows here
  rows = [row for rows in lists for row in rows]
  return (split, index, *emb_lib.write_shard(output_dir, split, index, num_shards[split], rows))


class _GroupWithEmpty(beam.PTransform):
  """GroupByKey that also emits (split, []) when no element arrived."""

  def __init__(self, split: str):
    super().__init__()
    self._split = split

  def expand(self, pcoll):
    empty = pcoll.pipeline | 'Empty' >> beam.Create([(self._split, None)])
    return (pcoll, empty) | 'Both' >> beam.Flatten() | 'Group' >> beam.GroupByKey()


def _preprocess_config(args, pretrained):
  return dataclasses.replace(pretrained.preprocess, fast_decode=args.fast_decode)


def _metadata(args, source, pretrained, dim, projected_dim) -> dict[str, Any]:
  return {
      'model': {'name': pretrained.name, 'revision': pretrained.revision,
                'weights_sha256': pretrained.checksum(), 'feature': 'vision pooler_output',
                'family': pretrained.family, 'pooling': pretrained.pooling,
                'text_tower': pretrained.has_text,
                'embedding_dim': dim, 'projected_dim': projected_dim,
                'compute_dtype': args.dtype},
      'preprocessing': _preprocess_config(args, pretrained).to_json(),
      'source': {'spec': args.dataset, 'name': source.name, 'version': source.version,
                 'splits': list(args.splits), 'class_names': list(source.class_names)},
      'batch_size': args.batch_size,
      'code_version': clip_transfer.__version__,
  }


def _local_runner():
  # Beam 2.77's default DirectRunner first tries to download the Prism runner
  # from GitHub and only falls back after that fails, so an offline run waits
  # on the network. The FnApiRunner is the DirectRunner's own batch engine,
  # in-process, no download, and honours --direct_running_mode and
  # --direct_num_workers.
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # pylint: disable=g-import-not-at-top
  return FnApiRunner()


def run(argv=None, test_pipeline=None) -> dict[str, Any]:
  """Runs the pipeline; returns the summary (counts per split, seconds, output_dir)."""
  args, beam_args = parse_args(argv)
  source = sources_lib.open_source(args.dataset, args.data_dir,
                                   **sources_lib.source_options(args))
  for split in args.splits:
    source.check_split(split)
  shared = source.shared_inputs(args.splits)
  if shared:
    logging.warning('%d image(s) are listed in more than one of the splits %s: each is '
                    'embedded into every split that lists it', shared, ', '.join(args.splits))
  # Claims the output directory before the model loads: a file in the way, foreign
  # files or a read-only directory fail here, not after all the inference.
  emb_lib.prepare_output(args.output_dir, args.overwrite, clear=False)
  # For the metadata (checksum, dims); in-process runners reuse it, workers load their own.
  pretrained = models.load(args.model)
  if args.projected is None:  # by default, whenever the model has a projection
    args.projected = pretrained.projection_dim is not None
  if args.projected and pretrained.projection_dim is None:
    raise UserError(f'--projected: {args.model} has no visual projection (a vision-only '
                    'checkpoint); drop --projected')
  emb_lib.prepare_output(args.output_dir, args.overwrite)
  options = PipelineOptions(beam_args)
  # Code ships as a package (--setup_file), not a pickled __main__.
  options.view_as(SetupOptions).save_main_session = False
  explicit_runner = options.view_as(StandardOptions).runner
  local = test_pipeline is None and explicit_runner is None
  start = time.perf_counter()
  p = test_pipeline or beam.Pipeline(runner=_local_runner() if local else None, options=options)
  build(p, args, source, pretrained, show_progress=local)
  result = p.run()
  dry_run = summaries.dry_run(args.output_dir, options, result)
  if dry_run:  # DataflowRunner --dry_run=True: the job built, nothing submitted or run
    return dry_run
  result.wait_until_finish()
  seconds = time.perf_counter() - start
  failure = emb_lib.read_failure(args.output_dir)
  if failure:
    raise UserError(failure)
  counts = emb_lib.read_metadata(args.output_dir)['counts']
  total = sum(c['read'] for c in counts.values())
  summary = {'output_dir': args.output_dir, 'counts': counts, 'seconds': seconds,
             'images_per_second': total / seconds if seconds else 0.0,
             'inference': _inference_metrics(result)}
  emb_lib.write_run_info(args.output_dir, {
      'wall_s': seconds, 'num_images': total, 'images_per_s': summary['images_per_second'],
      'runner': 'FnApiRunner (local)' if local else type(p.runner).__name__,
      'batch_size': args.batch_size})
  return summary


def _inference_metrics(result) -> dict[str, int]:
  """RunInference's own counters (num_inferences, failed_batches_counter, …)."""
  out: dict[str, int] = {}
  try:
    for c in result.metrics().query()['counters']:
      if c.key.metric.namespace == 'ClipVisionModelHandler':
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(c.committed or 0)
  except Exception:  # some runners report no metrics; the summary does without
    pass
  return out


# Defined here, not built by a helper: cli_main tells `python -m` runs by main's module.
@cli_main
def main(argv=None):
  print(summaries.run_for_cli(run, summaries.embed_lines, argv))


if __name__ == '__main__':
  main()
