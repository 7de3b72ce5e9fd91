"""Shared fixtures (keep small: several stages' tests use them)."""

import pytest


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory):
  """A TFDS data_dir with the built-in digits prepared (once per test session)."""
  from transfer import digits

  path = str(tmp_path_factory.mktemp('tfds'))
  digits.prepare(path)
  return path
