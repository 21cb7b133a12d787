"""CLI: `python -m moma.main --config=configs/mot.py:size=tiny --workdir=runs/x [--config.a.b=v ...]`.

Running the same command again resumes from the latest readable checkpoint in the workdir.

Console (moma/cli.py): quiet by default (the trainer's own lines and warnings; library logs such as TFDS's
and orbax's are off). absl's `--verbosity=0` shows INFO logs and the traceback behind an error,
`--verbosity=1` DEBUG. Exit codes: 0 done (or stopped by SIGTERM after saving), 130 stopped by SIGINT
after saving, 1 the run cannot start or go on, or a flag or config file is wrong (a one-line reason on
stderr), 3 diverged
(non-finite loss or gradient norm, a lasting loss spike, or too many skipped steps), 128 + N a signal N
before training started (nothing written).
"""

from moma import faults

# From the program's first instant a SIGINT / SIGTERM only asks the run to stop: checked between start-up
# phases and at each step, so none is lost inside an import or a compilation (a KeyboardInterrupt there
# can be swallowed by a callback). The trainer takes it over (train.run's `stop`).
_STOP = faults.Preemption().__enter__() if __name__ == "__main__" else None

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from moma import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file with optional argument, e.g. configs/mot.py:size=tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(_):
  from moma import sharding  # pylint: disable=g-import-not-at-top (after flag parsing: jax is heavy)

  sharding.maybe_initialize_distributed(_CONFIG.value)  # Multi-host runs: before any other jax call.
  from moma import train  # pylint: disable=g-import-not-at-top

  return train.run(_CONFIG.value, _WORKDIR.value, tracebacks=cli.verbose(), stop=_STOP)


if __name__ == "__main__":
  cli.run(main)
