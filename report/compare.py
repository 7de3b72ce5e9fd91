"""The transfer ladder in one table (report.md) and one plot (report.png), from metrics.json files.

    python -m report.compare RUN_DIR [RUN_DIR …] [--output_dir DIR]

Each RUN_DIR is a zero-shot or probe output dir or a fine-tune workdir (anything
holding a ``metrics.json``), or a directory whose subdirectories hold them (the
demo's run directory). Rows run up the ladder: zero-shot, probe (plain, then
anchored at zero-shot), head-only fine-tune, LP-FT, fine-tune, WiSE-FT. Each
carries its 95% interval and a paired comparison with the best probe on the
same eval examples. The few-shot table and curve put every method's k-shot
mean ± std beside zero-shot (0 shots), paired against zero-shot and against
the plain probe on the same draws.

Runs are refused (one line, exit 2) when they differ in dataset, eval split, eval
examples or validation split, when one RUN_DIR mixes model weights, or when a
file holds NaN or inf. RUN_DIRs on different backbones (same task, same eval and
validation ids) share one table with a backbone column, every row paired with
the best probe of any backbone.

Modules: ``report.runs`` (finding, reading and checking runs), ``report.rows`` (the rows and
paired verdicts), ``report.tables`` (report.md), ``report.plot`` (report.png); this one
claims the output and writes both.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from clip_transfer import outputs
from clip_transfer.errors import Parser, UserError, cli_main
from report.plot import plot
from report.rows import rows_from
from report.runs import check_comparable, find_metrics, load, run_of, task
from report.tables import markdown


def default_output_dir(paths: list[str]) -> str:
  """Where the report goes without --output_dir: the first run directory."""
  return paths[0] if os.path.isdir(paths[0]) else '.'


REPORT_FILES = ('report.md', 'report.png')
# How report.md said it was ours before the output marker listed it (still read, never written).
OLD_MARKER = '<!-- written by python -m report.compare -->'


def check_output_dir(output_dir: str) -> None:
  """Claims report.md and report.png as every stage claims its files (clip_transfer.outputs).

  Replaces only a report this tool wrote: never a user's report.md or report.png.
  """
  # Held as every stage holds its output dir: two reports at once are refused, and first,
  # so a directory another run holds gets nothing written into it (not even the marker).
  outputs.claim_exclusive(output_dir, '--output_dir')
  md = os.path.join(output_dir, 'report.md')
  old = False
  if os.path.isfile(md):
    with open(md, errors='replace') as fh:
      old = OLD_MARKER in fh.read()
  outputs.claim_files(output_dir, REPORT_FILES, kind='report.compare', adopt=old)
  if not os.access(output_dir, os.W_OK):
    raise UserError(f'--output_dir {output_dir} is not writable')


def compare(paths: list[str], output_dir: Optional[str] = None) -> str:
  """Writes report.md and report.png; returns the Markdown."""
  files = find_metrics(paths)
  runs = [(f, load(f)) for f in files]
  check_comparable(runs, run_of(files, paths))
  rows, shots = rows_from(runs)
  md = markdown(runs, rows, shots)
  output_dir = output_dir or default_output_dir(paths)
  check_output_dir(output_dir)
  with open(os.path.join(output_dir, 'report.md'), 'w') as fh:
    fh.write(md)
  name, split = task(runs[0][1])[:2]
  models = sorted({(m.get('model') or {}).get('name') or '?' for _, m in runs})
  plot(runs, rows, shots, os.path.join(output_dir, 'report.png'),
       f'{name} / {split} — {", ".join(models)}')
  return md


@cli_main
def main(argv=None):
  parser = Parser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='+', help='run directories (or metrics.json files)')
  parser.add_argument('--output_dir', default=None,
                      help='where report.md/report.png go (default: the first run directory)')
  args = parser.parse_args(argv)
  md = compare(args.runs, args.output_dir)
  print(md)
  out = args.output_dir or default_output_dir(args.runs)
  print(f'wrote {os.path.join(out, "report.md")} and {os.path.join(out, "report.png")}',
        file=sys.stderr)


if __name__ == '__main__':
  main()
