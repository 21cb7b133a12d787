"""Blockwise (flash-style) attention over packed documents and image blocks: memory O(L), no [L, L] array.

`blockwise_attention(q, k, v, segment, image_block, span=, block=)` equals
`jax.nn.dot_product_attention(q, k, v, mask=attention_mask(segment, image_block))` (the mask rule is
`allowed` below). Queries and keys go in blocks of `block` positions; each query block keeps an online
softmax (running max and sum in float32) over the key blocks it visits. A key block is visited only if some
batch row may hold an allowed pair there: it is not above the causal diagonal (unless the two blocks share
an image block), the two blocks' [min, max] segment-id ranges overlap (documents), and the blocks lie
within `span` of each other (a caller's promise). The backward is a custom VJP that revisits the same
blocks (flash attention 2: recompute scores from the saved log-sum-exp), so it stores O(L) too.

The visit lists are data-dependent, so the loops are `while` loops: XLA executes only the visited blocks.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from moma.kernels import layout


def allowed(query_pos, key_pos, query_segment, key_segment, query_image=None, key_image=None):
  """The one mask rule, broadcast [..., queries, keys]: causal inside a document, both ways inside one
  image block (non-zero id), nothing across documents."""
  ok = key_pos <= query_pos
  if query_image is not None:
    ok = ok | ((query_image == key_image) & (query_image > 0))
  return ok & (query_segment == key_segment)


class _Static(NamedTuple):
  block: int
  span: int | None
  has_images: bool


def blockwise_attention(q_BLHK: jax.Array, k_BLGK: jax.Array, v_BLGK: jax.Array, segment_BL: jax.Array,
                        image_block_BL: jax.Array | None = None, *, span: int | None = None,
                        block: int = 256) -> jax.Array:
  """q [B, L, H, K]; k, v [B, L, G, K] with G | H (GQA); segment, image_block int [B, L] → [B, L, H, K].

  span: every allowed pair is fewer than `span` positions apart (MoD's packed rows: documents ≤ span
  tokens), so farther blocks are skipped without looking at ids. block: positions per query/key block;
  shorter sequences use one block of L rounded up to 8.
  """
  length = q_BLHK.shape[1]
  block = min(block, -(-length // 8) * 8)
  pad = lambda x, fill: layout.pad_axis(x, 1, block, fill)
  has_images = image_block_BL is not None
  image_BL = image_block_BL if has_images else jnp.zeros_like(segment_BL)
  # Padded positions get segment -1: they see only each other, so no softmax row is empty.
  out = _attend(pad(q_BLHK, 0), pad(k_BLGK, 0), pad(v_BLGK, 0), pad(segment_BL.astype(jnp.int32), -1),
                pad(image_BL.astype(jnp.int32), 0), _Static(block, span, has_images))
  return out[:, :length]


def _visits(segment_BN, image_BN, st: _Static):
  """Which key blocks each query block visits (and the transpose): orders [n, n] with the visited
  blocks first, in increasing order, and their counts [n]."""
  b, padded = segment_BN.shape
  n = padded // st.block
  overlap = lambda lo, hi: (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])
  seg = segment_BN.reshape(b, n, st.block)
  may_BNN = overlap(seg.min(-1), seg.max(-1))
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  reach_BNN = jnp.asarray(j <= i)[None]
  if st.has_images:
    img = image_BN.reshape(b, n, st.block)
    lowest = jnp.where(img > 0, img, jnp.iinfo(jnp.int32).max).min(-1)  # no image: max > highest
    reach_BNN = reach_BNN | overlap(lowest, img.max(-1))
  visit_NN = jnp.any(may_BNN & reach_BNN, axis=0)
  if st.span is not None:  # nearest positions of blocks i and j are (|i - j| - 1)·block + 1 apart
    visit_NN = visit_NN & jnp.asarray((np.abs(i - j) - 1) * st.block + 1 < st.span)
  order = lambda v: (jnp.argsort(~v, axis=1, stable=True).astype(jnp.int32), v.sum(1, dtype=jnp.int32))
  return order(visit_NN) + order(visit_NN.T)


def _block_mask(segment_BN, image_BN, qi, kj, st: _Static):
  """[B, 1, 1, bq, bk] mask of query block qi against key block kj (GQA axes for broadcasting)."""
  cut = lambda x, i: lax.dynamic_slice_in_dim(x, i * st.block, st.block, axis=1)
  pos = jnp.arange(st.block)
  images = ((cut(image_BN, qi)[:, :, None], cut(image_BN, kj)[:, None, :]) if st.has_images else ())
  ok = allowed(qi * st.block + pos[:, None], kj * st.block + pos[None, :],
               cut(segment_BN, qi)[:, :, None], cut(segment_BN, kj)[:, None, :], *images)
  return ok[:, None, None]


def _split_heads(x_BLHK, groups):  # [B, L, H, K] → [B, L, G, H/G, K]
  b, length, heads, dim = x_BLHK.shape
  return x_BLHK.reshape(b, length, groups, heads // groups, dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, segment, image, st):
  return _forward(q, k, v, segment, image, st)[0]


def _forward(q_BNHK, k_BNGK, v_BNGK, segment_BN, image_BN, st: _Static):
  b, padded, heads, dim = q_BNHK.shape
  groups = k_BNGK.shape[2]
  n, scale = padded // st.block, dim ** -0.5
  plan = _visits(segment_BN, image_BN, st)
  row_order, row_count = plan[:2]
  q_BNGRK = _split_heads(q_BNHK, groups)
  cut = lambda x, i: lax.dynamic_slice_in_dim(x, i * st.block, st.block, axis=1)

  def query_block(qi):
    q_blk = cut(q_BNGRK, qi)

    def key_block(t, state):
      max_BGRQ, sum_BGRQ, acc_BGRQK = state
      kj = row_order[qi, t]
      s = jnp.einsum("bqgrk,bsgk->bgrqs", q_blk, cut(k_BNGK, kj), preferred_element_type=jnp.float32)
      s = jnp.where(_block_mask(segment_BN, image_BN, qi, kj, st), s * scale, -jnp.inf)
      new_max = jnp.maximum(max_BGRQ, s.max(-1))
      safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # a row with nothing allowed yet
      p = jnp.exp(s - safe_max[..., None])
      rescale = jnp.exp(max_BGRQ - safe_max)
      acc = acc_BGRQK * rescale[..., None] + jnp.einsum(
          "bgrqs,bsgk->bgrqk", p.astype(v_BNGK.dtype), cut(v_BNGK, kj), preferred_element_type=jnp.float32)
      return new_max, sum_BGRQ * rescale + p.sum(-1), acc

    stat = jnp.zeros((b, groups, heads // groups, st.block), jnp.float32)
    init = (stat - jnp.inf, stat, jnp.zeros(stat.shape + (dim,), jnp.float32))
    max_BGRQ, sum_BGRQ, acc_BGRQK = lax.fori_loop(0, row_count[qi], key_block, init)
    nonempty = sum_BGRQ > 0
    out = acc_BGRQK / jnp.where(nonempty, sum_BGRQ, 1.0)[..., None]
    lse = jnp.where(nonempty, max_BGRQ + jnp.log(jnp.where(nonempty, sum_BGRQ, 1.0)), 0.0)
    return out.astype(q_BNHK.dtype), lse

  out_nBGRQK, lse_nBGRQ = lax.map(query_block, jnp.arange(n))
  out_BNHK = jnp.moveaxis(out_nBGRQK, 0, 3).reshape(b, heads, padded, dim).transpose(0, 2, 1, 3)
  lse_BGRN = jnp.moveaxis(lse_nBGRQ, 0, 3).reshape(b, groups, heads // groups, padded)
  return out_BNHK, (q_BNHK, k_BNGK, v_BNGK, segment_BN, image_BN, out_BNHK, lse_BGRN, plan)


def _backward(st: _Static, residuals, d_out_BNHK):
  q_BNHK, k_BNGK, v_BNGK, segment_BN, image_BN, out_BNHK, lse_BGRN, plan = residuals
  b, padded, heads, dim = q_BNHK.shape
  groups = k_BNGK.shape[2]
  n, scale = padded // st.block, dim ** -0.5
  col_order, col_count = plan[2:]
  q_BNGRK, d_out_BNGRK = _split_heads(q_BNHK, groups), _split_heads(d_out_BNHK, groups)
  # delta = rowsum(dO · O): the softmax backward's correction term.
  delta_BGRN = jnp.einsum("bngrk,bngrk->bgrn", d_out_BNGRK.astype(jnp.float32),
                          _split_heads(out_BNHK, groups).astype(jnp.float32))
  cut = lambda x, i, axis=1: lax.dynamic_slice_in_dim(x, i * st.block, st.block, axis=axis)

  def key_block(dq_BNGRK, kj):
    k_blk, v_blk = cut(k_BNGK, kj), cut(v_BNGK, kj)

    def query_block(t, state):
      dk_BSGK, dv_BSGK, dq = state
      qi = col_order[kj, t]
      q_blk, d_out_blk = cut(q_BNGRK, qi), cut(d_out_BNGRK, qi)
      s = jnp.einsum("bqgrk,bsgk->bgrqs", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
      mask = _block_mask(segment_BN, image_BN, qi, kj, st)
      p = jnp.where(mask, jnp.exp(s - cut(lse_BGRN, qi, 3)[..., None]), 0.0)
      dv_BSGK = dv_BSGK + jnp.einsum("bgrqs,bqgrk->bsgk", p.astype(d_out_blk.dtype), d_out_blk,
                                     preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqgrk,bsgk->bgrqs", d_out_blk, v_blk, preferred_element_type=jnp.float32)
      ds = (p * (dp - cut(delta_BGRN, qi, 3)[..., None]) * scale).astype(q_BNHK.dtype)
      dk_BSGK = dk_BSGK + jnp.einsum("bgrqs,bqgrk->bsgk", ds, q_blk, preferred_element_type=jnp.float32)
      dq_blk = cut(dq, qi) + jnp.einsum("bgrqs,bsgk->bqgrk", ds, k_blk, preferred_element_type=jnp.float32)
      return dk_BSGK, dv_BSGK, lax.dynamic_update_slice_in_dim(dq, dq_blk, qi * st.block, axis=1)

    zeros = jnp.zeros(k_blk.shape, jnp.float32)
    dk, dv, dq_BNGRK = lax.fori_loop(0, col_count[kj], query_block, (zeros, zeros, dq_BNGRK))
    return dq_BNGRK, (dk, dv)

  dq_BNGRK, (dk_nBSGK, dv_nBSGK) = lax.scan(key_block, jnp.zeros(q_BNGRK.shape, jnp.float32),
                                            jnp.arange(n))
  keys = lambda x: jnp.moveaxis(x, 0, 1).reshape(k_BNGK.shape).astype(k_BNGK.dtype)
  return (dq_BNGRK.reshape(q_BNHK.shape).astype(q_BNHK.dtype), keys(dk_nBSGK), keys(dv_nBSGK), None, None)


_attend.defvjp(_forward, _backward)
