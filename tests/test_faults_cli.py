"""Faults through the CLI, each in a subprocess: signals (during start-up, training, on one host of two),
divergence and the lock, kill -9 then resume. Most are slow: each start compiles."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moma import faults
from moma import metrics
from moma import train
from tests import run_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("compilation_cache")


def _start(workdir, cache, *overrides, env=None):
  args = [sys.executable, "-m", "moma.main", "--config=configs/mot.py:size=tiny", f"--workdir={workdir}",
          f"--config.data.cache_dir={cache}", "--config.train.progress_bar=False",
          "--config.train.eval_every=0", *overrides]
  return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": REPO, **(env or {})})


def _wait_for_step(workdir, step, proc, timeout=300):
  """Until metrics.jsonl logs `step` (the process is then past it)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()
    rows = metrics.read(str(workdir)) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else []
    if rows and rows[-1]["step"] >= step:
      return
    time.sleep(0.2)
  raise TimeoutError(f"step {step} not logged in {timeout}s")


@pytest.mark.slow
@pytest.mark.parametrize("signum,exit_code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_saves_the_current_step_and_exits_cleanly(signum, exit_code, tmp_path, data_cache_dir):
  proc = _start(tmp_path, data_cache_dir, "--config.train.steps=100000", "--config.train.log_every=1",
                "--config.checkpoint.every_steps=100000")
  _wait_for_step(tmp_path, 3, proc)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == exit_code, err
  saved = int(err.strip().splitlines()[-1].split("saved step ")[1].split()[0])
  assert os.listdir(tmp_path / "checkpoints") == [str(saved)]
  assert [r["step"] for r in run_files.strict_rows(str(tmp_path))] == list(range(1, saved + 1))
  run_files.tensorboard_matches_metrics(str(tmp_path))
  assert not os.path.exists(tmp_path / "lock")


@pytest.mark.parametrize("signum,delay", [(signal.SIGINT, 0.5), (signal.SIGINT, 1.0), (signal.SIGINT, 2.0),
                                          (signal.SIGTERM, 1.0)])
def test_a_signal_during_start_up_stops_it_and_nothing_is_written(signum, delay, tmp_path, data_cache_dir):
  """Ctrl-C (or SIGTERM) while python imports, parses the config, builds the model or compiles: the stop
  is honoured before anything is written (exit 128 + N), never swallowed. (Training starts after ~10 s
  here, so each delay lands in start-up.)"""
  proc = _start(tmp_path / "run", data_cache_dir)
  time.sleep(delay)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signum, err
  assert "Traceback" not in err and "before training started: nothing was written" in err.splitlines()[-1]
  assert not os.path.exists(tmp_path / "run")


def test_a_second_signal_exits_at_once():
  """The first SIGTERM only asks; the second (Linux merges a signal sent while one is pending, so it
  comes after the first was handled) exits at once with 128 + 15, whatever the process was doing."""
  script = ("import os, signal, time\n"
            "from moma import faults\n"
            "with faults.Preemption() as p:\n"
            "  os.kill(os.getpid(), signal.SIGTERM)\n"
            "  assert p.signum == signal.SIGTERM\n"
            "  os.kill(os.getpid(), signal.SIGTERM)\n"
            "  time.sleep(30)\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO}, timeout=60)
  assert result.returncode == 128 + signal.SIGTERM, result.stderr
  assert "SIGTERM again: exiting now without saving" in result.stderr


@pytest.mark.slow
def test_a_signal_to_one_host_stops_every_host_at_the_same_step(tmp_path, data_cache_dir):
  """Two processes (one CPU device each, gloo collectives) train one run on a shared workdir; SIGTERM
  reaches process 1 only. Both agree on the stop (an all-gather of the signal each step), save the same
  step together and exit 0; the locks (DIR/lock, DIR/lock.1) are gone and the run resumes."""
  env = lambda i: {"JAX_COORDINATOR_ADDRESS": f"localhost:{12400 + os.getpid() % 1000}",
                   "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
                   "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
                   "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  flags = ("--config.train.steps=100000", "--config.train.log_every=1", "--config.checkpoint.every_steps=100000",
           "--config.mesh.shape=(-1,)")
  procs = [_start(tmp_path, data_cache_dir, *flags, env=env(i)) for i in range(2)]
  _wait_for_step(tmp_path, 3, procs[0])
  assert sorted(os.listdir(tmp_path))[:3] == ["checkpoints", "config.json", "lock"]
  assert (tmp_path / "lock.1").exists()
  procs[1].send_signal(signal.SIGTERM)
  errs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errs
  saved = {int(err.strip().splitlines()[-1].split("saved step ")[1].split()[0]) for err in errs}
  assert len(saved) == 1, errs
  assert os.listdir(tmp_path / "checkpoints") == [str(saved.pop())]
  assert not (tmp_path / "lock").exists() and not (tmp_path / "lock.1").exists()


@pytest.mark.slow
def test_cli_divergence_and_lock(tmp_path, data_cache_dir):
  proc = _start(tmp_path, data_cache_dir, "--config.train.steps=5", "--config.train.lr=1e6",
                "--config.train.warmup_steps=0", "--config.train.log_every=1",
                "--config.checkpoint.every_steps=2")
  _, err = proc.communicate(timeout=300)
  lines = err.strip().splitlines()
  assert proc.returncode == 3 and lines[-1].startswith("error: diverged: ") and "at step 3" in lines[-1], err
  assert os.listdir(tmp_path / "checkpoints") == ["2"]
  with faults.WorkdirLock(str(tmp_path)):
    proc = _start(tmp_path, data_cache_dir, "--config.train.steps=5")
    _, err = proc.communicate(timeout=300)
  assert proc.returncode == 1 and f"in use by another trainer (pid {os.getpid()}" in err, err


@pytest.mark.slow
def test_diverging_runs_exit_exactly_3(tmp_path, data_cache_dir):
  """30 diverging runs in a row all exit 3 with the error line last: none aborts at teardown (exit 134,
  the prefetch thread inside XLA at interpreter shutdown, as before the prefetcher was joined)."""
  codes = []
  for i in range(30):
    proc = _start(tmp_path / str(i), data_cache_dir, "--config.train.steps=6", "--config.train.lr=1e6",
                  "--config.train.warmup_steps=0", "--config.train.log_every=1", "--config.model.num_layers=1",
                  "--config.checkpoint.every_steps=2")
    _, err = proc.communicate(timeout=300)
    codes.append(proc.returncode)
    assert err.strip().splitlines()[-1].startswith("error: diverged: "), err
  assert codes == [3] * 30


@pytest.mark.slow
def test_the_slow_death_of_issue_29_through_the_cli(tmp_path, data_cache_dir):
  """The issue's own reproduction (MoT tiny, 30 steps, then lr=1e2 saving every 2 steps, keeping 2): exit 3,
  step 30 named and kept, nothing later left in checkpoints/."""
  proc = _start(tmp_path, data_cache_dir, "--config.train.steps=30", "--config.checkpoint.every_steps=5",
                "--config.checkpoint.max_to_keep=2", "--config.train.eval_every=10")
  assert proc.wait(timeout=300) == 0
  proc = _start(tmp_path, data_cache_dir, "--config.train.steps=120", "--config.checkpoint.every_steps=2",
                "--config.checkpoint.max_to_keep=2", "--config.train.eval_every=10", "--config.train.lr=1e2")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 3 and "the last good checkpoint is step 30" in err.splitlines()[-1], err
  assert os.listdir(tmp_path / "checkpoints") == ["30"]


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical(tiny_config, tmp_path):
  overrides = ["--config.train.steps=12", "--config.train.log_every=3", "--config.checkpoint.every_steps=4"]
  tiny_config.train.update(steps=12, log_every=3, eval_every=0, progress_bar=False)
  tiny_config.checkpoint.every_steps = 4
  train.train_and_evaluate(tiny_config, str(tmp_path / "straight"))
  workdir = tmp_path / "killed"
  proc = _start(workdir, tiny_config.data.cache_dir, *overrides)
  _wait_for_step(workdir, 9, proc)  # Past the save at 8, mid-window (9 logged, 10-12 not yet)
  proc.kill()
  proc.communicate()
  proc = _start(workdir, tiny_config.data.cache_dir, *overrides)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err
  drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
  assert drop(run_files.strict_rows(str(workdir))) == drop(metrics.read(str(tmp_path / "straight")))
  run_files.tensorboard_matches_metrics(str(workdir))
  for a, b in zip(jax.tree.leaves(run_files.params_at(str(workdir), 12)),
                  jax.tree.leaves(run_files.params_at(str(tmp_path / "straight"), 12))):
    np.testing.assert_array_equal(a, b)
