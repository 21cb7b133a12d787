"""Static-shape grouped matmul for XLA (the fast path on CPU).

Rows are already sorted into contiguous groups. Each group is walked in as few dots as possible: a loop
of bulk tiles, then one window just covering the remainder (`_for_each_window`), so each dot is one
dense `[T, K] @ [K, N]` against that group's weight matrix, sliced once per group. On XLA:CPU every dot
pays a fixed cost (packing its [K, N] operand), so one right-sized window beats a ladder of small tiles:
at G=16, M=4096 the forward went from 0.72 to 0.79 of dense speed (BENCHMARKS.md).

The remainder window is picked by a set of loops, one per window size, of which exactly one runs once:
a loop keeps the big output carry in place where `lax.switch` would copy it, and the loop index is the
window's start, so XLA cannot hoist the dot out of the loop (which would run every window size). The
window ends at the group's end (its start clamped inside the M rows) and a row mask keeps exactly the rows
of [bulk end, group end), so each row is produced (and, in `tgmm`, accumulated) once. Trip counts are
traced: no host sync, no padded copy of the rows. Rows past sum(group_sizes) are never visited (zero).

Inside `jax.shard_map` the operands vary over manual mesh axes; a loop carry must have the same
varying-axes type (vma) in and out, so every zero-initialised carry starts as varying as its operands
(`layout.varying_zeros`).
"""

from typing import Callable

import jax.numpy as jnp
from jax import lax

from moma.kernels.layout import group_bounds, varying_zeros

# Tuned on a 2-core x86 CPU (experiments/bench_gmm.py): big bulk tiles run at dense matmul speed. Windows
# are multiples of WINDOW_STEP up to half the bulk, then of twice that: fewer than 64 wasted rows when a
# group's remainder is ≤ 512 rows, fewer than 128 (< 1/4 of it) above, and 12 window sizes to compile
# (each adds ~40 ms per call site).
BULK_ROWS = 1024
WINDOW_STEP = 64


def _for_each_window(lo, hi, num_rows: int, body: Callable, carry, *, bulk=BULK_ROWS, step=WINDOW_STEP):
  """carry = body(start, t, mask_T, carry) over t-row windows covering rows [lo, hi) once each.

  lo and hi are traced. mask_T is None for bulk tiles (every row inside the group); for the last window
  it marks the rows of [bulk end, hi), the rows this window adds.
  """
  # Every tile is shorter than the M rows: a num_rows-row slice is the whole lhs, loop-invariant, and XLA
  # hoists its dot out of the (usually zero-trip) loop, so it would run for every group (at M=1024, G=2
  # the forward took 2.6x as long).
  bulk = min(bulk, max(1, num_rows // 2))
  step = min(step, bulk)
  sizes = [*range(step, bulk // 2 + 1, step), *range(bulk // 2 + 2 * step, bulk + 2 * step, 2 * step)]
  windows = sorted({min(t, bulk) for t in sizes} | {bulk})

  def bulk_tile(j, carry):
    return body(lo + j * bulk, bulk, None, carry)

  carry = lax.fori_loop(0, (hi - lo) // bulk, bulk_tile, carry)
  first = lo + (hi - lo) // bulk * bulk
  # The smallest window ≥ the rest (a count, not jnp.searchsorted, which fails on varying values under a
  # partly manual shard_map in jax 0.10).
  chosen = jnp.sum(jnp.asarray(windows, jnp.int32) < hi - first)
  for i, t in enumerate(windows):

    def window(start, carry, t=t):
      rows_T = start + jnp.arange(t, dtype=jnp.int32)
      return body(start, t, (rows_T >= first) & (rows_T < hi), carry)

    start = jnp.clip(hi - t, 0, num_rows - t)
    runs = ((chosen == i) & (hi > first)).astype(jnp.int32)
    carry = lax.fori_loop(start, start + runs, window, carry)
  return carry


def gmm(lhs_MK, rhs_GKN, group_sizes_G, out_dtype, *, transpose_rhs=False, bulk=BULK_ROWS,
        step=WINDOW_STEP):
  """out[i] = lhs[i] @ rhs[group(i)] (rhs[g]ᵀ when transpose_rhs: rhs is then [G, N, K])."""
  num_rows = lhs_MK.shape[0]
  n = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
  starts_G, ends_G = group_bounds(group_sizes_G, num_rows)
  contract = ((1,), (1,) if transpose_rhs else (0,))

  def group(g, out_MN):
    w = lax.dynamic_index_in_dim(rhs_GKN, g, keepdims=False)

    def tile(start, t, mask_T, out_MN):
      x_TK = lax.dynamic_slice_in_dim(lhs_MK, start, t)
      y_TN = lax.dot_general(x_TK, w, (contract, ((), ())), preferred_element_type=out_dtype)
      if mask_T is not None:
        y_TN = jnp.where(mask_T[:, None], y_TN, lax.dynamic_slice_in_dim(out_MN, start, t))
      return lax.dynamic_update_slice_in_dim(out_MN, y_TN.astype(out_dtype), start, 0)

    return _for_each_window(starts_G[g], ends_G[g], num_rows, tile, out_MN, bulk=bulk, step=step)

  out_MN = varying_zeros((num_rows, n), out_dtype, lhs_MK, rhs_GKN, group_sizes_G)
  return lax.fori_loop(0, rhs_GKN.shape[0], group, out_MN)


def tgmm(lhs_MK, dout_MN, group_sizes_G, out_dtype, *, bulk=BULK_ROWS, step=WINDOW_STEP):
  """out[g] = lhs[rows of g]ᵀ @ dout[rows of g] → [G, K, N], accumulated in float32."""
  num_rows, k = lhs_MK.shape
  n = dout_MN.shape[1]
  starts_G, ends_G = group_bounds(group_sizes_G, num_rows)
  acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
  contract_rows = (((0,), (0,)), ((), ()))
  operands = (lhs_MK, dout_MN, group_sizes_G)

  def tile(start, t, mask_T, acc_KN):
    x_TK = lax.dynamic_slice_in_dim(lhs_MK, start, t)
    dy_TN = lax.dynamic_slice_in_dim(dout_MN, start, t)
    if mask_T is not None:  # both operands: a non-finite row of another group must not leak in
      x_TK = jnp.where(mask_T[:, None], x_TK, 0)
      dy_TN = jnp.where(mask_T[:, None], dy_TN, 0)
    return acc_KN + lax.dot_general(x_TK, dy_TN, contract_rows, preferred_element_type=acc_dtype)

  def group(g, out_GKN):
    zeros_KN = varying_zeros((k, n), acc_dtype, *operands)
    acc_KN = _for_each_window(starts_G[g], ends_G[g], num_rows, tile, zeros_KN, bulk=bulk, step=step)
    return lax.dynamic_update_index_in_dim(out_GKN, acc_KN.astype(out_dtype), g, 0)

  num_groups = group_sizes_G.shape[0]
  return lax.fori_loop(0, num_groups, group, varying_zeros((num_groups, k, n), out_dtype, *operands))
