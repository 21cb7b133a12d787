"""Metric sinks of the run directory: `metrics.jsonl` (one JSON object per logged step) + TensorBoard.

Only process 0 writes. On resume, lines past the restored step are dropped first, so that the file
reads like one uninterrupted run (those steps are trained, and logged, again).
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip, by `device_kind` prefix (vendor data sheets, no sparsity).
PEAK_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops_per_device(device=None) -> float | None:
  """Peak bf16 FLOP/s of one device, or None where unknown (CPU): MFU is then not reported."""
  kind = (device or jax.devices()[0]).device_kind
  for prefix, peak in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return peak
  return None


class MetricWriter:
  """Appends scalars to DIR/metrics.jsonl and TensorBoard events under DIR/tensorboard."""

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self._active = jax.process_index() == 0
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self._active:
      return
    _truncate_after(self._path, resume_step)
    from tensorboardX import SummaryWriter  # Heavy import, only on the writing process.

    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._active:
      return
    row = {"step": int(step), **{k: _to_float(v) for k, v in sorted(scalars.items())}}
    with open(self._path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read(workdir: str) -> list[dict]:
  """The rows of DIR/metrics.jsonl, in order (for tests, notebooks and plots)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _truncate_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  rows = read(os.path.dirname(path))
  kept = [r for r in rows if r["step"] <= step]
  if len(kept) != len(rows):
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)


def _to_float(v) -> float:
  return float(np.asarray(v))
