"""Test-wide settings: quiet TensorFlow, CPU, float32, shared fixtures."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # pylint: disable=g-import-not-at-top


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long-running test (CI runs it)')


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory):
  """A persistent XLA compilation cache shared by the session's subprocesses."""
  return tmp_path_factory.mktemp('xla_cache')
