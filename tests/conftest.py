"""Shared fixtures (keep small: several stages' tests use them)."""

import contextlib
import logging
import os

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from PIL import Image


# The slowest files first, longest first (per-file seconds of a whole `make test`, 2026-12-02),
# with the Makefile's --no-loadscope-reorder: xdist then hands files out in this order to
# whichever process is free, so no long file starts last while the other process idles
# (by default it orders by test count: the 1-test, 90 s test_finetune_devices went last).
# A file missing here runs after these, in the usual order; a stale list costs balance only.
SLOWEST_FIRST = ('test_finetune_train.py', 'test_families.py', 'test_finetune_multihost.py',
                 'test_predict.py', 'test_reliability_cli.py', 'test_probe.py', 'test_embed.py',
                 'test_open_clip.py', 'test_clip.py', 'test_new_sources.py',
                 'test_finetune_devices.py', 'test_fewshot.py', 'test_distributed.py',
                 'test_bad_checkpoints.py', 'test_embed_speed.py', 'test_finetune_groups.py',
                 'test_reliability.py', 'test_data_contract.py', 'test_export_families.py',
                 'test_ladder.py', 'test_zeroshot.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order kept


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory):
  """A TFDS data_dir with the built-in digits prepared (once per test session)."""
  from clip_transfer.data import digits

  path = str(tmp_path_factory.mktemp('tfds'))
  digits.prepare(path)
  return path


@pytest.fixture(scope='session')
def tiny_digits_embeddings(digits_data_dir, tmp_path_factory, count_compiles):
  """digits embedded once with random:tiny through ``pipelines.embed`` (batch 64; pooled and
  projected features), shared by the modules that only read it (test_embed, test_ladder).

  Returns (output dir, the run's summary, how often the forward compiled during it).
  """
  from pipelines import embed  # pylint: disable=g-import-not-at-top
  out = str(tmp_path_factory.mktemp('embed') / 'digits')
  with count_compiles('clip_vision_forward') as compiles:  # clip_transfer/models/forward.py
    # 1437 and 360 are not multiples of 64: the last batches are padded.
    summary = embed.run(['--model=random:tiny', '--dataset=digits', f'--data_dir={digits_data_dir}',
                         f'--output_dir={out}', '--batch_size=64'])
  return out, summary, compiles.count


def _write_images(folder, n, shade, seed):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(n):
    pixels = np.clip(rng.normal(shade, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f'{i:03d}.png'))


@pytest.fixture(scope='session')
def write_images():
  """``write_images(folder, n, shade, seed)``: n 32×32 PNGs of noise around a grey ``shade``
  (0–255), named 000.png, 001.png, … in ``folder``."""
  return _write_images


@pytest.fixture(scope='session')
def cat_dog_folder(write_images):
  """``cat_dog_folder(root, **{split: n})``: a two-class image folder, n dark cats and n light
  dogs per split (root/split/{cat,dog}/NNN.png); returns root as a string."""

  def make(root, **counts):
    for split, n in counts.items():
      write_images(os.path.join(root, split, 'cat'), n, 80, seed=len(split))
      write_images(os.path.join(root, split, 'dog'), n, 170, seed=10 + len(split))
    return str(root)

  return make


@pytest.fixture(scope='session', autouse=True)
def session_xla_cache(tmp_path_factory):
  """XLA's persistent compilation cache, one for the whole test session.

  Every stage's run builds its jitted functions afresh (a new embed handler, a new
  fine-tune step per configuration, a model re-initialised after ``models.clear_cache()``),
  so jit's in-memory cache misses and the same program is compiled again, in this module
  and in others; XLA compilation is most of the suite's time on CPU. A program compiled
  once is read back from this cache (the same executable: a hit needs the same HLO, the
  same options and the same jax). The "Compiling jit(…)" lines that ``count_compiles``
  counts are logged before the cache is looked up, so counts are unchanged.
  """
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  path = str(tmp_path_factory.mktemp('xla_cache'))
  compilation_cache.set_cache_dir(path)
  compilation_cache.reset_cache()  # (re)initialise it with this directory
  # Every process the tests start inherits it too: Beam's multi_processing workers, CLI
  # subprocesses (they compile what this process compiled for the in-process run beside them).
  env = {'JAX_COMPILATION_CACHE_DIR': path, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  old_env = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield
  for k, v in old_env.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  jax.config.update('jax_compilation_cache_dir', old[0])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', old[1])
  compilation_cache.reset_cache()


@pytest.fixture(scope='session')
def xla_cache_env(session_xla_cache):
  """Environment variables that point a subprocess's jax at this session's compilation cache
  (a CLI run in a subprocess then reads back what the same run in this process compiled)."""
  return {'JAX_COMPILATION_CACHE_DIR': jax.config.jax_compilation_cache_dir,
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}


@pytest.fixture(scope='module')
def xla_cache(session_xla_cache):
  """Modules that recompile the same programs name this (``pytestmark =
  pytest.mark.usefixtures('xla_cache')``); the session's cache above now serves every module."""
  yield


class _CompileCounter(logging.Handler):
  """Counts jax's 'Compiling jit(<name>)' log lines (jax_log_compiles) for one function name."""

  def __init__(self, name: str):
    super().__init__()
    self.prefix, self.count = f'Compiling jit({name})', 0

  def emit(self, record):
    if record.getMessage().startswith(self.prefix):
      self.count += 1


@pytest.fixture(scope='session')
def count_compiles():
  """``with count_compiles('fn') as c: …``; then ``c.count`` is how often jit compiled ``fn``."""

  @contextlib.contextmanager
  def counting(name: str):
    logger = logging.getLogger('jax._src.interpreters.pxla')
    counter = _CompileCounter(name)
    old = jax.config.jax_log_compiles
    jax.config.update('jax_log_compiles', True)
    logger.addHandler(counter)
    try:
      yield counter
    finally:
      logger.removeHandler(counter)
      jax.config.update('jax_log_compiles', old)

  return counting
