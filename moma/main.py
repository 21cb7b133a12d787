"""CLI: `python -m moma.main --config=configs/mot.py:size=tiny --workdir=runs/x [--config.a.b=v ...]`.

Running the same command again resumes from the latest readable checkpoint in the workdir.

Console: quiet by default (the trainer's own lines; library INFO chatter such as TFDS's and orbax's is
off). absl's `--verbosity=0` shows INFO logs and the traceback behind an error, `--verbosity=1` DEBUG.
Exit codes: 0 done (or stopped by SIGTERM after saving), 130 stopped by SIGINT after saving, 1 the run
cannot start or go on (a one-line reason on stderr), 3 diverged (non-finite loss or gradient norm).
"""

import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file with optional argument, e.g. configs/mot.py:size=tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str, *, tracebacks: bool = False) -> int:
  """Trains `config` in `workdir`; returns the exit code. User errors (bad config, data, workdir) and
  faults (lock held, divergence, a signal) are one line on stderr, with the traceback if `tracebacks`."""
  from moma import faults  # pylint: disable=g-import-not-at-top (after flag parsing: jax is heavy)
  from moma import train  # pylint: disable=g-import-not-at-top

  try:
    train.train_and_evaluate(config, workdir)
    return 0
  except faults.Interrupted as e:
    sys.stderr.write(f"{e}\n")
    return e.exit_code
  except (faults.RunError, ValueError) as e:
    if tracebacks:
      traceback.print_exc()
    message = " ".join(str(e).split())
    sys.stderr.write(f"error: {message}\n")
    return getattr(e, "exit_code", 1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  verbose = flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= logging.INFO
  if not verbose:  # Library INFO chatter (TFDS "Load dataset info", orbax phases) stays off.
    logging.set_verbosity(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from moma import sharding  # pylint: disable=g-import-not-at-top

  sharding.maybe_initialize_distributed(_CONFIG.value)  # Multi-host runs: before any other jax call.
  sys.exit(run(_CONFIG.value, _WORKDIR.value, tracebacks=verbose))


if __name__ == "__main__":
  app.run(main)
