"""CLI: `python -m moma.main --config=configs/mot.py:size=tiny --workdir=runs/x [--config.a.b=v ...]`.

Running the same command again resumes from the latest checkpoint in the workdir.
"""

import logging as py_logging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from moma import sharding
from moma import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file with optional argument, e.g. configs/mot.py:size=tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  sharding.maybe_initialize_distributed(_CONFIG.value)  # Multi-host runs: before any other jax call.
  # orbax logs every checkpoint phase at INFO; keep the console to the trainer's own lines.
  logging.get_absl_logger().addFilter(
      lambda r: r.levelno >= py_logging.WARNING or "/orbax/" not in r.pathname)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
