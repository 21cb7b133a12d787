"""Metric sinks of the run directory: `metrics.jsonl` (one JSON object per logged step) + TensorBoard.

Only process 0 writes. On resume, lines past the restored step are dropped first, so that the file
reads like one uninterrupted run (those steps are trained, and logged, again).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Mapping

from absl import logging
import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip, by `device_kind` prefix (vendor data sheets, no sparsity). Longer
# prefixes first: "TPU v5 lite" (v5e) must not match "TPU v5" (v5p).
PEAK_FLOPS = {
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA B200": 2250e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops_per_device(override: float = 0.0, device=None) -> float | None:
  """Peak FLOP/s of one device: `override` (config.train.peak_flops) when > 0, else the table's entry for
  the device's kind, else None (e.g. CPU): then no MFU is reported rather than a made-up one."""
  if override > 0:
    return float(override)
  kind = (device or jax.devices()[0]).device_kind
  return next((peak for prefix, peak in PEAK_FLOPS.items() if kind.startswith(prefix)), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak_per_device: float, num_devices: int) -> float:
  """Model FLOPs utilisation: the analytic training FLOPs (`moma.flops`, not XLA's count) done per second
  over the peak of the devices the step runs on."""
  return tokens_per_s * flops_per_token / (peak_per_device * num_devices)


class MetricWriter:
  """Appends scalars to DIR/metrics.jsonl and TensorBoard events under DIR/tensorboard.

  On resume from `resume_step`, metrics.jsonl keeps the rows up to that step (a torn last line, from a
  kill during a write, is dropped with a warning) and TensorBoard is rewritten from them, so that both
  hold every step once. Non-finite values are written as null: the file stays strict JSON.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self._active = jax.process_index() == 0
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self._active:
      return
    rows = _truncate_after(self._path, resume_step)
    from tensorboardX import SummaryWriter  # Heavy import, only on the writing process.

    tb_dir = os.path.join(workdir, "tensorboard")
    stale = [os.path.join(tb_dir, f) for f in os.listdir(tb_dir)] if os.path.isdir(tb_dir) else []
    self._tb = SummaryWriter(tb_dir)
    for row in rows:
      self._add_scalars(row)
    self._tb.flush()
    for path in stale:  # Only once the rewritten events are on disk.
      os.remove(path)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._active:
      return
    row = {"step": int(step), **{k: _to_float(v) for k, v in sorted(scalars.items())}}
    with open(self._path, "a") as f:
      f.write(json.dumps(row, allow_nan=False) + "\n")
    self._add_scalars(row)

  def _add_scalars(self, row: Mapping[str, float | None]) -> None:
    for k, v in row.items():
      if k != "step" and v is not None:
        self._tb.add_scalar(k, v, row["step"])

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read(workdir: str | os.PathLike) -> list[dict]:
  """The rows of DIR/metrics.jsonl, in order (for the trainer, studies, tests, notebooks and plots); a
  torn last line (a kill during a write) is left out with a warning, a damaged line elsewhere is an error
  naming it."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except ValueError:
      if i < len(lines) - 1:
        raise ValueError(f"{path} line {i + 1} is not JSON ({line[:40]!r}...); delete that line (the run "
                         "rewrites metrics past its last checkpoint on resume)") from None
      logging.warning("%s: dropping a torn last line (%r), left by a kill during a write", path,
                      line[:40])
  return rows


def tensorboard_steps(workdir: str) -> dict[str, list[int]]:
  """{tag: [step, ...]} over every events file under DIR/tensorboard, in file order (for checks that each
  step is logged once). Reads the TFRecord framing directly: no TensorFlow needed."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  tags: dict[str, list[int]] = {}
  directory = os.path.join(workdir, "tensorboard")
  for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset + 12 <= len(data):  # u64 length, u32 crc, payload, u32 crc
      (length,) = struct.unpack_from("<Q", data, offset)
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        tags.setdefault(value.tag, []).append(event.step)
  return tags


def _truncate_after(path: str, step: int) -> list[dict]:
  """Rewrites `path` (atomically) with its rows up to `step`; returns them."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read()
  rows = read(os.path.dirname(path))
  kept = [{k: v if k == "step" else _to_float(v) for k, v in r.items()} for r in rows if r["step"] <= step]
  new_text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept)
  if new_text != text:
    with open(path + ".tmp", "w") as f:
      f.write(new_text)
    os.replace(path + ".tmp", path)
  return kept


def _to_float(v) -> float | None:
  if v is None:
    return None
  x = float(np.asarray(v))
  return x if math.isfinite(x) else None
