"""pipelines.embed beyond the in-process runner: Beam's portable runner, as Flink and Spark use it."""

import os
import shlex

from PIL import Image
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import embed
from pipelines import predict

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


def _readme_command(module):
  """The README's Dataflow command for ``module``, as argv (the shell's variables left as text)."""
  readme = open(os.path.join(os.path.dirname(__file__), os.pardir, 'README.md')).read()
  block = readme[readme.index('\n## Dataflow\n'):]
  block = block[block.index('```sh\n') + 6:]
  command = shlex.split(block[:block.index('```')].replace('\\\n', ' '))
  assert command[:3] == ['python', '-m', module], command
  return command[3:]


def test_readme_dataflow_command_passes_every_beam_option_on():
  """Each flag of the README's Dataflow command is ours or reaches Beam's options unchanged.

  argparse's prefix matching once took Beam's --project for embed's --projected.
  """
  argv = _readme_command('pipelines.embed')
  args, beam_args = embed.parse_args(argv)
  assert args.output_dir == 'gs://$BUCKET/embeddings/images-vitb32' and args.batch_size == 128
  options = PipelineOptions(beam_args).get_all_options(retain_unknown_options=True)
  for flag in beam_args:
    name, value = flag[2:].split('=', 1)
    got = options[name]
    assert (value in got) if isinstance(got, list) else got == value, (flag, got)
  assert {'runner', 'project', 'region', 'temp_location', 'setup_file', 'sdk_container_image',
          'machine_type', 'dataflow_service_options', 'experiments'} <= {
              f[2:].split('=', 1)[0] for f in beam_args}
  # predict takes the same Beam options (README: 'add the Beam options of the embed command').
  ours = [f for f in argv if f not in beam_args]
  _, predict_beam_args = predict.parse_args(
      beam_args + ['--dataset=folder:gs://$BUCKET/new', '--head=probe:runs/probe',
                   '--output_dir=gs://$BUCKET/predictions'])
  assert predict_beam_args == beam_args and ours
