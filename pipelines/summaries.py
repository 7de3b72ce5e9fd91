"""What the pipelines' CLIs print: summary lines, the run behind embed's and predict's main."""

from __future__ import annotations

import logging
from typing import Any, Optional

from apache_beam.options.pipeline_options import TestOptions


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


def dry_run(output_dir: str, options, result) -> Optional[dict[str, Any]]:
  """The summary of a DataflowRunner ``--dry_run=True`` run, else None.

  The runner built the job (the pipeline translated, the worker environment and
  the --setup_file package made locally) and returned before it staged or submitted
  anything: nothing ran, so there are no counts to read back. Other runners ignore
  the option and run the pipeline.
  """
  job = getattr(result, 'job', None)
  if not options.view_as(TestOptions).dry_run or job is None:
    return None
  return {'output_dir': output_dir, 'dry_run': True, 'job': job,
          'job_name': job.google_cloud_options.job_name,
          'num_transforms': len(job.proto_pipeline.components.transforms)}


def dry_run_lines(summary: dict[str, Any]) -> list[str]:
  return [f'dry run: DataflowRunner built job {summary["job_name"]} '
          f'({summary["num_transforms"]} transforms) and submitted nothing: no image was read, '
          f'no output written to {summary["output_dir"]}']


def run_for_cli(run_fn, lines_fn, argv) -> str:
  """What embed's and predict's ``main`` print: warnings only, the run, its summary lines."""
  logging.basicConfig(level=logging.WARNING)
  summary = run_fn(argv)
  return '\n'.join(dry_run_lines(summary) if summary.get('dry_run') else lines_fn(summary))
