"""Benchmark moma.data packing: full rows (text cut across rows) against the packer before issue 16.

For seq 256 (the tiny preset) and 1024, on the default mixture: batches/s, the share of positions that
carry loss, the share of real (non-padding) positions and each modality's share of real tokens (so a
packer that fills rows by favouring short documents would show). Baseline in the same run: the packer
of commit BASELINE (documents never cut; the first that does not fit ends the row), loaded from git.
Also the first build of the embedded datasets. Last line: JSON.

  python -m experiments.bench_data [--batch_size=32] [--steps=20]
"""

import importlib.util
import json
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from moma import data

BASELINE = "61e99a0"  # main before issue 16: documents never cut
_BATCH = flags.DEFINE_integer("batch_size", 32, "Rows per batch.")
_STEPS = flags.DEFINE_integer("steps", 20, "Batches timed per setting.")


def baseline_packer_class(tmp: str):
  """moma.data.pipeline.Packer as of BASELINE (it reads the same sources through `render`)."""
  root = pathlib.Path(__file__).resolve().parents[1]
  source = subprocess.run(["git", "show", f"{BASELINE}:moma/data/pipeline.py"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
  path = pathlib.Path(tmp) / "baseline_pipeline.py"
  path.write_text(source)
  spec = importlib.util.spec_from_file_location("baseline_pipeline", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module.Packer


def rate(fn, steps):
  fn(0)  # warm (embedded examples are read into memory on first use)
  start = time.perf_counter()
  for step in range(1, steps + 1):
    fn(step)
  return steps / (time.perf_counter() - start)


def shares(packer, steps, batch_size, names):
  loss, real, counts = 0.0, 0.0, np.zeros(len(names))
  for step in range(steps):
    batch = packer.batch(0, step, batch_size)
    loss += batch["loss_mask"].mean() / steps
    real += (batch["segment"] > 0).mean() / steps
    counts += np.bincount(batch["modality"][batch["segment"] > 0], minlength=len(names))
  return dict(loss_share=float(loss), real_share=float(real),
              modality_share={n: round(float(c), 4) for n, c in zip(names, counts / counts.sum())})


def main(_):
  results = {}
  with tempfile.TemporaryDirectory() as cache_dir:
    start = time.perf_counter()
    for name in data.EMBEDDED:
      data.prepare(name, cache_dir)
    results["first_build_s"] = time.perf_counter() - start
    packers = {"new": data.Packer, "baseline": baseline_packer_class(cache_dir)}
    config = data.default_config()
    config.cache_dir = cache_dir
    for seq_len in (256, 1024):
      for name, packer_class in packers.items():
        packer = packer_class(config, split="train", seq_len=seq_len)
        speed = rate(lambda s, p=packer: p.batch(0, s, _BATCH.value), _STEPS.value)
        row = dict(batches_per_s=speed, **shares(packer, 10, _BATCH.value, config.modalities))
        results[f"{name}_{seq_len}"] = row
        print(f"seq {seq_len:5d} {name:8s} {speed:7.1f} batches/s  loss share {row['loss_share']:.3f}  "
              f"real {row['real_share']:.3f}  modalities {row['modality_share']}")
      results[f"speed_ratio_{seq_len}"] = (results[f"new_{seq_len}"]["batches_per_s"] /
                                           results[f"baseline_{seq_len}"]["batches_per_s"])
  print(f"first build {results['first_build_s']:.2f} s")
  print(json.dumps(dict(batch_size=_BATCH.value, baseline=BASELINE, **results)))


if __name__ == "__main__":
  app.run(main)
