"""What the pipelines' CLIs print (summary lines) and the ``main`` embed and predict share."""

from __future__ import annotations

import logging
from typing import Any

from clip_transfer.errors import cli_main


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


def cli(run_fn, lines_fn):
  """A pipeline's ``main`` (embed's, predict's): warnings only, run, print its summary lines."""

  @cli_main
  def main(argv=None):
    logging.basicConfig(level=logging.WARNING)
    print('\n'.join(lines_fn(run_fn(argv))))

  return main
