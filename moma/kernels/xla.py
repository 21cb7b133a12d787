"""Static-shape grouped matmul for XLA (the fast path on CPU).

Rows are already sorted into contiguous groups. For each group, a loop walks its rows in tiles from a
ladder of sizes (big tiles for the bulk, smaller ones for the remainder), so each tile is one dense
`[T, K] @ [K, N]` against that group's weight matrix, sliced once per group (no per-tile weight copies).
Trip counts are traced (`fori_loop` with traced bounds lowers to a while loop): the work is the real
rows plus less than the smallest tile per group, with no host sync and no padded copy of the rows.

A tile may run past its group's end (the last, ceil-divided tile) or be clamped to stay inside the M rows;
a row mask keeps exactly the rows of [tile start, group end), so each row is produced (and, in `tgmm`,
accumulated) once. Rows past sum(group_sizes) are never visited and stay zero. `tgmm` (the rhs gradient)
walks each group with bulk tiles and a single remainder window instead of the ladder.

Inside `jax.shard_map` the operands vary over manual mesh axes; a loop carry must have the same
varying-axes type (vma) in and out, so every zero-initialised carry starts as varying as its operands.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from moma.kernels.layout import group_bounds

# Tuned on a 2-core x86 CPU (experiments/bench_gmm.py). Bigger tiles run closer to dense matmul speed;
# smaller ones bound the waste per group (< the smallest tile). tgmm accumulates a [K, N] block per dot,
# so it uses big bulk tiles plus one remainder window (see tgmm).
GMM_TILES = (512, 128, 32)
TGMM_TILES = (1024, 64)  # (bulk tile, remainder window step)


def _zeros(shape, dtype, *operands):
  """Zeros as varying over manual mesh axes as the operands (under shard_map; plain zeros elsewhere).

  `zeros_like` types its result like its argument and a sum joins the types: this uses no API for the
  varying-axes type itself (jax renamed it between versions). Outside shard_map the zeros stay plain:
  under GSPMD `zeros_like` would also copy the operand's sharding, which deadlocked 8-device CPU runs.
  """
  zeros = jnp.zeros(shape, dtype)
  if not jax.sharding.get_abstract_mesh().manual_axes:
    return zeros
  return sum((jnp.zeros_like(x, dtype, shape=()) for x in operands), zeros)


def _for_each_tile(lo, hi, num_rows: int, tiles: Sequence[int], body: Callable, carry):
  """carry = body(start, mask_T, carry) over tiles covering rows [lo, hi) once each (traced lo, hi)."""
  tiles = [t for t in tiles if t <= num_rows] or [num_rows]
  pos = lo
  for i, t in enumerate(tiles):
    left = jnp.maximum(hi - pos, 0)
    count = (left + t - 1) // t if i == len(tiles) - 1 else left // t

    def step(j, carry, pos=pos, t=t):
      first = pos + j * t
      start = jnp.minimum(first, num_rows - t)  # dynamic_slice would clamp anyway: make it explicit
      rows_T = start + jnp.arange(t, dtype=jnp.int32)
      return body(start, (rows_T >= first) & (rows_T < hi), carry)

    carry = lax.fori_loop(0, count, step, carry)
    pos = pos + count * t
  return carry


def gmm(lhs_MK, rhs_GKN, group_sizes_G, out_dtype, *, transpose_rhs=False, tiles=GMM_TILES):
  """out[i] = lhs[i] @ rhs[group(i)] (rhs[g]ᵀ when transpose_rhs: rhs is then [G, N, K])."""
  num_rows = lhs_MK.shape[0]
  n = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
  starts_G, ends_G = group_bounds(group_sizes_G, num_rows)
  contract = ((1,), (1,) if transpose_rhs else (0,))

  def group(g, out_MN):
    w = lax.dynamic_index_in_dim(rhs_GKN, g, keepdims=False)

    def tile(start, mask_T, out_MN):
      t = mask_T.shape[0]
      x_TK = lax.dynamic_slice_in_dim(lhs_MK, start, t)
      y_TN = lax.dot_general(x_TK, w, (contract, ((), ())), preferred_element_type=out_dtype)
      y_TN = jnp.where(mask_T[:, None], y_TN, lax.dynamic_slice_in_dim(out_MN, start, t))
      return lax.dynamic_update_slice_in_dim(out_MN, y_TN.astype(out_dtype), start, 0)

    return _for_each_tile(starts_G[g], ends_G[g], num_rows, tiles, tile, out_MN)

  out_MN = _zeros((num_rows, n), out_dtype, lhs_MK, rhs_GKN, group_sizes_G)
  return lax.fori_loop(0, rhs_GKN.shape[0], group, out_MN)


def _window(x, start, t, lo, hi):
  """Rows [start, start + t) of x with rows outside [lo, hi) zeroed (start clamped inside x)."""
  start = jnp.minimum(start, x.shape[0] - t)
  rows_T = start + jnp.arange(t, dtype=jnp.int32)
  return jnp.where(((rows_T >= lo) & (rows_T < hi))[:, None], lax.dynamic_slice_in_dim(x, start, t), 0)


def tgmm(lhs_MK, dout_MN, group_sizes_G, out_dtype, *, tiles=TGMM_TILES):
  """out[g] = lhs[rows of g]ᵀ @ dout[rows of g] → [G, K, N], accumulated in float32.

  Each [K, N] accumulation costs a full pass over the block, so a group takes as few dots as possible:
  a loop of bulk tiles (tiles[0] rows), then one dot over a window that is the remainder rounded up to a
  multiple of tiles[1], picked by `lax.switch` (branches return only the [K, N] block, no big carry).
  """
  num_rows, k = lhs_MK.shape
  n = dout_MN.shape[1]
  bulk, step = min(tiles[0], num_rows), min(tiles[1], num_rows)
  windows = sorted({min(w, num_rows) for w in range(step, bulk + step, step)})
  starts_G, ends_G = group_bounds(group_sizes_G, num_rows)
  acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
  contract_rows = (((0,), (0,)), ((), ()))
  operands = (lhs_MK, dout_MN, group_sizes_G)

  def group(g, out_GKN):
    lo, hi = starts_G[g], ends_G[g]

    def bulk_tile(j, acc_KN):
      start = lo + j * bulk
      x_TK = lax.dynamic_slice_in_dim(lhs_MK, start, bulk)
      dy_TN = lax.dynamic_slice_in_dim(dout_MN, start, bulk)
      return acc_KN + lax.dot_general(x_TK, dy_TN, contract_rows, preferred_element_type=acc_dtype)

    acc_KN = lax.fori_loop(0, (hi - lo) // bulk, bulk_tile, _zeros((k, n), acc_dtype, *operands))
    first = lo + (hi - lo) // bulk * bulk

    def remainder(t):
      return lambda: lax.dot_general(_window(lhs_MK, first, t, first, hi),
                                     _window(dout_MN, first, t, first, hi), contract_rows,
                                     preferred_element_type=acc_dtype)

    branches = [lambda: _zeros((k, n), acc_dtype, *operands)] + [remainder(t) for t in windows]
    which = jnp.searchsorted(jnp.asarray(windows, jnp.int32), hi - first) + (hi > first)
    acc_KN = acc_KN + lax.switch(jnp.minimum(which, len(windows)), branches)
    return lax.dynamic_update_index_in_dim(out_GKN, acc_KN.astype(out_dtype), g, 0)

  num_groups = group_sizes_G.shape[0]
  return lax.fori_loop(0, num_groups, group, _zeros((num_groups, k, n), out_dtype, *operands))
