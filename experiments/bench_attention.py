"""Attention impls (`model.attention_impl`): train-step memory, fwd+bwd time, and MoD whole-model time.

* memory: `compiled.memory_analysis()` temp bytes of a whole train step (value_and_grad of the LM loss;
  d_model 256, 4 heads, 2 layers, batch 1) per impl and length: blockwise should be ≤ 1/4 of xla at 4096
  and grow ≤ 2.3× from 2048 to 4096 (linear, not quadratic);
* time: attention alone, fwd+bwd (batch 1, 4 heads of 64, the longest length), on one causal document
  and on packed 512-token documents, plus the whole train step, xla vs blockwise (interleaved; process
  CPU time, min over repeats, as in `bench_layers`);
* crossover: attention alone on short rows (8 × 128 … 2 × 1024), where xla's mask is cheap;
* mod: the whole MoD model (capacity 0.25, every other layer; `bench_layers`' text + image batch
  8 × 512) and dense, step time and time per training FLOP (`moma.flops`). Run this script on a tree
  without `attention_impl` (MoD's old banded attention) for the baseline: it then times the default path.

  python -m experiments.bench_attention [--parts memory,time,crossover,mod] [--lengths 2048,4096]
      [--repeats 3]
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_layers
from moma import cli
from moma import flops
from moma.layers import attention
from moma.models.model_config import ModelConfig

IMPLS = ("xla", "blockwise")
HAS_IMPLS = "attention_impl" in ModelConfig.__dataclass_fields__


def lm_args(seq_len, batch_size=1, **kw):
  return argparse.Namespace(**{**dict(d_model=256, d_ff=1024, num_heads=4, vocab_size=512, num_layers=2,
                                      batch_size=batch_size, seq_len=seq_len), **kw})


def packed_batch(args, doc_len):
  """Documents of `doc_len` tokens (one modality): segment ids count up along each row."""
  batch = bench_layers.batch_from(args, np.zeros((args.batch_size, args.seq_len), np.int32))
  idx = jnp.arange(args.seq_len, dtype=jnp.int32)
  shape = batch["tokens"].shape
  return dict(batch, segment=jnp.broadcast_to(idx // doc_len + 1, shape),
              position=jnp.broadcast_to(idx % doc_len, shape))


def memory(lengths, result):
  for length in lengths:
    args = lm_args(length)
    batch = packed_batch(args, 1024)
    for impl in IMPLS:
      step, step_args = bench_layers.model_step(
          bench_layers.model_config(args, 1, args.num_layers, attention_impl=impl), batch)
      temp = step.lower(*step_args).compile().memory_analysis().temp_size_in_bytes
      result[f"temp_MiB_{impl}_L{length}"] = round(temp / 2 ** 20, 1)
      print(f"train step L={length:5d} {impl:9s} temp {temp / 2 ** 20:8.1f} MiB", flush=True)
  small, large = lengths[0], lengths[-1]
  result["temp_blockwise_over_xla"] = round(result[f"temp_MiB_blockwise_L{large}"]
                                            / result[f"temp_MiB_xla_L{large}"], 3)
  for impl in IMPLS:
    result[f"temp_growth_{impl}"] = round(result[f"temp_MiB_{impl}_L{large}"]
                                          / result[f"temp_MiB_{impl}_L{small}"], 2)


def attention_step(impl, segment_BL, heads=4, dim=64):
  keys = jax.random.split(jax.random.key(0), 3)
  qkv = [jax.random.normal(k, (*segment_BL.shape, heads, dim)) for k in keys]
  loss = lambda q, k, v: jnp.sum(attention.attend(q, k, v, segment_BL, impl=impl) ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), qkv


def timing(length, repeats, result):
  idx = jnp.arange(length, dtype=jnp.int32)[None]
  rows = {"one_document": jnp.ones_like(idx), "packed_512": idx // 512 + 1}
  args = lm_args(length)
  calls = {f"{row}_{impl}": attention_step(impl, segment) for row, segment in rows.items() for impl in IMPLS}
  for impl in IMPLS:
    calls[f"train_step_{impl}"] = bench_layers.model_step(
        bench_layers.model_config(args, 1, args.num_layers, attention_impl=impl), packed_batch(args, 1024))
  times = bench_layers.best_times(calls, repeats)
  for row in (*rows, "train_step"):
    (xla, xla_wall), (blockwise, blockwise_wall) = times[f"{row}_xla"], times[f"{row}_blockwise"]
    result[f"{row}_ms_xla"], result[f"{row}_ms_blockwise"] = round(xla * 1e3, 1), round(blockwise * 1e3, 1)
    result[f"{row}_blockwise_over_xla"] = round(blockwise / xla, 3)
    print(f"L={length} {row:13s} fwd+bwd CPU time xla {xla * 1e3:8.1f} ms, blockwise "
          f"{blockwise * 1e3:8.1f} ms, ratio {blockwise / xla:.3f} "
          f"(wall ratio {blockwise_wall / xla_wall:.3f})", flush=True)


def crossover(repeats, result):
  """Short rows, where the dense mask is cheap: where does blockwise stop winning (for `auto`)?"""
  for batch, length in ((8, 128), (8, 256), (4, 512), (2, 1024)):
    segment = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) * 3 // length + 1, (batch, length))
    times = bench_layers.best_times({impl: attention_step(impl, segment) for impl in IMPLS}, repeats)
    ratio = times["blockwise"][0] / times["xla"][0]
    result[f"B{batch}_L{length}_blockwise_over_xla"] = round(ratio, 3)
    print(f"{batch} × {length} (3 documents a row) fwd+bwd: xla {times['xla'][0] * 1e3:7.1f} ms, blockwise "
          f"{times['blockwise'][0] * 1e3:7.1f} ms, ratio {ratio:.3f}", flush=True)


def mod(repeats, result):
  args = lm_args(512, batch_size=8)
  batch = bench_layers.interleaved_batch(args)
  cfgs = {"dense": bench_layers.model_config(args, 2, args.num_layers),
          "mod25": bench_layers.model_config(args, 2, args.num_layers,
                                             mod=dict(enabled=True, capacity=0.25, every=2))}
  times = bench_layers.best_times({k: bench_layers.model_step(c, batch) for k, c in cfgs.items()}, repeats)
  tokens = args.batch_size * args.seq_len
  for name, cfg in cfgs.items():
    gflop = flops.per_token(cfg, args.seq_len)["total"] * tokens / 1e9
    cpu = times[name][0]
    result[f"model_{name}_ms"], result[f"model_{name}_ms_per_gflop"] = round(cpu * 1e3, 1), round(
        cpu * 1e3 / gflop, 2)
    tree = "attention_impl=auto" if HAS_IMPLS else "tree before attention_impl: xla, MoD banded"
    print(f"whole model {name:6s} ({tree}): "
          f"CPU time {cpu * 1e3:8.1f} ms, {cpu * 1e3 / gflop:6.2f} ms per training GFLOP", flush=True)


def main():
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="memory,time,crossover,mod")
  parser.add_argument("--lengths", default="2048,4096")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  parts, lengths = args.parts.split(","), [int(n) for n in args.lengths.split(",")]
  result = {"backend": jax.default_backend(), "impls": HAS_IMPLS}
  start = time.perf_counter()
  if "memory" in parts:
    memory(lengths, result)
  if "time" in parts:
    timing(lengths[-1], args.repeats, result)
  if "crossover" in parts:
    crossover(args.repeats, result)
  if "mod" in parts:
    mod(args.repeats, result)
  result["seconds"] = round(time.perf_counter() - start, 1)
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run_argparse(main)
