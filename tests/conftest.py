"""Shared fixtures: one build of the embedded datasets per test session, and small train configs.

Eight host CPU devices so the sharding tests can build meshes: set before jax is imported.
"""

import fcntl
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

from moma import data  # noqa: E402


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_cache_dir):
  """Workdir of a finished 2-step `configs/mot.py:size=tiny` run with an evaluation at step 2, for tests
  that read a trained run (sampling, per-source evaluation) without training their own."""
  from configs import mot
  from moma import train

  config = mot.get_config("size=tiny")
  config.data.cache_dir = data_cache_dir
  config.train.update(steps=2, eval_every=2, eval_steps=2, progress_bar=False)
  # Shared by this run's xdist workers: the first one trains it (under a file lock), the others wait for it.
  run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  workdir = (tmp_path_factory.getbasetemp().parent / f"tiny_run_{run_id}" if run_id
             else tmp_path_factory.mktemp("tiny_run"))
  workdir.mkdir(exist_ok=True)
  with open(f"{workdir}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "done").exists():
      train.train_and_evaluate(config, str(workdir))
      (workdir / "done").touch()
  return str(workdir)


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """Persistent XLA cache for modules that compile the same step in several runs (e.g. resume tests)."""
  path = tmp_path_factory.getbasetemp().parent / "jax_cache"
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  for k, v in zip(keys, (str(path), 0, 0)):
    jax.config.update(k, v)
  yield path
  for k, v in old.items():
    jax.config.update(k, v)
