"""Pallas TPU (Mosaic) grouped matmul in the megablox style.

The rows are cut into tiles of tm; a *work item* is one (row tile, group) pair where the group has rows in
the tile. Items are listed in row order (static maximum: row tiles + G - 1, so the grid is static and
interpret mode works); the list, each group's row range and the live item count are scalar-prefetched so
the BlockSpec index maps fetch the right lhs tile and group weights for each grid step.

gmm grid (N tiles, items, K tiles): a float32 VMEM accumulator per item; at the last K step the item's
rows are merged into the output tile, which stays resident while consecutive items share the row tile.
tgmm grid (K tiles, N tiles, items): consecutive items of one group accumulate masked lhsᵀ·dout into the
group's [tk, tn] output block. Grid steps past the live count repeat the last item's block indices (no
DMA) and skip compute. Rows past sum(group_sizes) and empty groups are never visited: zeroed outside.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moma.kernels import layout

TM, TK, TN = 128, 256, 256


def work_items(group_sizes_G, num_rows: int, tm: int):
  """(starts_G, ends_G, item_group_I, item_tile_I, num_items_1) with I = cdiv(num_rows, tm) + G - 1."""
  starts_G, ends_G = layout.group_bounds(group_sizes_G, num_rows)
  first_G = starts_G // tm
  counts_G = jnp.where(ends_G > starts_G, (ends_G - 1) // tm - first_G + 1, 0)
  cum_G = jnp.cumsum(counts_G)
  num_items = cum_G[-1]
  max_items = pl.cdiv(num_rows, tm) + group_sizes_G.shape[0] - 1
  item_I = jnp.minimum(jnp.arange(max_items, dtype=jnp.int32), jnp.maximum(num_items - 1, 0))
  group_I = jnp.minimum(layout.bucket(item_I, cum_G), group_sizes_G.shape[0] - 1)
  tile_I = first_G[group_I] + item_I - (cum_G - counts_G)[group_I]
  return (starts_G, ends_G, group_I, tile_I.astype(jnp.int32),
          num_items.reshape(1).astype(jnp.int32))


def _item_rows_mask(i, starts_ref, ends_ref, group_ref, tile_ref, tm):
  g = group_ref[i]
  rows = tile_ref[i] * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
  return (rows >= starts_ref[g]) & (rows < ends_ref[g])


def _gmm_kernel(starts_ref, ends_ref, group_ref, tile_ref, num_ref, lhs_ref, rhs_ref, out_ref, acc_ref,
                *, tm, transpose_rhs):
  i, kk = pl.program_id(1), pl.program_id(2)
  live = i < num_ref[0]

  @pl.when(kk == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(live)
  def _():
    contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))
    acc_ref[...] += lax.dot_general(lhs_ref[...], rhs_ref[...], (contract, ((), ())),
                                    preferred_element_type=jnp.float32)

  @pl.when(live & (kk == pl.num_programs(2) - 1))
  def _():
    mask = _item_rows_mask(i, starts_ref, ends_ref, group_ref, tile_ref, tm)
    fresh = (i == 0) | (tile_ref[jnp.maximum(i - 1, 0)] != tile_ref[i])  # first item of this row tile
    base = jnp.where(fresh, jnp.zeros_like(acc_ref), out_ref[...].astype(jnp.float32))
    out_ref[...] = jnp.where(mask, acc_ref[...], base).astype(out_ref.dtype)


def gmm(lhs_MK, rhs_GKN, group_sizes_G, out_dtype, *, transpose_rhs=False, interpret=False):
  """out[i] = lhs[i] @ rhs[group(i)] (rhs[g]ᵀ when transpose_rhs: rhs is then [G, N, K])."""
  m, k = lhs_MK.shape
  n = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
  tm, tk, tn = layout.tile(m, TM), layout.tile(k, TK), layout.tile(n, TN)
  lhs = layout.pad_axis(layout.pad_axis(lhs_MK, 0, tm), 1, tk)
  rhs = layout.pad_axis(rhs_GKN, 2 if transpose_rhs else 1, tk)
  rhs = layout.pad_axis(rhs, 1 if transpose_rhs else 2, tn)
  mp, kp = lhs.shape
  np_ = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  meta = work_items(group_sizes_G, m, tm)
  if transpose_rhs:
    rhs_spec = pl.BlockSpec((None, tn, tk), lambda j, i, kk, s, e, g, t, c: (g[i], j, kk))
  else:
    rhs_spec = pl.BlockSpec((None, tk, tn), lambda j, i, kk, s, e, g, t, c: (g[i], kk, j))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(meta),
      grid=(np_ // tn, meta[2].shape[0], kp // tk),
      in_specs=[pl.BlockSpec((tm, tk), lambda j, i, kk, s, e, g, t, c: (t[i], kk)), rhs_spec],
      out_specs=pl.BlockSpec((tm, tn), lambda j, i, kk, s, e, g, t, c: (t[i], j)),
      scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
  )
  out = pl.pallas_call(
      functools.partial(_gmm_kernel, tm=tm, transpose_rhs=transpose_rhs),
      grid_spec=grid_spec,
      out_shape=layout.out_struct((mp, np_), out_dtype, lhs),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
  )(*meta, lhs, rhs)
  rows_M = jnp.arange(m, dtype=jnp.int32)[:, None]
  return jnp.where(rows_M < meta[1][-1], out[:m, :n], 0)  # rows past sum(group_sizes), unvisited tiles


def _tgmm_kernel(starts_ref, ends_ref, group_ref, tile_ref, num_ref, lhs_ref, dout_ref, out_ref, acc_ref,
                 *, tm):
  i, last = pl.program_id(2), num_ref[0] - 1
  g = group_ref[i]

  @pl.when((i == 0) | (group_ref[jnp.maximum(i - 1, 0)] != g))
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(i <= last)
  def _():
    mask = _item_rows_mask(i, starts_ref, ends_ref, group_ref, tile_ref, tm)
    x_TK = jnp.where(mask, lhs_ref[...], 0)
    acc_ref[...] += lax.dot_general(x_TK, dout_ref[...], (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)

  @pl.when((i == last) | ((i < last) & (group_ref[jnp.minimum(i + 1, last)] != g)))
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs_MK, dout_MN, group_sizes_G, out_dtype, *, interpret=False):
  """out[g] = lhs[rows of g]ᵀ @ dout[rows of g] → [G, K, N], accumulated in float32."""
  (m, k), n = lhs_MK.shape, dout_MN.shape[1]
  tm, tk, tn = layout.tile(m, TM), layout.tile(k, TK), layout.tile(n, TN)
  lhs = layout.pad_axis(layout.pad_axis(lhs_MK, 0, tm), 1, tk)
  dout = layout.pad_axis(layout.pad_axis(dout_MN, 0, tm), 1, tn)
  meta = work_items(group_sizes_G, m, tm)
  num_groups = group_sizes_G.shape[0]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(meta),
      grid=(lhs.shape[1] // tk, dout.shape[1] // tn, meta[2].shape[0]),
      in_specs=[pl.BlockSpec((tm, tk), lambda kk, j, i, s, e, g, t, c: (t[i], kk)),
                pl.BlockSpec((tm, tn), lambda kk, j, i, s, e, g, t, c: (t[i], j))],
      out_specs=pl.BlockSpec((None, tk, tn), lambda kk, j, i, s, e, g, t, c: (g[i], kk, j)),
      scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
  )
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm),
      grid_spec=grid_spec,
      out_shape=layout.out_struct((num_groups, lhs.shape[1], dout.shape[1]), out_dtype, lhs),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(*meta, lhs, dout)
  nonempty_G = (meta[1] > meta[0])[:, None, None]
  return jnp.where(nonempty_G, out[:, :k, :n], 0)  # empty groups are never visited
