"""What the pipelines' CLIs print: summary lines, the run behind embed's and predict's main."""

from __future__ import annotations

import logging
from typing import Any


def embed_lines(summary: dict[str, Any]) -> list[str]:
  """What the CLI prints: counts per split, RunInference's counters, throughput."""
  lines = [f'{split}: read {c["read"]}, written {c["written"]}, '
           f'dead-lettered {c["dead_lettered"]}' for split, c in summary['counts'].items()]
  if summary['inference']:
    lines.append('RunInference: ' + ', '.join(
        f'{k}={v}' for k, v in sorted(summary['inference'].items())))
  return lines + [throughput_line(summary)]


def throughput_line(summary: dict[str, Any]) -> str:
  """The closing line of embed's and predict's summaries: images, seconds, where to."""
  total = sum(c['read'] for c in summary['counts'].values())
  return (f'{total} images in {summary["seconds"]:.1f} s '
          f'({summary["images_per_second"]:.1f} images/s) → {summary["output_dir"]}')


def run_for_cli(run_fn, lines_fn, argv) -> str:
  """What embed's and predict's ``main`` print: warnings only, the run, its summary lines."""
  logging.basicConfig(level=logging.WARNING)
  return '\n'.join(lines_fn(run_fn(argv)))
