"""Trainer step time with host batches prepared ahead in a background thread (train.prefetch=2) against
inline preparation (train.prefetch=0), same run otherwise, arms interleaved (A B A B ...).

  python -m experiments.bench_prefetch [--d_model=64,256] [--steps=60] [--repeats=2]

Each run is the real trainer (`train.train_and_evaluate`, configs/mot.py:size=tiny with d_model set,
logging once at the end so the one logged tokens/s covers every step after compilation). Step time =
tokens per step / tokens/s. Last line: JSON with the median step time per arm and the ratio.
"""

import json
import statistics
import tempfile

from absl import flags
import jax

from configs import mot
from moma import cli
from moma import train

_D_MODEL = flags.DEFINE_list("d_model", ["64", "256"], "Model widths (64 is the tiny preset).")
_STEPS = flags.DEFINE_integer("steps", 60, "Steps per run.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Runs per arm (interleaved).")


def step_seconds(d_model: int, prefetch: int, workdir: str) -> float:
  config = mot.get_config("size=tiny")
  config.model.update(d_model=d_model, d_ff=3 * d_model)
  config.train.update(steps=_STEPS.value, log_every=_STEPS.value, eval_every=0, progress_bar=False,
                      prefetch=prefetch)
  config.checkpoint.every_steps = _STEPS.value
  final = train.train_and_evaluate(config, workdir)
  return config.train.batch_size * config.train.seq_len / final["tokens_per_s"]


def main(argv):
  del argv
  jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp())  # Later runs skip compiling.
  results = {}
  for d_model in map(int, _D_MODEL.value):
    times = {0: [], 2: []}
    for r in range(_REPEATS.value):
      for prefetch in (0, 2):
        with tempfile.TemporaryDirectory() as workdir:
          times[prefetch].append(step_seconds(d_model, prefetch, workdir))
        print(f"d_model={d_model} run {r} prefetch={prefetch}: {times[prefetch][-1] * 1e3:.1f} ms/step",
              flush=True)
    inline, ahead = statistics.median(times[0]), statistics.median(times[2])
    results[f"d_model={d_model}"] = dict(inline_ms=round(inline * 1e3, 2), prefetch2_ms=round(ahead * 1e3, 2),
                                        speedup=round(inline / ahead, 3))
  print(json.dumps(dict(steps=_STEPS.value, repeats=_REPEATS.value, results=results)))


if __name__ == "__main__":
  cli.run(main)
