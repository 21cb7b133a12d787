"""The training loop every run goes through: a plain LM run is one task, an AGD run several.

`run(config, workdir, plan)` takes a validated `RunPlan` (tasks, which task trains at each step, how a
window of step outputs becomes a logged row, evaluation) and owns everything a cluster run must
survive: the workdir lock, preemption signals, divergence, checkpoints that carry the unlogged window (so
a resumed run logs whole windows and every step once), and host batches prepared ahead in a
background thread (`train.prefetch` of them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from moma import checkpoint
from moma import console as console_lib
from moma import faults
from moma import metrics as metrics_lib
from moma import sharding


@dataclasses.dataclass(frozen=True)
class Task:
  """One kind of step. `step_fn(state, batch) -> (state, out)` is compiled on the task's first step;
  `batch_at(i)` is this process's host batch of (0-based) step i, validated; `tokens` per step (global)."""

  name: str
  step_fn: Callable
  batch_at: Callable[[int], Any]
  tokens: int
  flops_per_token: float


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
  """One compiled step per task, compiled ahead of time on the task's first batch and reused after.

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
    return self._compiled[task.name](state, batch)


class Prefetcher:
  """`produce(i)` for i in `steps`, computed up to `depth` ahead in a daemon thread (depth 0: inline)."""

  def __init__(self, produce: Callable[[int], Any], steps: range, depth: int):
    self._produce, self._steps, self._depth = produce, iter(steps), depth
    self._stop = threading.Event()
    if depth:
      self._queue: queue.Queue = queue.Queue(maxsize=depth)
      self._thread = threading.Thread(target=self._fill, daemon=True, name="moma-prefetch")
      self._thread.start()

  def _fill(self) -> None:
    for i in self._steps:
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


def _stop_signal(preemption: faults.Preemption) -> int:
  """The signal that asked to stop, agreed by all processes (any one's signal stops them all)."""
  signum = preemption.signum or 0
  if jax.process_count() > 1:
    signum = int(np.max(multihost_utils.process_allgather(np.int32(signum))))
  return signum


def run(config: ml_collections.ConfigDict, workdir: str, plan: RunPlan) -> dict[str, float]:
  """Trains `plan` in `workdir` (validated by the caller: nothing was written before this call)."""
  tcfg = config.train
  with faults.WorkdirLock(workdir, jax.process_index()), faults.Preemption() as preemption:
    checkpoint.write_config(config, workdir)
    mngr = checkpoint.manager(workdir, config)
    try:
      state, state_sh, start, saved = plan.init(mngr)
      if start >= tcfg.steps:
        if jax.process_index() == 0:
          print(f"{workdir} is already trained to step {start} (train.steps={tcfg.steps}); raise "
                "--config.train.steps to train further")
        final = {k: v for r in metrics_lib.read(workdir) if r["step"] == start for k, v in r.items()}
        return {**final, "step": start}
      writer = metrics_lib.MetricWriter(workdir, resume_step=start)
      try:
        return _loop(config, workdir, plan, mngr, writer, preemption, state, state_sh, start, saved)
      finally:
        writer.close()
    finally:  # Also on errors and signals: let a pending async save finish.
      mngr.wait_until_finished()
      mngr.close()


def _loop(config, workdir, plan, mngr, writer, preemption, state, state_sh, start, saved):
  tcfg = config.train
  skip = tcfg.nan_policy == "skip"
  peak = metrics_lib.peak_flops_per_device(tcfg.peak_flops, plan.mesh.devices.flat[0])
  console = console_lib.Console(config, workdir, plan.describe, start)
  steps = StepCache(lambda task: task.step_fn, state_sh, (plan.mesh, plan.rules))

  def prepare(i):  # Background thread: the host batch of step i, placed on the mesh.
    task = plan.tasks[plan.task_at(i)]
    return task, shard_batch(task.batch_at(i), plan.mesh, plan.rules)

  # The window: steps since the last logged row, carried across restarts inside the checkpoint.
  window = [(name, out) for name, out in (saved or {}).get("rows", [])]
  window_seconds = float((saved or {}).get("seconds", 0.0))
  checked = len(window)  # Rows of `window` already checked for non-finite values (host floats).
  last_saved = start or None
  final: dict[str, float] = {"step": start}
  batches = Prefetcher(prepare, range(start, tcfg.steps), tcfg.prefetch)
  try:
    t0 = time.perf_counter()
    for step in range(start + 1, tcfg.steps + 1):
      task, batch = batches.next()
      compiling = not steps.compiled(task)
      state, out = steps(task, state, batch)
      if compiling:  # Compilation stays out of tokens/s.
        t0 += steps.seconds - console.timing["compile"]
        console.timing["compile"] = steps.seconds
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
      bad = faults.first_nonfinite([o for _, o in window[checked:]], step - len(window) + checked + 1)
      if bad and not skip:
        raise faults.diverged(*bad, lr=tcfg.lr, last_saved=last_saved)
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
      if evaluate:
        with sharding.activate(plan.mesh, plan.rules):
          row = plan.evaluate(state.params)
        writer.write(step, row)
        final.update(row)
        console.eval(step, row)
        console.timing["eval"] += time.perf_counter() - t_pause
      if save:
        checkpoint.save(mngr, step, state, dict(
            rows=[(n, {k: float(v) for k, v in o.items()}) for n, o in window],
            seconds=window_seconds + (t_pause - t0 if window else 0.0)))
        last_saved = step
      t0 += time.perf_counter() - t_pause
      if signum:
        writer.flush()
        raise faults.Interrupted(signum, step, str(mngr.directory))
  finally:
    batches.close()
    console.close()
  final["compilations"] = float(sum(steps.traces.values()))
  console.summary(final, str(mngr.directory))
  return final


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
