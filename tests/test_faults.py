"""Faults a run survives, in-process: divergence, slow death, non-finite steps, a full disk, damaged
workdirs, the lock and the loss-spike rule, on `steps.train_step` and `loop` directly. The same faults
through the CLI (signals, a second trainer, kill -9) are in test_faults_cli.py."""

import functools
import json
import os
import subprocess
import time
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma import checkpoint
from moma import faults
from moma import loop
from moma import memory
from moma import metrics
from moma import steps
from moma import train
from moma.models import decoder
from tests import run_files

pytestmark = pytest.mark.usefixtures("compilation_cache")


# --- units --------------------------------------------------------------------------------------------


def test_metric_writer_writes_non_finite_values_as_null(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5})
  writer.close()
  assert run_files.strict_rows(str(tmp_path)) == [{"step": 1, "grad_norm": None, "loss": None, "lr": 0.5}]


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


def test_prefetcher_close_joins_its_thread():
  """No prefetch thread may outlive the run: one still inside XLA at interpreter shutdown aborts (exit 134)."""
  batches = loop.Prefetcher(lambda i: time.sleep(0.05) or i, range(100), 2)
  assert batches.next() == 0
  batches.close()
  assert not batches._thread.is_alive()  # pylint: disable=protected-access


def test_loss_spikes_need_a_level_then_a_lasting_jump_and_resume_from_their_state():
  spikes = faults.LossSpikes(factor=1.5, steps=3)
  losses = [7.0, 6.0, 5.0, 4.0] + [3.0] * 8  # falling, then flat: the level is the 10th percentile, 3.0
  assert all(spikes.observe("lm", i, x) is None for i, x in enumerate(losses, 1)) and spikes.calm()
  assert spikes.observe("lm", 13, 4.4) is None and spikes.calm()  # under 1.5 × 3.0
  assert spikes.observe("lm", 14, 4.6) is None and not spikes.calm()  # a spike begins
  assert spikes.observe("other", 14, 99.0) is None  # another task has its own level (none yet)
  resumed = faults.LossSpikes(1.5, 3, json.loads(json.dumps(spikes.state())))  # through the checkpoint
  assert resumed.observe("lm", 15, 6.4) is None
  assert resumed.observe("lm", 16, 6.4) == (14, 3.0)  # three in a row: diverged, since step 14
  one_off = faults.LossSpikes(1.5, 3, spikes.state())
  assert one_off.observe("lm", 15, 3.1) is None and one_off.calm()  # a spike that ends is forgotten
  assert faults.LossSpikes(0, 3).observe("lm", 1, 1e9) is None  # factor 0: off


def test_rotation_keeps_the_newest_good_and_the_best_validation_checkpoints(tiny_config, tmp_path):
  """max_to_keep=2 over steps 1-8: 3 had the best validation loss, 4 was the last good one (5-8 were saved
  during a loss spike), 6's validation loss is lower but it is not good. The policy holds after a restart
  (orbax reads each step's metrics back)."""
  tiny_config.checkpoint.update(max_to_keep=2, async_save=False)
  def save(mngr, step, **kw):
    checkpoint.save(mngr, step, {"w": jnp.full(2, step)}, {"rows": []}, **kw)
  with checkpoint.manager(str(tmp_path), tiny_config) as mngr:
    assert not os.path.exists(tmp_path / "checkpoints")  # made by the first save, not before
    for step in range(1, 9):
      save(mngr, step, good=step <= 4, eval_loss={3: 2.0, 6: 1.0}.get(step))
    assert mngr.all_steps() == [3, 4, 7, 8]
  with checkpoint.manager(str(tmp_path), tiny_config) as mngr:
    for step in (9, 10):
      save(mngr, step, good=False)
    assert mngr.all_steps() == [3, 4, 9, 10]


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
  with pytest.raises(faults.Diverged, match=r"diverged: (loss|grad_norm)=nan at step 3 .*; the last good "
                                            r"checkpoint is step 2; .*--config.train.lr=") as e:
    train.train_and_evaluate(_diverging(small_config), str(tmp_path))
  assert e.value.exit_code == 3
  assert os.listdir(tmp_path / "checkpoints") == ["2"]
  assert [r["step"] for r in run_files.strict_rows(str(tmp_path))] == [1, 2]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(run_files.params_at(str(tmp_path), 2)))


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


def test_a_run_that_dies_slowly_keeps_its_good_checkpoints(small_config, tmp_path):
  """The reproduction of issue 29 on the 1-layer model: 20 good steps (max_to_keep=2), then a resume at
  lr=10 saving every 2 steps: the loss jumps 30-fold and stays high (5 steps in a row stop it here). It
  stops with exit 3 naming step 20 as the last good checkpoint; 20 (the best validation loss and the
  newest good step) is kept, the diverging steps are moved aside, and the same command with a sane lr
  resumes from 20."""
  small_config.train.update(steps=20, log_every=5, eval_every=10, loss_spike_steps=5)
  small_config.checkpoint.update(every_steps=5, max_to_keep=2, async_save=False)
  workdir = str(tmp_path)
  train.train_and_evaluate(small_config, workdir)
  small_config.train.update(steps=80, lr=10.0, log_every=1)
  small_config.checkpoint.every_steps = 2
  with pytest.raises(faults.Diverged, match="stayed above 2× its recent level .* the last good checkpoint is "
                                            "step 20 .*diverged_checkpoints") as e:
    train.train_and_evaluate(small_config, workdir)
  assert e.value.exit_code == 3
  assert os.listdir(tmp_path / "checkpoints") == ["20"]
  assert os.listdir(tmp_path / "diverged_checkpoints")  # what was saved during the spike, for a look
  assert max(float(np.abs(x).max()) for x in jax.tree.leaves(run_files.params_at(workdir, 20))) < 10
  small_config.train.update(lr=1e-3, steps=21)
  assert train.train_and_evaluate(small_config, workdir)["step"] == 21


def test_a_nonfinite_state_is_never_saved(small_config, tmp_path):
  """lr=1e39 is inf in float32: step 1's loss and gradient are finite, its update is not. Nothing is saved."""
  small_config.train.update(steps=3, lr=1e39, warmup_steps=0, log_every=1, eval_every=0)
  small_config.checkpoint.update(every_steps=1, async_save=False)
  with pytest.raises(faults.Diverged, match="the state .* after step 1 is not finite.*no good checkpoint"):
    train.train_and_evaluate(small_config, str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == []


def test_nan_policy_skip_gives_up_after_max_skipped_steps(small_config, tmp_path):
  config = _diverging(small_config)
  config.train.update(nan_policy="skip", steps=20, max_skipped_steps=4)
  with pytest.raises(faults.Diverged, match=r"4 steps in a row up to step 6 .* the last finite loss was "
                                            r"[\d.]+ at step 2") as e:
    train.train_and_evaluate(config, str(tmp_path))
  assert e.value.exit_code == 3


def test_a_refused_start_writes_nothing(small_config, tmp_path, monkeypatch):
  """Checkpoints of another model whose config.json is gone: refused at restore, config.json not written.
  A batch that does not fit: refused from the compiled step's memory analysis, naming the field."""
  workdir = tmp_path / "run"
  small_config.train.update(steps=2, eval_every=0)
  train.train_and_evaluate(small_config, str(workdir))
  os.remove(workdir / "config.json")
  before = sorted(os.listdir(workdir))
  other = small_config.copy_and_resolve_references()
  other.model.d_model = 32
  with pytest.raises(Exception):
    train.train_and_evaluate(other, str(workdir))
  assert sorted(os.listdir(workdir)) == before and not (workdir / "config.json").exists()

  monkeypatch.setattr(memory, "device_bytes", lambda device: 2**20)
  with pytest.raises(faults.RunError, match=r"config.train.batch_size=4 does not fit: the compiled train step "
                                            r"needs [\d.]+ MiB per device, .* has 1.0 MiB; the model.s state alone"):
    train.train_and_evaluate(small_config, str(tmp_path / "new" / "deeper"))
  assert not (tmp_path / "new").exists()


def test_a_full_disk_is_one_line_and_keeps_the_checkpoints_saved_before(small_config, tmp_path, capsys):
  """A workdir on a 500 KB tmpfs: the first checkpoints fit, a later one does not. One line names the
  checkpoint directory and the fix (no orbax / tensorstore traceback), exit 1; the saved steps restore."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=500k", "tmpfs", str(disk)], capture_output=True)
  if mount.returncode:
    pytest.skip("cannot mount a small tmpfs here (needs root)")
  try:
    small_config.train.update(steps=20, eval_every=0, log_every=1)
    small_config.checkpoint.update(every_steps=1, max_to_keep=20)
    workdir = str(disk / "run")
    assert train.run(small_config, workdir) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no space left on the device of {workdir}"), lines
    saved = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    assert saved, "no checkpoint fitted: the test's disk is too small"
    assert np.isfinite(jax.tree.leaves(run_files.params_at(workdir, saved[-1]))[0]).all()
  finally:
    subprocess.run(["umount", str(disk)], check=True)


def test_the_largest_batch_named_by_a_refusal_fits():
  """memory.check_fits' linear estimate on a step whose temporaries grow with the batch: the batch it
  names compiles under the limit."""
  state = {"w": jnp.ones((256, 256))}
  step = jax.jit(lambda s, x: (s, jnp.tanh(x @ s["w"]) @ s["w"].T), donate_argnums=0)
  need = lambda b: memory.step_bytes(step.lower(state, jnp.ones((b, 256))).compile())
  limit = need(64)
  device = jax.devices()[0]
  with mock.patch.object(memory, "device_bytes", lambda d: limit):
    memory.check_fits(step.lower(state, jnp.ones((64, 256))).compile(), state, batch_size=64, field="f",
                      multiple=4, device=device)  # fits exactly
    with pytest.raises(faults.RunError, match=r"config.f=512 does not fit.*--config.f=(\d+)") as e:
      memory.check_fits(step.lower(state, jnp.ones((512, 256))).compile(), state, batch_size=512,
                        field="f", multiple=4, device=device)
  largest = int(str(e.value).rsplit("=", 1)[1])
  assert 32 <= largest <= 64 and largest % 4 == 0 and need(largest) <= limit


@pytest.mark.slow  # its own compilation of the skipping step
def test_nan_policy_skip_drops_the_bad_updates_and_goes_on(small_config, tmp_path):
  config = _diverging(small_config)
  config.train.nan_policy = "skip"
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final["step"] == 5
  rows = run_files.strict_rows(str(tmp_path))
  assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1]
  assert all("loss" not in r for r in rows if r["skipped_steps"])  # means over finite steps only
  # The skipped steps left the state as step 2 made it.
  for a, b in zip(jax.tree.leaves(run_files.params_at(str(tmp_path), 2)),
                  jax.tree.leaves(run_files.params_at(str(tmp_path), 4))):
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
  resumed = run_files.strict_rows(workdir)
  assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in resumed] == [
      {k: v for k, v in r.items() if k != "tokens_per_s"} for r in straight]
  run_files.tensorboard_matches_metrics(workdir)
