"""Grouped matmul speed against a dense matmul of the same FLOPs, forward and forward+backward.

  python -m experiments.bench_gmm                 # the issue's grid: G ∈ {2,3,8,16}, M ∈ {4096,16384}
  python -m experiments.bench_gmm --grid=quick    # G ∈ {3,16}, M=4096, K=512 (a few minutes on 2 cores)

Two baselines share every round with the impls (interleaved, median over rounds, so the ratios hold on a
noisy shared machine):
  dense    one [M, K] @ [K, N] matmul of the same FLOPs: speed = t_dense / t_impl (1.0 = dense speed);
  batched  the same G weights with the M rows split into equal groups, one batched matmul (einsum): what
           XLA itself does with a [G, K, N] weight and no raggedness. With many small groups the G×
           larger weight (and, backward, its G× larger gradient) costs memory traffic a dense matmul
           never pays; speed_vs_batched separates that cost from the impl's own overhead.
The xla/ragged_dot ratio is t_ragged_dot / t_xla; `dense_gflops` is the dense matmul's FLOP/s, the figure
to give `--config.train.peak_flops` on a machine without a data-sheet peak (CPU). The last stdout line is a
JSON object with every ratio.
"""

import json
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from moma import cli
from moma import kernels

_GRID = flags.DEFINE_enum("grid", "issue", ["issue", "quick"], "Problem sizes to run.")
_IMPLS = flags.DEFINE_list("impls", ["xla", "ragged_dot", "reference"], "gmm impls to time.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timing rounds (median).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Operand dtype.")
_N = flags.DEFINE_integer("n", 2048, "Output features N.")
_ROWS = flags.DEFINE_list("m", [], "Keep only these M values of the grid (e.g. --m=4096); empty: all.")

GRIDS = {
    "issue": [(g, m, k) for m in (4096, 16384) for k in (512, 1024) for g in (2, 3, 8, 16)],
    "quick": [(3, 4096, 512), (16, 4096, 512)],
}


def _loss_fns(impl, group_sizes):
  """Forward and forward+backward of (x, w, cotangent) for an impl or a baseline (module docstring)."""

  def forward(x, w, ct):
    if impl == "dense":
      return jnp.dot(x, w, preferred_element_type=ct.dtype)
    if impl == "batched":  # x: [G, M/G, K], w: [G, K, N]
      return jnp.einsum("gmk,gkn->gmn", x, w, preferred_element_type=ct.dtype)
    return kernels.gmm(x, w, group_sizes, impl=impl, preferred_element_type=ct.dtype)

  def fwd_bwd(x, w, ct):
    out, vjp = jax.vjp(lambda x, w: forward(x, w, ct), x, w)
    return out, vjp(ct)

  return jax.jit(forward), jax.jit(fwd_bwd)


def _time_round(calls):
  """One timed call per fn, each right after an untimed one: the timed call finds the allocator warm
  instead of paying for page faults after the previous fn (the masked reference frees G·M·N floats)."""
  times = {}
  for name, (fn, args) in calls.items():
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times[name] = time.perf_counter() - start
  return times


def bench(num_groups, m, k, n, dtype, impls, rounds):
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (m, k), dtype)
  w = jax.random.normal(keys[1], (num_groups, k, n), dtype) / np.sqrt(k)
  ct = jax.random.normal(keys[2], (m, n), jnp.float32)
  sizes = np.random.default_rng(num_groups).multinomial(m, np.ones(num_groups) / num_groups)
  group_sizes = jnp.asarray(sizes, jnp.int32)
  # batched: rows split into equal groups (M a multiple of G: M // G rows each, timings scaled to M rows).
  rows = m // num_groups
  batched_args = (x[:rows * num_groups].reshape(num_groups, rows, k), w,
                  ct[:rows * num_groups].reshape(num_groups, rows, n))
  results = {}
  for mode in ("fwd", "fwd_bwd"):
    # The dense baseline gets its own [K, N] weight: no [G, K, N] gradient to fill.
    args = {"dense": (x, w[0], ct), "batched": batched_args}
    calls = {name: (_loss_fns(name, group_sizes)[mode == "fwd_bwd"], args.get(name, (x, w, ct)))
             for name in ["dense", "batched", *impls]}
    _time_round(calls)  # compile + warm up
    rounds_ = [_time_round(calls) for _ in range(rounds)]
    median = {name: float(np.median([r[name] for r in rounds_])) for name in calls}
    median["batched"] *= m / (rows * num_groups)
    results[f"{mode}/batched/speed_vs_dense"] = median["dense"] / median["batched"]
    for name in impls:
      results[f"{mode}/{name}/speed_vs_dense"] = median["dense"] / median[name]
      results[f"{mode}/{name}/speed_vs_batched"] = median["batched"] / median[name]
    if "xla" in impls and "ragged_dot" in impls:
      results[f"{mode}/xla_vs_ragged_dot"] = median["ragged_dot"] / median["xla"]
    results[f"{mode}/dense_ms"] = 1e3 * median["dense"]
    # The dense matmul's FLOP/s (fwd: 2MKN; fwd+bwd: 3×): a measured peak for --config.train.peak_flops.
    results[f"{mode}/dense_gflops"] = (2 if mode == "fwd" else 6) * m * k * n / median["dense"] / 1e9
  return results


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  summary = {"backend": jax.default_backend(), "dtype": dtype.name, "n": _N.value, "results": {}}
  for num_groups, m, k in GRIDS[_GRID.value]:
    if _ROWS.value and str(m) not in _ROWS.value:
      continue
    res = bench(num_groups, m, k, _N.value, dtype, _IMPLS.value, _ROUNDS.value)
    name = f"G{num_groups}_M{m}_K{k}"
    summary["results"][name] = {key: round(v, 3) for key, v in res.items()}
    print(name, " ".join(f"{key}={v:.3f}" for key, v in res.items()), flush=True)
  print(json.dumps(summary))


if __name__ == "__main__":
  cli.run(main)
