"""Pallas GPU grouped matmul (Triton backend), output-stationary.

Why Triton and not Mosaic GPU: Mosaic GPU kernels are written with Hopper/Blackwell-specific primitives
(TMA, WGMMA) that only run on sm90+, whose API still moves between the jax versions we support, and that
interpret mode cannot emulate, so they could not be tested here. The Triton backend runs on Ampere and
newer, uses only generic Pallas ops (this file runs unchanged under interpret=True on CPU), and is
deprecated, not removed, in jax 0.11. A Mosaic GPU variant for Hopper peak throughput is the follow-up.

gmm: one program per output tile [tm, tn]; it loops over the groups that intersect its rows (known from
per-tile group ranges computed outside), runs the K loop for each and keeps that group's rows. Every output
tile is written exactly once, rows past sum(group_sizes) are written as zeros.
tgmm: one program per (group, K tile, N tile) output block; it loops over the row tiles of its group and
accumulates masked lhsᵀ·dout in float32. Empty groups give zero blocks.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from moma.kernels import layout

# Triton, named: without compiler params this jax lowers a pallas_call for GPU through Mosaic GPU, which
# these kernels (whole arrays sliced inside the kernel) do not fit (shared memory).
_TRITON = pl_triton.CompilerParams(num_warps=4, num_stages=3)

TM, TK, TN = 64, 64, 128  # gmm tiles (rows, contraction, columns); tl.dot needs ≥ 16 on each


def _dot(x, w, contract):
  return lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=jnp.float32)


def _gmm_kernel(starts_ref, ends_ref, first_ref, last_ref, lhs_ref, rhs_ref, out_ref, *,
                tm, tk, tn, num_k, transpose_rhs):
  i, j = pl.program_id(0), pl.program_id(1)
  rows_T = i * tm + jnp.arange(tm, dtype=jnp.int32)

  def one_group(g, acc_TN):
    def k_step(kk, y_TN):
      x_TK = lhs_ref[pl.ds(i * tm, tm), pl.ds(kk * tk, tk)]
      if transpose_rhs:
        return y_TN + _dot(x_TK, rhs_ref[g, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)], ((1,), (1,)))
      return y_TN + _dot(x_TK, rhs_ref[g, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)], ((1,), (0,)))

    y_TN = lax.fori_loop(0, num_k, k_step, jnp.zeros((tm, tn), jnp.float32))
    in_group_T = (rows_T >= starts_ref[g]) & (rows_T < ends_ref[g])
    return jnp.where(in_group_T[:, None], y_TN, acc_TN)

  def group(g, acc_TN):  # empty groups inside the range cost nothing
    return lax.cond(ends_ref[g] > starts_ref[g], one_group, lambda g, acc: acc, g, acc_TN)

  acc_TN = lax.fori_loop(first_ref[i], last_ref[i], group, jnp.zeros((tm, tn), jnp.float32))
  out_ref[...] = acc_TN.astype(out_ref.dtype)


def gmm(lhs_MK, rhs_GKN, group_sizes_G, out_dtype, *, transpose_rhs=False, interpret=False):
  """out[i] = lhs[i] @ rhs[group(i)] (rhs[g]ᵀ when transpose_rhs: rhs is then [G, N, K])."""
  m, k = lhs_MK.shape
  n = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
  tm, tk, tn = layout.tile(m, TM, 16), layout.tile(k, TK, 16), layout.tile(n, TN, 16)
  lhs = layout.pad_axis(layout.pad_axis(lhs_MK, 0, tm), 1, tk)
  rhs = layout.pad_axis(rhs_GKN, 2 if transpose_rhs else 1, tk)
  rhs = layout.pad_axis(rhs, 1 if transpose_rhs else 2, tn)
  mp, kp = lhs.shape
  np_ = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  starts_G, ends_G = layout.group_bounds(group_sizes_G, m)
  # Groups intersecting row tile i: those with end > first row and start ≤ last row.
  tile_rows = jnp.arange(0, mp, tm, dtype=jnp.int32)
  first_tile = layout.bucket(tile_rows, ends_G)
  last_tile = layout.bucket(tile_rows + tm - 1, starts_G)
  kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, tn=tn, num_k=kp // tk,
                             transpose_rhs=transpose_rhs)
  out = pl.pallas_call(  # inputs without BlockSpecs: whole arrays, sliced inside the kernel
      kernel,
      grid=(mp // tm, np_ // tn),
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
      out_shape=layout.out_struct((mp, np_), out_dtype, lhs),
      compiler_params=_TRITON,
      interpret=interpret,
  )(starts_G, ends_G, first_tile, last_tile, lhs, rhs)
  return out[:m, :n]


TGMM_TM, TGMM_TK, TGMM_TN = 64, 64, 64


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, dout_ref, out_ref, *, tm, tk, tn):
  g, kb, nb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = starts_ref[g], ends_ref[g]

  def row_tile(r, acc_KN):
    rows_T = r * tm + jnp.arange(tm, dtype=jnp.int32)
    x_TK = lhs_ref[pl.ds(r * tm, tm), pl.ds(kb * tk, tk)]
    x_TK = jnp.where(((rows_T >= start) & (rows_T < end))[:, None], x_TK, 0)
    return acc_KN + _dot(x_TK, dout_ref[pl.ds(r * tm, tm), pl.ds(nb * tn, tn)], ((0,), (0,)))

  acc_KN = lax.fori_loop(start // tm, (end + tm - 1) // tm, row_tile, jnp.zeros((tk, tn), jnp.float32))
  out_ref[...] = acc_KN.astype(out_ref.dtype)


def tgmm(lhs_MK, dout_MN, group_sizes_G, out_dtype, *, interpret=False):
  """out[g] = lhs[rows of g]ᵀ @ dout[rows of g] → [G, K, N], accumulated in float32."""
  (m, k), n = lhs_MK.shape, dout_MN.shape[1]
  tm, tk, tn = layout.tile(m, TGMM_TM, 16), layout.tile(k, TGMM_TK, 16), layout.tile(n, TGMM_TN, 16)
  lhs = layout.pad_axis(layout.pad_axis(lhs_MK, 0, tm), 1, tk)
  dout = layout.pad_axis(layout.pad_axis(dout_MN, 0, tm), 1, tn)
  starts_G, ends_G = layout.group_bounds(group_sizes_G, m)
  num_groups = group_sizes_G.shape[0]
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn),
      grid=(num_groups, lhs.shape[1] // tk, dout.shape[1] // tn),
      out_specs=pl.BlockSpec((None, tk, tn), lambda g, kb, nb: (g, kb, nb)),
      out_shape=layout.out_struct((num_groups, lhs.shape[1], dout.shape[1]), out_dtype, lhs),
      compiler_params=_TRITON,
      interpret=interpret,
  )(starts_G, ends_G, lhs, dout)
  return out[:, :k, :n]
