"""Throughput benchmarks: ratios measured side by side in one process (not tests)."""

import json


def write_json(path, results: dict) -> None:
  """The `--json PATH` output every benchmark offers (read by benchmarks.run)."""
  if path:
    with open(path, 'w') as fh:
      json.dump(results, fh, indent=1)
