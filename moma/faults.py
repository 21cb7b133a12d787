"""What a run survives: another trainer on its workdir, preemption signals, and a diverging loss.

`WorkdirLock` keeps one trainer per workdir (an flock, released by the kernel if the holder dies, so a
kill -9 leaves no stale lock); the processes of one multi-host trainer each hold their own (DIR/lock for
process 0, DIR/lock.<i> for the others), so they share a workdir while a second trainer is refused.
`Preemption` turns SIGTERM / SIGINT into a request that the trainer honours at the next step boundary
(checkpoint, flush, exit); a second signal exits at once.
`first_nonfinite` finds the step and metric where a run diverged, `LossSpikes` a loss that jumps far above
its recent level and stays there. The exceptions below are what the CLI turns into one line and an exit
code (`moma.cli.report`).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import math
import os
import signal
import socket
import sys
import threading

LOCK_FILE = "lock"
NAN_POLICIES = ("stop", "skip")


class RunError(Exception):
  """A run that cannot start or go on, for a reason the message states with its fix (no traceback)."""

  exit_code = 1


class Diverged(RunError):
  exit_code = 3


class Interrupted(RunError):
  """`signum` asked the run to stop. After the state at `step` was checkpointed: exit 0 for SIGTERM (a
  preempted job that saved), 130 for SIGINT. Before the start was accepted (`step` None, nothing
  written): 128 + the signal number."""

  def __init__(self, signum: int, step: int | None = None, checkpoint_dir: str = ""):
    self.signum, self.step = signum, step
    name = signal.Signals(signum).name
    if step is None:
      self.exit_code = 128 + signum
      super().__init__(f"{name} before training started: nothing was written; run the same command again "
                       "to start")
    else:
      self.exit_code = 130 if signum == signal.SIGINT else 0
      super().__init__(f"{name}: saved step {step} to {checkpoint_dir}; run the same command again to resume")


class WorkdirLock:
  """An exclusive lock on DIR/lock (process 0; DIR/lock.<i> for process i) naming its holder (pid, host,
  start time); removed on release, with the directories it had to create when they are still empty (a
  refused start leaves no trace)."""

  def __init__(self, workdir: str, process_index: int = 0):
    self.path = os.path.join(workdir, LOCK_FILE + (f".{process_index}" if process_index else ""))
    self._fd = None
    self._created: list[str] = []  # deepest first

  def __enter__(self) -> "WorkdirLock":
    directory = os.path.abspath(os.path.dirname(self.path) or ".")
    while not os.path.exists(directory):
      self._created.append(directory)
      directory = os.path.dirname(directory)
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunError(f"workdir {os.path.dirname(self.path)} is in use by another trainer ({holder}); wait "
                       "for it to finish or stop it, or use another --workdir") from None
      # The holder may have unlinked the file between our open and flock: lock the file on disk.
      if os.path.exists(self.path) and os.path.samestat(os.fstat(fd), os.stat(self.path)):
        break
      os.close(fd)
    holder = dict(pid=os.getpid(), host=socket.gethostname(),
                  since=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder).encode())
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.unlink(self.path)
      os.close(self._fd)  # Closing releases the flock.
      self._fd = None
    for directory in self._created:
      try:
        os.rmdir(directory)  # Only if empty: the run wrote something there.
      except OSError:
        break


def _read_holder(fd: int) -> str:
  try:
    holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    return f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
  except (ValueError, KeyError, OSError):
    return "holder unknown"


class Preemption:
  """Within the context, SIGTERM and SIGINT set `signum` instead of killing the process; the trainer
  checks it at each step boundary. A second signal exits at once (128 + signal number), unsaved.

  Handlers can only be installed from the main thread; elsewhere (a notebook's worker thread) the
  context does nothing and signals keep their default behaviour.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None:
      sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting now without saving.\n")
      sys.stderr.flush()
      os._exit(128 + signum)
    self.signum = signum
    sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping at the next step boundary (saving there) or "
                     "before training starts (send it again to exit at once).\n")
    sys.stderr.flush()

  def check(self) -> None:
    """Raises `Interrupted` (nothing written) if a signal came: called between start-up phases."""
    if self.signum is not None:
      raise Interrupted(self.signum)

  def __enter__(self) -> "Preemption":
    self.install()
    return self

  def install(self) -> None:
    """(Re)installs the handlers: `jax.distributed.initialize` installs its own SIGTERM handler (its
    preemption notifier), which would otherwise take the signal from a Preemption entered earlier."""
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        previous = signal.signal(s, self._handle)
        self._previous.setdefault(s, previous)

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}


@contextlib.contextmanager
def damaged_data_cache(cache_dir: str):
  """Turns a failure to read the data cache (other than a config error) into one line naming the cache
  and the fix; the embedded datasets are rebuilt on the next start once the damaged cache is gone."""
  try:
    yield
  except ValueError:
    raise
  except Exception as e:  # pylint: disable=broad-except (TFDS / array_record raise many kinds)
    path = os.path.abspath(os.path.expanduser(cache_dir))
    reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
    raise ValueError(f"config.data.cache_dir={cache_dir!r}: the dataset cache at {path} is unreadable "
                     f"({reason}); delete {path} (the embedded datasets are rebuilt on the next start) "
                     "or point --config.data.cache_dir at another directory") from e


def first_nonfinite(rows: list[dict], first_step: int, keys=("loss", "grad_norm")):
  """(step, metric, value) of the first row (row i is step first_step + i) with a non-finite `keys`
  value, or None."""
  for i, row in enumerate(rows):
    for key in keys:
      if key in row and not math.isfinite(float(row[key])):
        return first_step + i, key, float(row[key])
  return None


class LossSpikes:
  """Per task, a loss above `factor` × its recent level is a spike; `steps` spikes in a row are a
  divergence. The level is the 10th percentile of the last `HISTORY` calm steps' losses: low enough that a
  curve still falling fast does not hide a jump, and above a single lucky batch. The early steps (fewer
  than `MIN_HISTORY` calm ones) set the level and are never spikes. `state()` is JSON, saved with each
  checkpoint, so a resumed run keeps its level. `factor` 0 turns detection off."""

  HISTORY, MIN_HISTORY = 100, 10

  def __init__(self, factor: float, steps: int, state: dict | None = None):
    self.factor, self.steps = factor, steps
    state = state or {}
    self._history = {task: list(h) for task, h in state.get("history", {}).items()}
    self._spikes = {task: tuple(s) for task, s in state.get("spikes", {}).items()}  # task → (first, count)

  def observe(self, task: str, step: int, loss: float) -> tuple[int, float] | None:
    """(first spike step, recent level) when `loss` at `step` completes a divergence, else None."""
    history = self._history.setdefault(task, [])
    level = sorted(history)[len(history) // 10] if len(history) >= self.MIN_HISTORY else 0.0
    if self.factor and level > 0 and loss > self.factor * level:
      first, count = self._spikes.get(task, (step, 0))
      self._spikes[task] = (first, count + 1)
      return (first, level) if count + 1 >= self.steps else None
    self._spikes.pop(task, None)
    history.append(loss)
    del history[:-self.HISTORY]
    return None

  def calm(self) -> bool:
    """No task is in a spike: a checkpoint saved now is good."""
    return not self._spikes

  def state(self) -> dict:
    return {"history": self._history, "spikes": {t: list(s) for t, s in self._spikes.items()}}


def diverged(what: str, *, lr: float, last_good: int | None, set_aside: str = "") -> Diverged:
  """The exit-3 error of a run that diverged: `what` happened, from which step on nothing good was saved.
  `set_aside` names where the checkpoints saved after `last_good` went (they hold the diverging model)."""
  lower = f"a lower learning rate, e.g. --config.train.lr={min(lr / 3, 1e-3):.3g}"
  if last_good:
    resume = (f"the last good checkpoint is step {last_good}"
              + (f" (the later ones moved to {set_aside})" if set_aside else "")
              + f"; resume from it with {lower}")
  else:
    resume = f"no good checkpoint was saved; start again with {lower}"
  return Diverged(f"diverged: {what}; {resume}")
