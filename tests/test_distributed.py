"""Multi-device and multi-process runs (clip_transfer.distributed) through the real CLIs.

Each run is a subprocess in its own process group with a hard timeout, so a
stuck collective fails the test instead of hanging CI. Two processes talk
over gloo on CPU, each with two fake devices.
"""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from clip_transfer import distributed
from clip_transfer.data import embeddings
from clip_transfer.errors import UserError
from probe import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = {'model': {'name': 'random:tiny', 'checksum': 'abc'}, 'source': {'name': 'test'}}
TIMEOUT_S = 240  # per multi-process run: generous on a loaded 2-core machine, never unbounded


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu')
  return env


def _start(argv, devices: int) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, *argv], env=_env(devices), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)  # its own group: killed whole on failure


def _kill(p: subprocess.Popen) -> None:
  if p.poll() is None:
    os.killpg(p.pid, signal.SIGKILL)
  p.wait()


def _run_all(argvs, devices: int, timeout: float = TIMEOUT_S):
  """Starts every command at once; returns [(rc, stdout, stderr)] or fails, killing them all."""
  procs = [_start(a, devices) for a in argvs]
  deadline = time.monotonic() + timeout
  try:
    results = []
    for p in procs:
      out, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
      results.append((p.returncode, out, err))
    return results
  except subprocess.TimeoutExpired:
    pytest.fail(f'multi-process run did not end within {timeout}s')
  finally:
    for p in procs:
      _kill(p)


def _multi(argv, port, n):
  return [argv + [f'--coordinator_address=localhost:{port}', f'--num_processes={n}',
                  f'--process_id={i}', '--heartbeat_timeout_s=10'] for i in range(n)]


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """An embedding dataset of 5 overlapping classes (the L2 matters) in 3 shards per split."""
  rng = np.random.default_rng(0)
  splits = {}
  for split, n in (('train', 500), ('test', 150)):
    y = rng.integers(0, 5, n)
    x = rng.normal(size=(n, 24)).astype(np.float32)
    x[:, :5] += 1.5 * np.eye(5)[y]
    splits[split] = [(f'{split}/{i:05d}', x[i], int(y[i])) for i in range(n)]
  path = str(tmp_path_factory.mktemp('emb') / 'ds')
  embeddings.write_dataset(path, splits, [f'c{i}' for i in range(5)], META,
                           examples_per_shard=200)
  return path


def _probe_argv(ds, out):
  return ['-m', 'probe.train', f'--embeddings={ds}', f'--output_dir={out}', '--baselines=',
          '--no_progress', '--l2_grid=1e-4,1e-2,1']


def _result(out):
  with open(os.path.join(out, 'metrics.json')) as f:
    m = json.load(f)['methods']['jax']
  head = np.load(os.path.join(out, 'head.npz'))
  return m, {k: head[k] for k in ('kernel', 'bias', 'mean', 'std')}


def _same_probe(a, b):
  (ma, ha), (mb, hb) = a, b
  assert ma['l2'] == mb['l2']
  assert ma['predictions'] == mb['predictions']
  for k in ha:
    scale = np.max(np.abs(ha[k]))
    np.testing.assert_array_less(np.max(np.abs(ha[k] - hb[k])), 1e-5 * scale + 1e-12,
                                 err_msg=k)


@pytest.fixture(scope='module')
def one_device(dataset, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('one') / 'out')
  train.main(_probe_argv(dataset, out)[2:])
  return _result(out)


def test_probe_on_four_devices_matches_one(dataset, one_device, tmp_path):
  out = str(tmp_path / 'out')
  [(rc, _, err)] = _run_all([_probe_argv(dataset, out)], devices=4)
  assert rc == 0, err
  _same_probe(one_device, _result(out))


def test_probe_on_two_processes_of_two_devices_matches_one(dataset, one_device, tmp_path):
  out = str(tmp_path / 'out')
  results = _run_all(_multi(_probe_argv(dataset, out), _free_port(), 2), devices=2)
  for rc, _, err in results:
    assert rc == 0, err
  # The table printed once (gloo itself prints a line to stdout in each process).
  assert 'metrics:' in results[0][1] and 'metrics:' not in results[1][1]
  written = sorted(f for f in os.listdir(out) if not f.startswith('.'))  # not the claim marker
  assert written == ['head.npz', 'metrics.json']
  _same_probe(one_device, _result(out))


def test_killed_process_ends_the_run_with_one_line(dataset, tmp_path):
  # A solve long enough to be killed in the middle of: Adam, no tolerance stop.
  argv = [a for a in _probe_argv(dataset, str(tmp_path / 'out')) if a != '--no_progress']
  argv += ['--solver=adam', '--max_iter=1000000', '--tol=1e-30']
  procs = [_start(a, devices=1) for a in _multi(argv, _free_port(), 2)]
  try:
    # Wait until the run is solving (process 0's progress bar), then kill process 1 outright.
    seen = ''
    deadline = time.monotonic() + TIMEOUT_S
    while 'jax (' not in seen and time.monotonic() < deadline:
      ready, _, _ = select.select([procs[0].stderr], [], [], 1.0)
      if ready:
        seen += os.read(procs[0].stderr.fileno(), 4096).decode(errors='replace')
      assert procs[0].poll() is None and procs[1].poll() is None, seen
    assert 'jax (' in seen, seen
    os.killpg(procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    _, err = procs[0].communicate(timeout=60)
    took = time.monotonic() - t0
  finally:
    for p in procs:
      _kill(p)
  assert procs[0].returncode == distributed.EXIT_PEER_LOST, err
  lines = [l for l in err.splitlines() if l.startswith('error:')]
  assert lines == ['error: process 0: process 1 of 2 stopped (no heartbeat); stopping this one '
                   'too'], err
  assert took < 40  # the heartbeat timeout (10 s) and the watchdog's poll, with slack


def test_a_process_that_never_joins_ends_the_run_not_a_hang(dataset, tmp_path):
  # JAX itself ends a process whose peers do not register in time (from C++,
  # with its own message: no Python hook can shorten it to one line).
  argv = _multi(_probe_argv(dataset, str(tmp_path / 'out')), _free_port(), 2)[0]
  t0 = time.monotonic()
  [(rc, _, err)] = _run_all([argv + ['--initialization_timeout_s=3']], devices=1, timeout=120)
  assert rc != 0 and 'DEADLINE_EXCEEDED' in err, err
  assert time.monotonic() - t0 < 100


@pytest.mark.parametrize('flags, match', [
    (['--num_processes=2'], 'needs all of'),
    (['--coordinator_address=h:1', '--num_processes=2', '--process_id=2'], 'process_id'),
    (['--coordinator_address=nohost', '--num_processes=2', '--process_id=0'], 'HOST:PORT'),
])
def test_bad_multi_host_flags(dataset, tmp_path, capsys, flags, match):
  with pytest.raises(SystemExit) as e:
    train.main(_probe_argv(dataset, str(tmp_path / 'out'))[2:] + flags)
  assert e.value.code == 2
  assert match in capsys.readouterr().err


def test_one_process_flags_change_nothing():
  # --num_processes=1 is a single-process run: no coordinator, no initialize.
  distributed.initialize(distributed.DistributedOptions(num_processes=1))
  assert distributed.process_count() == 1 and distributed.is_writer()
  assert distributed.gather_rows(np.arange(3)).tolist() == [0, 1, 2]


def test_local_ranges_cover_every_row_once():
  for n, p in ((10, 3), (2, 4), (0, 2), (7, 1)):
    rows = [r for i in range(p) for r in distributed.local_range(n, i, p)]
    assert rows == list(range(n))
  with pytest.raises(UserError, match='must be at least 1'):
    distributed._check(distributed.DistributedOptions(  # pylint: disable=protected-access
        coordinator_address='h:1', num_processes=0, process_id=0))
