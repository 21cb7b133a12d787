"""The training loop every run goes through: a plain LM run is one task, an AGD run several.

`run(config, workdir, plan)` takes a validated `RunPlan` (tasks, which task trains at each step, how a
window of step outputs becomes a logged row, evaluation) and owns everything a cluster run must
survive: the workdir lock, preemption signals, divergence (non-finite values and lasting loss spikes),
checkpoints that carry the unlogged window (so a resumed run logs whole windows and every step once) and
are judged good or not, a start that writes nothing until it is accepted, and host batches prepared ahead
in a background thread (`train.prefetch` of them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import queue
import threading
import time
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from moma import checkpoint
from moma import console as console_lib
from moma import faults
from moma import memory
from moma import metrics as metrics_lib
from moma import sharding


@dataclasses.dataclass(frozen=True)
class Task:
  """One kind of step. `step_fn(state, batch) -> (state, out)` is compiled before the run starts;
  `batch_at(i)` is this process's host batch of (0-based) step i, validated; `tokens` per step (global);
  `batch_size` (global rows) is the config field `batch_field`, named when a batch does not fit."""

  name: str
  step_fn: Callable
  batch_at: Callable[[int], Any]
  tokens: int
  flops_per_token: float
  batch_size: int
  batch_field: str = "train.batch_size"


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """What `run` trains. `task_at(i)`: index into `tasks` of step i (a pure function, so resumes continue
  it); `summarise(window, step)`: host rows [(task name, out)] of the steps up to `step` → logged means;
  `evaluate(params)` → eval row; `init(mngr)` → (state, state shardings, start step, saved window) from
  the checkpoint or fresh; `describe`: what the console's start block shows (moma/console.py)."""

  tasks: list[Task]
  task_at: Callable[[int], int]
  summarise: Callable[[list[tuple[str, dict]], int], dict]
  evaluate: Callable[[Any], dict]
  init: Callable[[Any], tuple[Any, Any, int, dict | None]]
  mesh: Any
  rules: Any
  lr: Callable[[int], float]
  describe: dict


class StepCache:
  """One compiled step per task: `compile` it ahead of time, then call the cache to run it.

  `make_step(task)` gives the task's uncompiled (state, batch) -> (state, out). `traces[name]` counts
  how often a task's step was traced: once, however many steps the task takes (a batch of another shape
  raises instead of silently recompiling). The state keeps `state_sh` and is donated; `seconds` is the
  time spent compiling.
  """

  def __init__(self, make_step: Callable[[Any], Callable], state_sh=None, mesh_rules=None):
    self._make_step, self._state_sh, self._mesh_rules = make_step, state_sh, mesh_rules
    self._compiled: dict[str, Any] = {}
    self.traces: dict[str, int] = {}
    self.seconds = 0.0

  def compiled(self, task) -> bool:
    return task.name in self._compiled

  def __call__(self, task, state, batch):
    return self._compiled[task.name](state, batch)

  def compile(self, task, state, batch):
    """The task's compiled step, compiled for `state` and `batch` (their shapes and shardings) if new."""
    if task.name not in self._compiled:
      step = self._make_step(task)
      self.traces.setdefault(task.name, 0)

      def traced(state, batch):
        self.traces[task.name] += 1
        return step(state, batch)

      t0 = time.perf_counter()
      with sharding.activate(*self._mesh_rules) if self._mesh_rules else contextlib.nullcontext():
        jitted = jax.jit(traced, out_shardings=(self._state_sh, None), donate_argnums=0)
        self._compiled[task.name] = jitted.lower(state, batch).compile()
      self.seconds += time.perf_counter() - t0
    return self._compiled[task.name]


class Prefetcher:
  """`produce(i)` for i in `steps`, computed up to `depth` ahead in a thread (depth 0: inline). `close`
  joins the thread: none may be inside XLA when the interpreter shuts down (that aborts the process)."""

  def __init__(self, produce: Callable[[int], Any], steps: range, depth: int):
    self._produce, self._steps, self._depth = produce, iter(steps), depth
    self._stop = threading.Event()
    if depth:
      self._queue: queue.Queue = queue.Queue(maxsize=depth)
      self._thread = threading.Thread(target=self._fill, daemon=True, name="moma-prefetch")
      self._thread.start()

  def _fill(self) -> None:
    for i in self._steps:
      if self._stop.is_set():
        return
      try:
        item = (self._produce(i), None)
      except BaseException as e:  # pylint: disable=broad-except (re-raised in the consumer)
        item = (None, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if self._stop.is_set() or item[1] is not None:
        return

  def next(self) -> Any:
    if not self._depth:
      return self._produce(next(self._steps))
    item, error = self._queue.get()
    if error is not None:
      raise error
    return item

  def close(self) -> None:
    self._stop.set()
    if self._depth:
      self._thread.join()


def _stop_signal(preemption: faults.Preemption) -> int:
  """The signal that asked to stop, agreed by all processes (any one's signal stops them all)."""
  signum = preemption.signum or 0
  if jax.process_count() > 1:
    signum = int(np.max(multihost_utils.process_allgather(np.int32(signum))))
  return signum


def run(config: ml_collections.ConfigDict, workdir: str, plan: RunPlan,
        stop: faults.Preemption | None = None) -> dict[str, float]:
  """Trains `plan` in `workdir` (validated by the caller). The start is accepted, and only then is
  anything written, once the checkpoint (if any) is restored and every task's step is compiled and fits
  its device; a refused start, or a signal before it (`stop`, installed by the caller from the program's
  first instant, or here), leaves `workdir` as it was."""
  tcfg = config.train
  with contextlib.ExitStack() as stack:
    stop = stop or stack.enter_context(faults.Preemption())
    stack.enter_context(faults.WorkdirLock(workdir, jax.process_index()))
    mngr = checkpoint.manager(workdir, config)
    stack.callback(mngr.close)
    stack.callback(checkpoint.wait, mngr)  # Also on errors and signals: a pending async save finishes.
    state, state_sh, start, saved = plan.init(mngr)
    if start >= tcfg.steps:
      if jax.process_index() == 0:
        print(f"{workdir} is already trained to step {start} (train.steps={tcfg.steps}); raise "
              "--config.train.steps to train further")
      final = {k: v for r in metrics_lib.read(workdir) if r["step"] == start for k, v in r.items()}
      return {**final, "step": start}
    stop.check()
    console = console_lib.Console(config, workdir, plan.describe, start)  # stdout only: nothing written
    stack.callback(console.close)
    steps = StepCache(lambda task: task.step_fn, state_sh, (plan.mesh, plan.rules))
    _compile_every_task(plan, steps, state, range(start, tcfg.steps))
    console.timing["compile"] = steps.seconds
    stop.check()
    checkpoint.write_config(config, workdir)  # The start is accepted: the run directory takes shape.
    os.makedirs(str(mngr.directory), exist_ok=True)
    writer = metrics_lib.MetricWriter(workdir, resume_step=start)
    stack.callback(writer.close)
    return _loop(config, plan, mngr, writer, console, stop, steps, state, start, saved)


def _compile_every_task(plan: RunPlan, steps: StepCache, state, step_range: range) -> None:
  """Compiles the step of each task `step_range` trains (on its first batch there) and refuses a task
  whose step does not fit its device (`memory.check_fits`)."""
  multiple = math.lcm(sharding.batch_shards(plan.mesh, plan.rules), jax.process_count())
  device = plan.mesh.devices.flat[0]
  for i in step_range:
    task = plan.tasks[plan.task_at(i)]
    if not steps.compiled(task):
      batch = shard_batch(task.batch_at(i), plan.mesh, plan.rules)
      memory.check_fits(steps.compile(task, state, batch), state, batch_size=task.batch_size,
                        field=task.batch_field, multiple=multiple, device=device)
    if all(steps.compiled(t) for t in plan.tasks):
      return


def _loop(config, plan, mngr, writer, console, preemption, steps, state, start, saved):
  tcfg = config.train
  skip = tcfg.nan_policy == "skip"
  peak = metrics_lib.peak_flops_per_device(tcfg.peak_flops, plan.mesh.devices.flat[0])
  saved = saved or {}

  def prepare(i):  # Background thread: the host batch of step i, placed on the mesh.
    task = plan.tasks[plan.task_at(i)]
    return task, shard_batch(task.batch_at(i), plan.mesh, plan.rules)

  # The window: steps since the last logged row, carried across restarts inside the checkpoint, as is
  # what judges the next checkpoint good (the loss's recent level, the newest good step, the best
  # validation loss).
  window = [(name, out) for name, out in saved.get("rows", [])]
  window_seconds = float(saved.get("seconds", 0.0))
  checked = len(window)  # Rows of `window` already checked (host floats).
  health = _Health(tcfg, saved, start)
  final: dict[str, float] = {"step": start}
  batches = Prefetcher(prepare, range(start, tcfg.steps), tcfg.prefetch)
  try:
    t0 = time.perf_counter()
    for step in range(start + 1, tcfg.steps + 1):
      task, batch = batches.next()
      state, out = steps(task, state, batch)
      window.append((task.name, out))
      console.step(step)
      signum = _stop_signal(preemption)
      log = step % tcfg.log_every == 0 or step == tcfg.steps
      evaluate = bool(tcfg.eval_every) and (step % tcfg.eval_every == 0 or step == tcfg.steps)
      save = step % config.checkpoint.every_steps == 0 or step == tcfg.steps or signum
      if not (log or evaluate or save):
        continue
      # A boundary: the device catches up and the new rows are checked before anything uses them.
      window = [(name, jax.device_get(out)) for name, out in window]
      elapsed = time.perf_counter() - t0
      trouble = health.check(window[checked:], step - len(window) + checked + 1, skip)
      if trouble:
        raise health.diverged(trouble, mngr)
      checked = len(window)
      if log:
        row = _summarise(plan, window, step, skip)
        seconds = window_seconds + elapsed
        row["tokens_per_s"] = sum(t.tokens for t in _tasks_of(plan, window)) / seconds
        row["flops_per_token"] = (sum(t.tokens * t.flops_per_token for t in _tasks_of(plan, window))
                                  / sum(t.tokens for t in _tasks_of(plan, window)))
        row["lr"] = float(plan.lr(step - 1))
        if peak:
          row["perf/mfu"] = metrics_lib.mfu(row["tokens_per_s"], row["flops_per_token"], peak, plan.mesh.size)
        writer.write(step, row)
        console.log(step, row)
        final.update(row, step=step)
        console.timing["train"] += elapsed
        window, window_seconds, checked, t0 = [], 0.0, 0, time.perf_counter()
      t_pause = time.perf_counter()  # Evaluation and saving stay out of tokens/s.
      eval_loss = None
      if evaluate:
        with sharding.activate(plan.mesh, plan.rules):
          row = plan.evaluate(state.params)
        writer.write(step, row)
        final.update(row)
        console.eval(step, row)
        console.timing["eval"] += time.perf_counter() - t_pause
        eval_loss = row.get("eval/loss")
        save = save or health.best_eval(eval_loss)  # A new best validation loss is kept.
      if save:
        if not _finite(state):
          raise health.diverged(f"the state (parameters or optimizer state) after step {step} is not "
                                "finite, though its loss and gradient norm were", mngr)
        good = health.calm()
        health.saved(step, good, eval_loss)
        checkpoint.save(mngr, step, state, dict(
            rows=[(n, {k: float(v) for k, v in o.items()}) for n, o in window],
            seconds=window_seconds + (t_pause - t0 if window else 0.0), **health.state()),
            good=good, eval_loss=eval_loss)
      t0 += time.perf_counter() - t_pause
      if signum:
        writer.flush()
        raise faults.Interrupted(signum, step, str(mngr.directory))
  finally:
    batches.close()
  final["compilations"] = float(sum(steps.traces.values()))
  console.summary(final, str(mngr.directory))
  return final


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def _finite(state) -> bool:
  """Every float of `state` (parameters and optimizer state) is finite: checked before each save."""
  return bool(_all_finite(state))


class _Health:
  """Judges each step and checkpoint of a run: a non-finite loss or gradient norm (or, with
  nan_policy=skip, `train.max_skipped_steps` of them in a row) and a loss spike that lasts
  (`faults.LossSpikes`) are divergences; a checkpoint saved while no spike is in progress is good. Its
  state travels in each checkpoint's window item, so a resumed run judges as the straight one."""

  def __init__(self, tcfg, saved: dict, start: int):
    self._tcfg = tcfg
    self.spikes = faults.LossSpikes(tcfg.loss_spike_factor, tcfg.loss_spike_steps, saved.get("spikes"))
    self.last_good = saved.get("last_good", start) or None  # A checkpoint from before this rule: good.
    self._best = saved.get("best_eval")
    self._skips = saved.get("skips", 0)  # Consecutive skipped steps.
    self._last_loss = None  # (step, loss) of the last finite step.

  def check(self, rows: list[tuple[str, dict]], first_step: int, skip: bool) -> str | None:
    """What went wrong in `rows` (step `first_step` on), or None."""
    for i, (task, out) in enumerate(rows):
      step = first_step + i
      bad = faults.first_nonfinite([out], step)
      if bad and not skip:
        return (f"{bad[1]}={bad[2]} at step {step} (--config.train.nan_policy=skip would drop such updates "
                "instead)")
      if bad or out.get("skipped", 0):
        self._skips += 1
        if self._skips >= self._tcfg.max_skipped_steps:
          last = (f"the last finite loss was {self._last_loss[1]:.4g} at step {self._last_loss[0]}"
                  if self._last_loss else "no step had a finite loss")
          return (f"{self._skips} steps in a row up to step {step} had a non-finite loss or gradient norm "
                  f"(config.train.max_skipped_steps={self._tcfg.max_skipped_steps}); {last}")
        continue
      self._skips = 0
      if "loss" not in out:
        continue
      loss = float(out["loss"])
      self._last_loss = (step, loss)
      spike = self.spikes.observe(task, step, loss)
      if spike:
        first, level = spike
        return (f"loss={loss:.4g} at step {step}: it stayed above {self.spikes.factor:g}× its recent level "
                f"{level:.4g} for {self.spikes.steps} steps, from step {first} "
                f"(config.train.loss_spike_factor, config.train.loss_spike_steps)")
    return None

  def calm(self) -> bool:
    return self.spikes.calm()

  def best_eval(self, eval_loss: float | None) -> bool:
    """Whether `eval_loss` is the best validation loss yet (and the run is calm, so it may be kept)."""
    return eval_loss is not None and self.calm() and (self._best is None or eval_loss < self._best)

  def saved(self, step: int, good: bool, eval_loss: float | None) -> None:
    if good:
      self.last_good = step
      if eval_loss is not None and (self._best is None or eval_loss < self._best):
        self._best = eval_loss

  def state(self) -> dict:
    return dict(spikes=self.spikes.state(), last_good=self.last_good, best_eval=self._best, skips=self._skips)

  def diverged(self, what: str, mngr) -> faults.Diverged:
    """The exit-3 error; the checkpoints saved after the last good one (during a spike) are moved aside,
    so that running the same command again resumes from the good one."""
    checkpoint.wait(mngr)
    later = [s for s in mngr.all_steps() if self.last_good is None or s > self.last_good]
    aside = checkpoint.set_aside(mngr, later, "diverged_checkpoints") if later else ""
    return faults.diverged(what, lr=self._tcfg.lr, last_good=self.last_good, set_aside=aside)


def _tasks_of(plan: RunPlan, window) -> list[Task]:
  by_name = {t.name: t for t in plan.tasks}
  return [by_name[name] for name, _ in window]


def _summarise(plan: RunPlan, window, step: int, skip: bool) -> dict[str, float]:
  """The plan's means over the window; with nan_policy=skip over its finite steps, plus their count."""
  if not skip:
    return plan.summarise(window, step)
  kept = [(n, o) for n, o in window if not o.get("skipped", 0)]
  row = plan.summarise(kept, step) if kept else {}
  row["skipped_steps"] = float(len(window) - len(kept))
  if len(kept) < len(window):
    logging.warning("nan_policy=skip: %d of the last %d steps had a non-finite loss or gradient norm; "
                    "their updates were dropped", len(window) - len(kept), len(window))
  return row


def shard_batch(batch, mesh, rules) -> Any:
  """`sharding.shard_batch` over a (possibly nested, e.g. AGD's encoder) dict of this process's rows."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(batch)
  names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in flat]
  arrays = sharding.shard_batch(dict(zip(names, (x for _, x in flat))), mesh, rules)
  return jax.tree.unflatten(treedef, [arrays[n] for n in names])
