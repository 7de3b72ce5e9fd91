"""pipelines.embed beyond the in-process runner: Beam's portable runner, as Flink and Spark use it."""

import os

from PIL import Image

from pipelines import embed

MODEL = 'random:tiny'


def _folder(root):
  """A few small PNGs in two classes, two splits."""
  for i in range(6):
    split, cls = ('train', 'test')[i % 2], ('cat', 'dog')[i % 3 == 0]
    path = root / split / cls / f'{i}.png'
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (20 + i, 24), (40 * i, 10, 200 - 30 * i)).save(path)
  return root


def _files(path):
  """Every file the dataset consists of (run.json, the run's cost, differs by design)."""
  return {f: open(os.path.join(path, f), 'rb').read() for f in sorted(os.listdir(path))
          if f != 'run.json'}


def test_portable_runner_writes_the_same_bytes_as_the_local_runner(tmp_path):
  root = _folder(tmp_path / 'images')
  local, portable = str(tmp_path / 'local'), str(tmp_path / 'portable')
  common = [f'--dataset=folder:{root}', f'--model={MODEL}', '--batch_size=4']
  embed.run(common + [f'--output_dir={local}'])
  # --job_endpoint=embed: Beam's job server inside this process; LOOPBACK: the
  # SDK harness too. The pipeline goes through the Runner API protos, the Fn
  # API and the job service, the path a Flink or Spark cluster takes.
  summary = embed.run(common + [f'--output_dir={portable}', '--runner=PortableRunner',
                                '--job_endpoint=embed', '--environment_type=LOOPBACK'])
  assert summary['counts']['train']['written'] == 3
  a, b = _files(local), _files(portable)
  assert sorted(a) == sorted(b) and any('.array_record-' in f for f in a)
  assert a == b
