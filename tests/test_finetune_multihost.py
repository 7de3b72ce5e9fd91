"""Multi-host fine-tune through the real CLI: 2 processes × 2 CPU devices (gloo) vs 1 × 4.

Every run is a subprocess with a hard timeout (the launch helpers of
tests/test_distributed.py), so a stuck collective fails the test, never hangs it.
"""

import json
import os
import signal
import time

import jax
import numpy as np
import pytest

from clip_transfer import distributed
from finetune import checkpoints
from finetune import input_pipeline
from test_distributed import TIMEOUT_S, _free_port, _kill, _multi, _run_all, _start

LR = 3e-3


@pytest.fixture(scope='module', autouse=True)
def shared_xla_cache(tmp_path_factory):
  """The runs compile the same programs: one persistent XLA cache for every subprocess."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path_factory.mktemp('xla_cache')))
    mp.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
    yield


def _argv(data_dir, workdir, *extra):
  return ['-m', 'finetune.train', '--dataset=digits', f'--data_dir={data_dir}',
          '--model=random:tiny', f'--workdir={workdir}', '--steps=4', '--batch_size=16',
          '--limit_train=128', '--limit_eval=32', '--eval_every=2', f'--lr={LR}', '--augment',
          '--l2_grid=1e-2,1', *extra]


def test_two_processes_assemble_the_one_process_batch_row_for_row():
  """Each process's part of a global batch comes from its own inputs; together: 1 process's."""
  n = 103  # inputs; every 7th is dead (no row), so rows and inputs differ
  index = np.array([i for i in range(n) if i % 7])
  images = np.random.default_rng(0).integers(0, 256, (len(index), 8, 8, 3), dtype=np.uint8)
  split = input_pipeline.Split('fit', images, index % 10, [str(i) for i in index], index=index,
                               num_inputs=n)
  one = input_pipeline.device_shards(split, 4)
  for step in (0, 3, 11, 40):  # across each device's block epochs
    want = input_pipeline.train_batch(split, 8, step, 5, augment=True, shards=one)
    parts = []
    for p in range(2):
      mine = distributed.local_range(n, p, 2)  # what process p of 2 prepared
      local = split.subset(np.flatnonzero((index >= mine.start) & (index < mine.stop)), 'fit')
      shards = input_pipeline.device_shards(local, 4, part=(p, 2))
      parts.append(input_pipeline.train_batch(local, 8, step, 5, augment=True, shards=shards))
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([b[key] for b in parts]), want[key])
  # One device: the whole split shuffled per epoch, exactly as without shards.
  np.testing.assert_array_equal(
      input_pipeline.train_batch(split, 8, 3, 5, shards=input_pipeline.device_shards(split, 1))
      ['image'], input_pipeline.train_batch(split, 8, 3, 5)['image'])


def _ok(results):
  for rc, _, err in results:
    assert rc == 0, err[-3000:]
  return results


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.json')) as fh:
    return json.load(fh)


def _params(workdir, which='best'):
  return checkpoints.load_checkpoint(workdir, 'full', LR, which)['params']


@pytest.fixture(scope='module')
def one_process(digits_data_dir, tmp_path_factory):
  """linear and full on 1 process × 4 devices."""
  work = str(tmp_path_factory.mktemp('one') / 'work')
  _ok(_run_all([_argv(digits_data_dir, work, '--mode=linear,full', '--no_progress')], devices=4))
  return work


@pytest.fixture(scope='module')
def two_processes(digits_data_dir, tmp_path_factory):
  """The same run on 2 processes × 2 devices; returns (workdir, [(rc, stdout, stderr)])."""
  work = str(tmp_path_factory.mktemp('two') / 'work')
  argv = _argv(digits_data_dir, work, '--mode=linear,full', '--no_progress')
  return work, _ok(_run_all(_multi(argv, _free_port(), 2), devices=2))


def test_two_processes_of_two_devices_match_one_process_of_four(one_process, two_processes):
  work, results = two_processes
  one, two = _metrics(one_process), _metrics(work)
  assert one['devices'] == {'count': 4, 'platform': 'cpu'}
  assert two['devices'] == {'count': 4, 'platform': 'cpu', 'processes': 2}
  for key in ('num_train', 'num_fit', 'num_eval', 'validation', 'eval'):
    assert one[key] == two[key], key
  for mode in ('linear', 'full'):
    a, b = one['methods'][mode], two['methods'][mode]
    assert a['selected'] == b['selected'], mode
    assert a['predictions'] == b['predictions'], mode
  curve = lambda m: [(p['step'], p['val_top1']) for p in m['methods']['full']['curves'][str(LR)]]
  assert curve(one) == curve(two)
  # The same batches, the all-reduce summed in another order: float noise, which Adam turns into
  # steps of their own where a gradient is zero in exact arithmetic (the attention key bias:
  # softmax ignores a shift every key shares). Compared absolutely, then: other batches (1
  # device vs 4) move these weights by ~1e-2.
  diff = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), _params(one_process),
                      _params(work))
  assert max(jax.tree.leaves(diff)) < 1e-4, diff
  # Each process read and prepared only its half of each split …
  for i, (_, _, err) in enumerate(results):
    assert f'process {i} of 2 prepared 64 of the 128 inputs of train' in err, err[-2000:]
    assert f'process {i} of 2 prepared 16 of the 32 inputs of test' in err, err[-2000:]
  # … and process 0 alone printed the table and wrote the files (no scratch left behind).
  assert 'metrics:' in results[0][1] and 'metrics:' not in results[1][1]
  assert sorted(os.listdir(work)) == sorted(os.listdir(one_process)) == [
      '.clip-transfer-output', 'checkpoints', 'dead_letters.test.jsonl',
      'dead_letters.train.jsonl', 'metrics.json']


# Process 1 is killed (SIGKILL, by itself: at a known point) once step 2 is checkpointed.
KILL_AFTER_STEP_2 = r"""
import os, signal, sys
from clip_transfer import distributed
from finetune import checkpoints, train
save = checkpoints.Checkpoints.save
def save_then_die(self, record, state, best):
  save(self, record, state, best)
  if int(state.step) == 2 and distributed.process_index() == 1:
    os.kill(os.getpid(), signal.SIGKILL)
checkpoints.Checkpoints.save = save_then_die
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_killed_process_ends_the_run_in_one_line_and_resume_is_exact(digits_data_dir,
                                                                       two_processes, tmp_path):
  straight, _ = two_processes
  work = str(tmp_path / 'work')
  argv = _argv(digits_data_dir, work, '--mode=full')  # progress bars on: they must not get in the way
  procs = [_start(['-c', KILL_AFTER_STEP_2] + a[2:], devices=2)
           for a in _multi(argv, _free_port(), 2)]
  try:
    _, err1 = procs[1].communicate(timeout=TIMEOUT_S)
    t0 = time.monotonic()
    _, err0 = procs[0].communicate(timeout=60)
    took = time.monotonic() - t0
  finally:
    for p in procs:
      _kill(p)
  assert procs[1].returncode == -signal.SIGKILL, err1[-3000:]
  assert procs[0].returncode == distributed.EXIT_PEER_LOST, err0[-3000:]
  lines = [l for l in err0.splitlines() if l.startswith('error:')]
  assert lines == ['error: process 0: process 1 of 2 stopped (no heartbeat); stopping this one '
                   'too'], err0[-3000:]
  assert took < 40  # the heartbeat timeout (10 s) and the watchdog's poll, with slack
  assert checkpoints.load_checkpoint(work, 'full', LR)['step'] == 2
  # Resumed on 2 processes: the uninterrupted 2-process run, bit for bit.
  results = _ok(_run_all(_multi(argv + ['--resume', '--no_progress'], _free_port(), 2),
                         devices=2))
  assert all('resumed from step 2' in err for _, _, err in results)
  for which in ('latest', 'best'):
    jax.tree.map(np.testing.assert_array_equal, _params(straight, which), _params(work, which))
  a, b = _metrics(straight)['methods']['full'], _metrics(work)['methods']['full']
  for key in ('selected', 'predictions', 'curves', 'top1'):
    assert a[key] == b[key], key


def test_batch_size_must_divide_every_process_s_devices(digits_data_dir, tmp_path):
  argv = _argv(digits_data_dir, str(tmp_path / 'work'), '--batch_size=6', '--no_progress')
  for rc, _, err in _run_all(_multi(argv, _free_port(), 2), devices=2):
    assert rc == 2
    assert err.strip().splitlines()[-1] == (
        'error: --batch_size 6 is not divisible by the 4 devices of the 2 processes; use a '
        'multiple of 4')
