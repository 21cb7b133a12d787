"""Faults a run survives: divergence, signals, a second trainer, kill -9, damaged workdirs.

Signals, the lock, divergence and kill -9 go through the CLI in a subprocess (marked slow: each start
compiles); the rest run in-process, skipping a non-finite step on `steps.train_step` and `loop` directly.
"""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moma import faults
from moma import loop
from moma import metrics
from moma import steps
from moma import train
from moma.models import decoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("compilation_cache")


def _strict_rows(workdir):
  """metrics.jsonl parsed as strict JSON (bare NaN / Infinity are errors)."""
  def refuse(token):
    raise AssertionError(f"non-JSON constant {token} in metrics.jsonl")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def _tensorboard_matches_metrics(workdir):
  """TensorBoard holds each logged step once: per tag, exactly the steps metrics.jsonl logs it at."""
  rows = _strict_rows(workdir)
  tags = metrics.tensorboard_steps(workdir)
  assert tags and set(tags) == {k for r in rows for k, v in r.items() if k != "step" and v is not None}
  for tag, steps in tags.items():
    assert steps == [r["step"] for r in rows if r.get(tag) is not None], tag


def _params(workdir, step):
  with ocp.StandardCheckpointer() as ckptr:
    path = os.path.join(workdir, "checkpoints", str(step), "default")
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), dict(tree))
    return ckptr.restore(path, target)["params"]


# --- units --------------------------------------------------------------------------------------------


def test_metric_writer_writes_non_finite_values_as_null(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5})
  writer.close()
  assert _strict_rows(str(tmp_path)) == [{"step": 1, "grad_norm": None, "loss": None, "lr": 0.5}]


def test_prefetcher_keeps_order_and_reraises_in_the_consumer():
  def produce(i):
    if i == 5:
      raise ValueError("bad batch 5")
    return i * i

  for depth in (0, 2):
    batches = loop.Prefetcher(produce, range(2, 8), depth)
    assert [batches.next() for _ in range(3)] == [4, 9, 16]
    with pytest.raises(ValueError, match="bad batch 5"):
      batches.next()
    batches.close()


def test_lock_is_exclusive_names_its_holder_and_survives_a_stale_file(tmp_path):
  (tmp_path / "lock").write_text('{"pid": 1, "host": "gone", "since": "then"}')  # left by kill -9
  with faults.WorkdirLock(str(tmp_path)):
    holder = json.loads((tmp_path / "lock").read_text())
    assert holder["pid"] == os.getpid()
    with pytest.raises(faults.RunError, match=f"in use by another trainer \\(pid {os.getpid()} on host"):
      faults.WorkdirLock(str(tmp_path)).__enter__()
  assert not (tmp_path / "lock").exists()


def test_first_nonfinite_names_step_and_metric():
  rows = [{"loss": 1.0, "grad_norm": 2.0}, {"loss": 1.0, "grad_norm": float("nan")}, {"loss": np.inf}]
  assert faults.first_nonfinite(rows, 7) == (8, "grad_norm", pytest.approx(float("nan"), nan_ok=True))
  assert faults.first_nonfinite(rows[:1], 7) is None


# --- in-process runs ----------------------------------------------------------------------------------


@pytest.fixture
def small_config(tiny_config):
  """The tiny preset with a 1-layer dense model: what these runs check does not depend on the model, and it
  compiles in a fraction of MoT's time."""
  tiny_config.model.update(d_model=16, num_layers=1, num_heads=2, d_ff=32, untie=())
  return tiny_config


def _diverging(config):
  """Warmup from lr 0 leaves step 1's update at zero, step 2's is huge: step 3 is the first non-finite one,
  whatever the model."""
  config.train.update(steps=5, lr=1e6, warmup_steps=2, log_every=1, eval_every=0)
  config.checkpoint.update(every_steps=2, async_save=False)
  return config


def test_divergence_stops_without_saving_and_keeps_the_good_checkpoint(small_config, tmp_path):
  with pytest.raises(faults.Diverged, match=r"diverged: (loss|grad_norm)=nan at step 3; .* the last good "
                                            r"checkpoint \(step 2\) is kept; .*--config.train.lr=") as e:
    train.train_and_evaluate(_diverging(small_config), str(tmp_path))
  assert e.value.exit_code == 3
  assert os.listdir(tmp_path / "checkpoints") == ["2"]
  assert [r["step"] for r in _strict_rows(str(tmp_path))] == [1, 2]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(str(tmp_path), 2)))


def test_a_nonfinite_step_keeps_the_state_when_skipping(small_config):
  """`steps.train_step(skip_nonfinite=True)` on a 1-layer dense model: a step whose loss is NaN keeps the
  params and optimizer state, advances the step and reports skipped=1; a finite step updates. The loop
  then logs the skipped count and means over the kept steps only. The slow twin trains through the
  trainer: test_nan_policy_skip_drops_the_bad_updates_and_goes_on."""
  small_config.train.warmup_steps = 0  # the first kept update has a non-zero lr
  config = train.resolve_config(small_config)
  model = steps.build_model(config)
  batch = {k: v[:2, :32] for k, v in train.host_batches(config, "train")(0).items()}

  def loss_fn(logits, batch, modalities):  # NaN where the batch says so
    loss, per_modality = decoder.loss_fn(logits, batch, modalities)
    return jnp.where(batch["poison"], jnp.nan, loss), per_modality

  step = jax.jit(functools.partial(steps.train_step, model=model, loss_fn=loss_fn, seed=0, skip_nonfinite=True,
                                   modalities=tuple(config.model.modalities)))
  state = jax.jit(lambda b: nn.unbox(steps.create_state(config, model, b)))(batch)
  kept, out = step(state, dict(batch, poison=True))
  assert float(out["skipped"]) == 1 and int(kept.step) == 1
  jax.tree.map(np.testing.assert_array_equal, (kept.params, kept.opt_state), (state.params, state.opt_state))
  moved, out = step(kept, dict(batch, poison=False))
  assert float(out["skipped"]) == 0 and np.isfinite(out["loss"]) and int(moved.step) == 2
  assert not np.array_equal(moved.params["embed"]["embedding"], state.params["embed"]["embedding"])
  # The loop's row: the count of skipped steps, and the plan's means over the others.
  plan = mock.Mock(summarise=lambda window, step: {"loss": np.mean([o["loss"] for _, o in window])})
  window = [("main", {"loss": 1.0, "skipped": 0.0}), ("main", {"loss": np.nan, "skipped": 1.0}),
            ("main", {"loss": 3.0, "skipped": 0.0})]
  summarise = loop._summarise  # pylint: disable=protected-access
  assert summarise(plan, window, 3, skip=True) == {"loss": 2.0, "skipped_steps": 1.0}


@pytest.mark.slow  # its own compilation of the skipping step
def test_nan_policy_skip_drops_the_bad_updates_and_goes_on(small_config, tmp_path):
  config = _diverging(small_config)
  config.train.nan_policy = "skip"
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final["step"] == 5
  rows = _strict_rows(str(tmp_path))
  assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1]
  assert all("loss" not in r for r in rows if r["skipped_steps"])  # means over finite steps only
  # The skipped steps left the state as step 2 made it.
  for a, b in zip(jax.tree.leaves(_params(str(tmp_path), 2)), jax.tree.leaves(_params(str(tmp_path), 4))):
    np.testing.assert_array_equal(a, b)


def test_damaged_workdir_resumes_from_the_previous_checkpoint(small_config, tmp_path, caplog):
  """Latest checkpoint truncated and a torn last metrics line: warnings, then the same run as straight."""
  small_config.train.update(steps=4, log_every=1, eval_every=0)
  small_config.checkpoint.update(every_steps=2, async_save=False)
  workdir = str(tmp_path)
  train.train_and_evaluate(small_config, workdir)
  straight = metrics.read(workdir)
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "4", "default")):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(7)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 5, "lo')
  final = train.train_and_evaluate(small_config, workdir)
  assert final["step"] == 4
  assert "checkpoint step 4 is unreadable" in caplog.text and "torn last line" in caplog.text
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  assert os.listdir(tmp_path / "unreadable_checkpoints") == ["4"]
  resumed = _strict_rows(workdir)
  assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in resumed] == [
      {k: v for k, v in r.items() if k != "tokens_per_s"} for r in straight]
  _tensorboard_matches_metrics(workdir)


# --- through the CLI ----------------------------------------------------------------------------------


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
  assert [r["step"] for r in _strict_rows(str(tmp_path))] == list(range(1, saved + 1))
  _tensorboard_matches_metrics(str(tmp_path))
  assert not os.path.exists(tmp_path / "lock")


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
  assert drop(_strict_rows(str(workdir))) == drop(metrics.read(str(tmp_path / "straight")))
  _tensorboard_matches_metrics(str(workdir))
  for a, b in zip(jax.tree.leaves(_params(str(workdir), 12)),
                  jax.tree.leaves(_params(str(tmp_path / "straight"), 12))):
    np.testing.assert_array_equal(a, b)
