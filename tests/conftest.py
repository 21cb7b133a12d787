"""Shared fixtures: one build of the embedded datasets per test session, and small train configs."""

import pytest

from moma import data


@pytest.fixture(scope="session")
def data_cache_dir(tmp_path_factory):
  """The embedded TFDS datasets, built once per session (xdist workers share it under a file lock)."""
  path = tmp_path_factory.getbasetemp().parent / "moma_tfds"
  for name in data.EMBEDDED:
    data.prepare(name, str(path))
  return str(path)


@pytest.fixture
def tiny_config(data_cache_dir):
  """`configs/mot.py:size=tiny` on the session's data cache, quiet, for short runs in tests."""
  from configs import mot

  config = mot.get_config("size=tiny")
  config.data.cache_dir = data_cache_dir
  config.train.progress_bar = False
  return config
