"""The predictions' files: Parquet shards sorted by id, predictions.json (last), and their reading.

``pipelines.predict`` writes them (from Beam or in-process); tests and notebooks read them.
"""

from __future__ import annotations

import io
import json

import numpy as np
from apache_beam.io.filesystems import FileSystems

from clip_transfer.data import embeddings as emb_lib
from clip_transfer.data import paths
from clip_transfer import errors
from clip_transfer import outputs
from clip_transfer.errors import UserError

SUMMARY_FILE = 'predictions.json'  # written last: its presence marks a complete run
RUN_FILE = 'run.json'  # wall time, runner: apart, so the outputs stay byte-identical
OWNED_FILES = ('*-?????-of-?????.parquet', SUMMARY_FILE, RUN_FILE, emb_lib.FAILURE_FILE,
               'dead_letters.*.jsonl')

def schema():
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  return pa.schema([('id', pa.string()), ('prediction', pa.int32()),
                    ('prediction_name', pa.string()), ('top_k_names', pa.list_(pa.string())),
                    ('top_k_probabilities', pa.list_(pa.float32())),
                    ('label', pa.int32()), ('label_name', pa.string())])


def rows_for(ids, logits: np.ndarray, labels, class_names: list[str], top_k: int) -> list[dict]:
  """One output row per example: the argmax, the top-k by probability, the label if known."""
  logits = np.asarray(logits, np.float32).reshape(len(ids), -1)
  z = logits - logits.max(axis=1, keepdims=True)
  probs = np.exp(z)
  probs /= probs.sum(axis=1, keepdims=True)
  k = min(top_k, logits.shape[1])
  order = np.argsort(-probs, axis=1, kind='stable')[:, :k]
  out = []
  for i, ex_id in enumerate(ids):
    pred = int(logits[i].argmax())  # the logits' argmax: what metrics.json's predictions hold
    label = None if labels[i] is None or labels[i] < 0 else int(labels[i])
    out.append({'id': ex_id, 'prediction': pred, 'prediction_name': class_names[pred],
                'top_k_names': [class_names[c] for c in order[i]],
                'top_k_probabilities': [float(p) for p in probs[i, order[i]]],
                'label': label, 'label_name': None if label is None else class_names[label]})
  return out


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f'{split}-{index:05d}-of-{num_shards:05d}.parquet'


def write_shard(output_dir: str, split: str, index: int, num_shards: int, rows) -> int:
  """Sorts rows by id and writes one Parquet shard through FileSystems; returns the count."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  rows = sorted(rows, key=lambda r: r['id'])
  for a, b in zip(rows, rows[1:]):
    if a['id'] == b['id']:
      raise ValueError(f'duplicate id {a["id"]!r} in split {split!r}')
  buf = io.BytesIO()
  pq.write_table(pa.Table.from_pylist(rows, schema=schema()), buf)
  path = FileSystems.join(output_dir, shard_name(split, index, num_shards))
  with outputs.create_file(path) as fh:
    fh.write(buf.getvalue())
  return len(rows)


def finalize(_, output_dir: str, shard_results, dead_counts, found_counts,
             num_shards: dict[str, int], summary: dict) -> None:
  """After every shard and dead-letter file: empty shards, then predictions.json (last).

  When a split's books do not balance (found != predicted + dead-lettered) it
  writes failure.json instead, and ``run`` turns that into the run's error.
  """
  written: dict[str, dict[int, int]] = {}
  for split, index, count in shard_results:
    written.setdefault(split, {})[index] = count
  dead = dict(dead_counts)
  found: dict[str, int] = {}
  for split, n in found_counts:
    found[split] = found.get(split, 0) + n
  counts = {split: {'read': found.get(split, 0), 'written': sum(written.get(split, {}).values()),
                    'dead_lettered': dead.get(split, 0)} for split in num_shards}
  problem = emb_lib.check_counts(output_dir, counts)
  if problem:
    emb_lib.write_failure(output_dir, problem)
    return
  write_summary(output_dir, written, num_shards, {**summary, 'counts': counts})


def write_summary(output_dir: str, written: dict[str, dict[int, int]],
                  num_shards: dict[str, int], summary: dict) -> None:
  for split, n in num_shards.items():
    for i in range(n):
      if i not in written.get(split, {}):  # no id hashed here: the file still exists
        write_shard(output_dir, split, i, n, [])
  summary = {**summary, 'num_shards': dict(sorted(num_shards.items()))}
  errors.check_interrupted()  # a swallowed Ctrl-C must not read as a finished run
  with outputs.create_file(FileSystems.join(output_dir, SUMMARY_FILE)) as fh:
    fh.write(json.dumps(summary, indent=1, sort_keys=True).encode())


def read_predictions(output_dir: str, split: str) -> list[dict]:
  """Every row of a split, sorted by id (for tests and notebooks)."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  summary = read_summary(output_dir)
  n = summary['num_shards'][split]
  rows = []
  for i in range(n):
    data = paths.read_bytes(FileSystems.join(output_dir, shard_name(split, i, n)))
    rows += pq.read_table(io.BytesIO(data)).to_pylist()
  return sorted(rows, key=lambda r: r['id'])


def read_summary(output_dir: str) -> dict:
  path = FileSystems.join(output_dir, SUMMARY_FILE)
  if not FileSystems.exists(path):
    raise UserError(f'{output_dir} holds no {SUMMARY_FILE}: not a finished predict run')
  with FileSystems.open(path) as fh:
    return json.loads(fh.read().decode())
