"""Shared fixtures (keep small: several stages' tests use them)."""

import contextlib
import logging

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory):
  """A TFDS data_dir with the built-in digits prepared (once per test session)."""
  from clip_transfer.data import digits

  path = str(tmp_path_factory.mktemp('tfds'))
  digits.prepare(path)
  return path


@pytest.fixture(scope='module')
def xla_cache(tmp_path_factory):
  """XLA's persistent cache for one test module: its runs recompile the same programs.

  Use it with ``pytestmark = pytest.mark.usefixtures('xla_cache')``.
  """
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  compilation_cache.set_cache_dir(str(tmp_path_factory.mktemp('xla_cache')))
  compilation_cache.reset_cache()  # (re)initialise it with this directory
  yield
  jax.config.update('jax_compilation_cache_dir', old[0])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', old[1])
  compilation_cache.reset_cache()


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
