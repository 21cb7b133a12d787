"""Benchmark moma.data packing: full rows (text cut across rows) against a packer that never cuts documents.

For seq 256 (the tiny preset) and 1024: batches/s, the share of positions that carry loss, the share of
real (non-padding) positions and each modality's share of real tokens (so a packer that fills rows by
favouring short documents would show). Three settings in the same run, interleaved:
  new:      this packer on this default mixture (with the generated scenes and melodies);
  old_pack: the packer of commit BASELINE (documents never cut; the first that does not fit ends the
            row), loaded from git, rendering one document at a time with this moma.data.sources, on
            this default mixture;
  today:    the packer, document renderer and default mixture (text, digits, DTMF) of commit BASELINE.
new vs old_pack is the packing change alone (plus block rendering); new vs today adds the new mixture,
whose generated scenes and melodies are rendered in numpy blocks (per 16 draws, one block per source)
where today's media were cached per example.
Rates are 1 / the fastest of `steps` interleaved batches (robust to other jobs on the CPU).
Also the first build of the embedded datasets. Last line: JSON.

  python -m experiments.bench_data [--batch_size=32] [--steps=40]

With --corpus=DIR[,DIR...] it measures the records-corpus loader instead (`moma.data.corpus`; make one with
experiments/make_corpus.py): per corpus and for 1 and 8 simulated processes, process 0's packer at seq 4,096
in a fresh spawned process (one core): tokens/s per process over --steps batches of --batch_size rows, the
time to the first batch (manifest read, shards opened) and host memory (peak RSS, and RSS growth after the
first batch), so two corpus sizes show whether memory grows with the corpus.

  python -m experiments.bench_data --corpus=/tmp/corpus_1b,/tmp/corpus_100m --batch_size=8 --steps=100
"""

import importlib.util
import json
import multiprocessing
import os
import resource
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import flags
import numpy as np

from moma import cli
from moma import data

BASELINE = "61e99a0"  # the last commit whose packer never cut a document across rows
_BATCH = flags.DEFINE_integer("batch_size", 32, "Rows per batch.")
_STEPS = flags.DEFINE_integer("steps", 40, "Batches timed per setting.")
_CORPUS = flags.DEFINE_list("corpus", [], "Records corpora to benchmark the corpus loader on (instead of the "
                            "mixture packers).")
CORPUS_SEQ, CORPUS_PROCESSES = 4096, (1, 8)


def baseline_module(tmp: str, name: str, alias: str = ""):
  """moma/data/{name}.py as of BASELINE, imported from a copy as `baseline_{alias or name}` (its own
  imports are today's modules)."""
  root = pathlib.Path(__file__).resolve().parents[1]
  source = subprocess.run(["git", "show", f"{BASELINE}:moma/data/{name}.py"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
  path = pathlib.Path(tmp) / f"baseline_{alias or name}.py"
  path.write_text(source)
  spec = importlib.util.spec_from_file_location(f"baseline_{alias or name}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def shares(packer, steps, batch_size, names):
  loss, real, counts = 0.0, 0.0, np.zeros(len(names))
  for step in range(steps):
    batch = packer.batch(0, step, batch_size)
    loss += batch["loss_mask"].mean() / steps
    real += (batch["segment"] > 0).mean() / steps
    counts += np.bincount(batch["modality"][batch["segment"] > 0], minlength=len(names))
  return dict(loss_share=float(loss), real_share=float(real),
              modality_share={n: round(float(c), 4) for n, c in zip(names, counts / counts.sum())})


def _rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def corpus_loader(directory: str, process_count: int, batch_size: int, steps: int) -> dict:
  """Process 0 of `process_count` on the corpus in `directory`: first batch time, tokens/s, memory."""
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
  config = data.default_config()
  config.corpus = directory
  before = _rss_mib()
  start = time.perf_counter()
  packer = data.Packer(config, split="train", seq_len=CORPUS_SEQ, process_index=0,
                       process_count=process_count)
  batch = packer.batch(0, 0, batch_size)
  first_batch_s = time.perf_counter() - start
  after_first = _rss_mib()
  start = time.perf_counter()
  for step in range(1, steps + 1):
    batch = packer.batch(0, step, batch_size)
  seconds = time.perf_counter() - start
  return dict(corpus=directory, processes=process_count,
              tokens_per_s=steps * batch_size * CORPUS_SEQ / seconds,
              first_batch_s=first_batch_s, loss_share=float(batch["loss_mask"].mean()),
              rss_before_mib=before, rss_after_first_batch_mib=after_first, rss_end_mib=_rss_mib(),
              peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def bench_corpora(directories: list[str]) -> None:
  results = []
  context = multiprocessing.get_context("spawn")  # a fresh process per setting: clean memory figures
  for directory in directories:
    with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as f:
      train = json.load(f)["splits"]["train"]
    for processes in CORPUS_PROCESSES:
      with context.Pool(1) as pool:
        row = pool.apply(corpus_loader, (directory, processes, _BATCH.value, _STEPS.value))
      row.update(corpus_tokens=train["tokens"], corpus_shards=len(train["shards"]))
      results.append(row)
      print(f"{directory} ({row['corpus_tokens'] / 1e9:.2f}B tokens, {row['corpus_shards']} shards) "
            f"{processes} process(es): {row['tokens_per_s'] / 1e6:.2f}M tokens/s per process, first batch "
            f"{row['first_batch_s'] * 1e3:.0f} ms, RSS {row['rss_before_mib']:.0f} -> "
            f"{row['rss_after_first_batch_mib']:.0f} -> {row['rss_end_mib']:.0f} MiB (peak "
            f"{row['peak_rss_mib']:.0f})")
  print(json.dumps(dict(seq_len=CORPUS_SEQ, batch_size=_BATCH.value, steps=_STEPS.value, results=results)))


def main(_):
  if _CORPUS.value:
    bench_corpora(_CORPUS.value)
    return
  results = {}
  with tempfile.TemporaryDirectory() as cache_dir:
    start = time.perf_counter()
    for name in data.EMBEDDED:
      data.prepare(name, cache_dir)
    results["first_build_s"] = time.perf_counter() - start
    old_packer = baseline_module(cache_dir, "pipeline").Packer  # renders with today's sources
    old_packer._patch_dim = lambda self: 0  # discrete form; it refused grey + RGB mixtures even there
    today = baseline_module(cache_dir, "pipeline", "pipeline_today")  # packer and sources of BASELINE
    today.sources_lib = baseline_module(cache_dir, "sources")
    old_config = baseline_module(cache_dir, "config").default_config()
    config = data.default_config()
    for c in (config, old_config):
      c.cache_dir = cache_dir
    settings = {"new": (data.Packer, config), "old_pack": (old_packer, config),
                "today": (today.Packer, old_config)}
    for seq_len in (256, 1024):
      packers = {name: packer(c, split="train", seq_len=seq_len) for name, (packer, c) in settings.items()}
      for packer in packers.values():
        packer.batch(0, 0, _BATCH.value)  # warm (embedded examples are read into memory on first use)
      times = {name: [] for name in packers}
      for step in range(1, _STEPS.value + 1):  # interleaved, so load changes hit all settings alike
        for name, packer in packers.items():
          start = time.perf_counter()
          packer.batch(0, step, _BATCH.value)
          times[name].append(time.perf_counter() - start)
      for name, packer in packers.items():
        row = dict(batches_per_s=1.0 / min(times[name]),  # fastest batch: robust to a shared, loaded CPU
                   **shares(packer, 10, _BATCH.value, settings[name][1].modalities))
        results[f"{name}_{seq_len}"] = row
        print(f"seq {seq_len:5d} {name:8s} {row['batches_per_s']:7.1f} batches/s  loss share "
              f"{row['loss_share']:.3f}  real {row['real_share']:.3f}  modalities {row['modality_share']}")
      for name in ("old_pack", "today"):
        results[f"speed_vs_{name}_{seq_len}"] = (results[f"new_{seq_len}"]["batches_per_s"] /
                                                 results[f"{name}_{seq_len}"]["batches_per_s"])
  print(f"first build {results['first_build_s']:.2f} s")
  print(json.dumps(dict(batch_size=_BATCH.value, baseline=BASELINE, **results)))


if __name__ == "__main__":
  cli.run(main)
