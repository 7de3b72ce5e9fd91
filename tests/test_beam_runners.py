"""pipelines.embed beyond the in-process runner: Beam's portable runner, as Flink and Spark use
it, and the job DataflowRunner builds (a dry run, offline)."""

import os
import shlex
import socket
import tarfile

import pytest
from PIL import Image
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_runner_api_pb2

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


def _require_gcp():
  """DataflowRunner needs Beam's gcp extra: `make test` installs it, so CI fails without it."""
  try:
    import google.cloud.dataflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    if os.environ.get('CI'):
      raise
    pytest.skip("needs apache-beam[gcp]: pip install -c constraints.txt -e '.[test,gcp]'")


def test_dataflow_dry_run_builds_the_readme_job_offline(tmp_path, monkeypatch):
  """The README's Dataflow command with --dry_run=True: DataflowRunner translates the pipeline,
  makes the worker environment (our setup.py's sdist) and returns before it stages or submits:
  no network (every socket connection is refused and recorded) and no credentials.

  Only the paths are local (the launcher lists --dataset and claims --output_dir itself).
  """
  _require_gcp()
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  monkeypatch.chdir(repo)  # --setup_file=./setup.py, as the README runs it
  attempts = []

  def refuse(sock, address):
    attempts.append(address)
    raise OSError('no network in this test')
  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setenv('GOOGLE_APPLICATION_CREDENTIALS', str(tmp_path / 'no-such-key.json'))
  image = 'us-central1-docker.pkg.dev/my-project/clip/clip-embed:0.1.0'
  readme = [f.replace('$PROJECT', 'my-project').replace('$BUCKET', 'my-bucket')
            .replace('$IMAGE', image) for f in _readme_command('pipelines.embed')]
  beam_flags = embed.parse_args(readme)[1]
  out = tmp_path / 'emb'
  summary = embed.run([f'--dataset=folder:{_folder(tmp_path / "images")}', f'--model={MODEL}',
                       f'--output_dir={out}', '--dry_run=True', *beam_flags])
  assert summary['dry_run'] and 'counts' not in summary and attempts == []
  assert os.listdir(out) == ['.clip-transfer-output']  # claimed, nothing written
  job = summary['job']
  top = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
  for split in ('train', 'test'):
    assert {f'Read[{split}]', f'Preprocess[{split}]', f'WriteDead[{split}]'} <= top, top
  assert {'RunInference', 'Encode', 'GroupShards', 'WriteShard', 'Finalize'} <= top
  # The options we pass arrive: the job's, and its one worker environment.
  options = job.options.get_all_options()
  assert (options['project'], options['region'], options['machine_type']) == (
      'my-project', 'us-central1', 'n1-standard-8')
  assert options['dataflow_service_options'] == [
      'worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver']
  assert 'no_use_multiple_sdk_containers' in options['experiments']
  assert options['staging_location'].startswith(f'gs://my-bucket/tmp/{options["job_name"]}.')
  (env,) = job.proto_pipeline.components.environments.values()
  assert beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image == image
  staged = {beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(d.role_payload)
            .staged_name: beam_runner_api_pb2.ArtifactFilePayload.FromString(d.type_payload).path
            for d in env.dependencies}
  # Code ships as our package (--setup_file), never as a pickled __main__.
  assert 'pickled_main_session' not in staged and 'workflow.tar.gz' in staged, staged
  with tarfile.open(staged['workflow.tar.gz']) as tar:
    files = {n.split('/', 1)[1] for n in tar.getnames() if '/' in n}
  assert {'setup.py', 'pipelines/embed.py', 'pipelines/predict.py', 'clip_transfer/models/clip.py',
          'clip_transfer/models/templates/simple.json', 'clip_transfer/data/folder.py',
          'clip_transfer/protocol/rungs.py', 'probe/train.py', 'finetune/train.py',
          'report/compare.py'} <= files
