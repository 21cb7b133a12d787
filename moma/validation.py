"""Checks of the train / checkpoint fields every config has, before anything is compiled or written.

Each failure is a ValueError of one line naming the field, what it must be, and the flag that fixes it.
(Model, data and mesh fields are checked by their own modules; the trainer runs those checks too before
it writes anything.)
"""

from __future__ import annotations

import math

from moma import faults

SCHEDULES = ("cosine", "linear")


def _fail(path: str, value, must: str, example) -> None:
  raise ValueError(f"config.{path}={value!r} must be {must}; set e.g. --config.{path}={example}")


def _int(config, path: str, low: int, example) -> None:
  value = _get(config, path)
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    _fail(path, value, f"an integer >= {low}", example)


def _number(config, path: str, low: float, high: float, example, *, open_low=False,
            open_high=False) -> None:
  value = _get(config, path)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
  if not ok:
    interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    _fail(path, value, f"a number in {interval}", example)


def _choice(config, path: str, choices, example) -> None:
  value = _get(config, path)
  if value not in choices:
    _fail(path, value, f"one of {list(choices)}", example)


def _get(config, path: str):
  node = config
  for key in path.split("."):
    node = node[key]
  return node


def check_fields(config) -> None:
  """Raises ValueError (one line: field, requirement, fix) for the first bad train / checkpoint field."""
  _int(config, "train.steps", 1, 200)
  _int(config, "train.batch_size", 1, 8)
  _int(config, "train.seq_len", 1, 256)
  _int(config, "train.seed", 0, 0)
  _int(config, "train.log_every", 1, 10)
  _int(config, "train.eval_every", 0, "0 (never) or 100")
  if config.train.eval_every:
    _int(config, "train.eval_steps", 1, 4)
  _int(config, "train.warmup_steps", 0, 20)
  _number(config, "train.lr", 0, math.inf, 1e-3, open_low=True, open_high=True)
  _number(config, "train.min_lr_ratio", 0, 1, 0.1)
  _number(config, "train.b1", 0, 1, 0.9, open_high=True)
  _number(config, "train.b2", 0, 1, 0.95, open_high=True)
  _number(config, "train.eps", 0, math.inf, 1e-8, open_low=True, open_high=True)
  _number(config, "train.weight_decay", 0, math.inf, 0.1, open_high=True)
  _number(config, "train.grad_clip", 0, math.inf, 1.0, open_low=True, open_high=True)
  _choice(config, "train.schedule", SCHEDULES, "cosine")
  _choice(config, "train.nan_policy", faults.NAN_POLICIES, "stop")
  _int(config, "train.max_skipped_steps", 1, 10)
  if config.train.loss_spike_factor != 0:
    _number(config, "train.loss_spike_factor", 1, math.inf, "2 (or 0: no loss-spike detection)",
            open_low=True, open_high=True)
  _int(config, "train.loss_spike_steps", 1, 10)
  _int(config, "train.prefetch", 0, 2)
  _number(config, "train.peak_flops", 0, math.inf, "2e11 (FLOP/s per device; 0: the device's data sheet)",
          open_high=True)
  freeze = config.train.get("freeze", ())
  if not (isinstance(freeze, str) or isinstance(freeze, (tuple, list)) and all(
      isinstance(p, str) and p.strip() for p in freeze)):
    _fail("train.freeze", freeze, "a tuple of modality names or parameter-path patterns",
          "\"('text',)\" (moma/freeze.py)")
  _int(config, "checkpoint.every_steps", 1, 100)
  _int(config, "checkpoint.max_to_keep", 1, 3)
