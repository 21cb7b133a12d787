"""What a run survives: another trainer on its workdir, preemption signals, and a diverging loss.

`WorkdirLock` keeps one trainer per workdir (an flock, released by the kernel if the holder dies, so a
kill -9 leaves no stale lock); the processes of one multi-host trainer each hold their own (DIR/lock for
process 0, DIR/lock.<i> for the others), so they share a workdir while a second trainer is refused.
`Preemption` turns SIGTERM / SIGINT into a request that the trainer honours at the next step boundary
(checkpoint, flush, exit); a second signal exits at once.
`first_nonfinite` finds the step and metric where a run diverged. The exceptions below are what the CLI
turns into one line and an exit code (`moma.cli.report`).
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
  """Raised after the state at `step` was checkpointed because `signum` asked the run to stop."""

  def __init__(self, signum: int, step: int, checkpoint_dir: str):
    self.signum, self.step = signum, step
    self.exit_code = 130 if signum == signal.SIGINT else 0
    super().__init__(f"{signal.Signals(signum).name}: saved step {step} to {checkpoint_dir}; run the same "
                     "command again to resume")


class WorkdirLock:
  """An exclusive lock on DIR/lock (process 0; DIR/lock.<i> for process i) naming its holder (pid, host,
  start time); removed on release."""

  def __init__(self, workdir: str, process_index: int = 0):
    self.path = os.path.join(workdir, LOCK_FILE + (f".{process_index}" if process_index else ""))
    self._fd = None

  def __enter__(self) -> "WorkdirLock":
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
    sys.stderr.write(f"\n{signal.Signals(signum).name}: finishing this step, then saving and exiting "
                     "(send it again to exit at once).\n")
    sys.stderr.flush()

  def __enter__(self) -> "Preemption":
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

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


def diverged(step: int, metric: str, value: float, lr: float, last_saved: int | None) -> Diverged:
  resume = (f"the last good checkpoint (step {last_saved}) is kept; resume from it with a lower "
            f"learning rate, e.g. --config.train.lr={lr / 3:.3g}" if last_saved else
            f"no checkpoint was saved; start again with a lower learning rate, e.g. "
            f"--config.train.lr={lr / 3:.3g}")
  return Diverged(f"diverged: {metric}={value} at step {step}; nothing from that step on was saved, "
                  f"{resume} (or --config.train.nan_policy=skip to drop non-finite updates)")
