"""Benchmark moma.data: first build of the embedded datasets, then batches/s at batch 32 × seq 1024.

Baseline in the same run: the same documents packed by a per-token Python loop (the straightforward
implementation), so the printed ratio is what the vectorised numpy packing buys. Last line: JSON.

  python -m experiments.bench_data [--batch_size=32] [--seq_len=1024] [--steps=20]
"""

import json
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from moma import data

_BATCH = flags.DEFINE_integer("batch_size", 32, "Rows per batch.")
_SEQ = flags.DEFINE_integer("seq_len", 1024, "Tokens per row.")
_STEPS = flags.DEFINE_integer("steps", 20, "Batches timed per setting.")


def per_token_batch(packer, seed, step, batch_size):
  """Baseline: the same documents, with labels filled one token at a time in Python."""
  shape = (batch_size, packer.seq_len)
  out = {k: np.zeros(shape, np.int32) for k in ("tokens", "modality", "segment", "position", "targets")}
  out["loss_mask"] = np.zeros(shape, np.float32)
  for row in range(batch_size):
    i = 0
    for s, (doc, _) in enumerate(packer._documents(seed, step, row), start=1):  # pylint: disable=protected-access
      for j, token in enumerate(doc):
        out["tokens"][row, i], out["segment"][row, i], out["position"][row, i] = token, s, j
        out["modality"][row, i] = packer.modality_table[token]
        if j + 1 < len(doc):
          out["targets"][row, i], out["loss_mask"][row, i] = doc[j + 1], doc[j + 1] != data.IMG
        i += 1
  return out


def rate(fn, steps):
  fn(0)  # warm (embedded examples are read into memory on first use)
  start = time.perf_counter()
  for step in range(1, steps + 1):
    fn(step)
  return steps / (time.perf_counter() - start)


def main(_):
  results = {}
  with tempfile.TemporaryDirectory() as cache_dir:
    start = time.perf_counter()
    for name in data.EMBEDDED:
      data.prepare(name, cache_dir)
    results["first_build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for name in data.EMBEDDED:
      data.prepare(name, cache_dir)
    results["cached_open_s"] = time.perf_counter() - start
    for form in ("discrete", "patches"):
      config = data.default_config()
      config.update(cache_dir=cache_dir, image_form=form)
      packer = data.Packer(config, split="train", seq_len=_SEQ.value)
      batch = packer.batch(0, 0, _BATCH.value)
      fast = rate(lambda s: packer.batch(0, s, _BATCH.value), _STEPS.value)
      slow = rate(lambda s: per_token_batch(packer, 0, s, _BATCH.value), max(2, _STEPS.value // 10))
      results[form] = dict(
          batches_per_s=fast, tokens_per_s=fast * _BATCH.value * _SEQ.value,
          baseline_batches_per_s=slow, speedup=fast / slow,
          fill=float((batch["segment"] > 0).mean()), loss_tokens=float(batch["loss_mask"].mean()))
      print(f"{form:9s} {fast:8.1f} batches/s ({fast * _BATCH.value * _SEQ.value / 1e6:.2f} M tok/s), "
            f"per-token baseline {slow:.1f}/s, ratio {fast / slow:.1f}x, fill {results[form]['fill']:.2f}")
  print(f"first build {results['first_build_s']:.2f} s, cached open {results['cached_open_s']:.2f} s")
  print(json.dumps(dict(batch_size=_BATCH.value, seq_len=_SEQ.value, **results)))


if __name__ == "__main__":
  app.run(main)
