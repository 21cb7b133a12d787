"""Mixture-of-Depths: a sigmoid router picks the tokens a block processes; the rest skip it.

`MixtureOfDepths(block=...)` wraps any layer with `__call__(x_BLD, plan, **kwargs) -> y_BLD` that returns
the residual stream (x + f(x), e.g. a transformer block). Its router scores every token of the batch before
any modality split; selected tokens get x + r·(block(x) - x) with r = sigmoid(score) (so the router is
trained through r), the others pass through unchanged.

Selection (static shapes):
* "batch" (the MoMa paper's): the top ceil(capacity·T) of the T tokens of each routing slice (`routing_rows`
  batch rows, or each device's rows for 0: `ModConfig.slice_tokens`), packed in token order into one row
  per slice (`moma.dispatch.selection`). Per-token kwargs ([B, L, ...] arrays: segment, position,
  image_block) are gathered with them; the ids named in `row_unique` are made unique per batch row, so a
  block that masks attention by segment (the packed-batch convention) never mixes rows. Positions are
  kept, so RoPE and causality hold. With `block_attends`, the block also gets `attention_span=L`: a
  document of the packed row spans at most L tokens, so blockwise attention skips key blocks farther than
  that (`moma.layers.attention.attend`: c·B·L·(L + 128) scores at most instead of (c·B·L)²).
* "sequence": the top ceil(capacity·L) tokens of each row, kept as [B, k].
The block's modality plan is rebuilt for the selected tokens.

`aux_routing=True` (inference): a token is processed when its aux router says so (score > 0.5, per token);
the block runs on all tokens with the skipped ones' `segment` set to 0 (padding), so nobody attends to
them, and their outputs are discarded. This needs `segment=` and a block that masks attention by segment.
Alternating MoD and full layers is the decoder's job (e.g. scan over pairs of layers). Settings come as a
`ModConfig` (`moma.models.model_config`, which holds their defaults and checks; `enabled` and `every` are
the decoder's).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moma import dispatch
from moma import sharding
from moma.layers import routing as rt
from moma.models.model_config import ModConfig


class MixtureOfDepths(nn.Module):
  """Routes `block` over a `capacity` fraction of the tokens. Params: router [d], block, aux_router."""

  block: nn.Module
  config: ModConfig
  row_unique: Sequence[str] = ("segment", "image_block")
  block_attends: bool = False  # the block takes `attention_span=` (a decoder Block): see "batch" above
  aux_routing: bool = False  # route per token with the aux router (decoding), not over the batch
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BLD: jax.Array, plan: dispatch.Plan, *, deterministic: bool = True,
               **kwargs) -> jax.Array:
    cfg = self.config
    if self.aux_routing and kwargs.get("segment") is None:
      raise ValueError("MixtureOfDepths: aux_routing=True needs the segment= keyword (to mask skipped tokens)")
    b, length, d = x_BLD.shape
    x_MD = x_BLD.reshape(-1, d)
    router = self.param("router", nn.with_logical_partitioning(nn.initializers.normal(d ** -0.5), ("embed",)),
                        (d,), self.param_dtype)
    logits_M = jnp.dot(x_MD.astype(jnp.float32), router.astype(jnp.float32))
    if cfg.router_noise > 0 and not deterministic:
      logits_M += cfg.router_noise * rt.logistic_noise(self.make_rng("dropout"), logits_M.shape)
    r_M = jax.nn.sigmoid(logits_M)
    segment = kwargs.get("segment")
    valid_M = jnp.ones((b * length,), bool) if segment is None else segment.reshape(-1) != 0
    aux = rt.AuxRouter(1, 1, self.dtype, self.param_dtype, name="aux_router")

    if self.aux_routing:
      sel_M = (aux(x_MD.astype(self.dtype), plan)[:, 0] > 0) & valid_M
      sel_BL = sel_M.reshape(b, length)
      y_BLD = self.block(x_BLD, plan, deterministic=deterministic,
                         **{**kwargs, "segment": jnp.where(sel_BL, segment, 0)})
      upd = (r_M.reshape(b, length, 1) * (y_BLD - x_BLD)).astype(x_BLD.dtype)
      y = jnp.where(sel_BL[..., None], x_BLD + upd, x_BLD)
    else:
      y, sel_M = self._routed(x_BLD, plan, r_M, valid_M, deterministic, kwargs)
      if cfg.aux_router:
        bce, acc = rt.aux_router_loss(aux(jax.lax.stop_gradient(x_MD.astype(self.dtype)), plan),
                                      sel_M[:, None], valid_M[:, None])
        self.sow("losses", "mod_aux_router_bce", cfg.aux_loss_weight * bce)
        self.sow("metrics", "mod_aux_router_acc", acc)
    self.sow("metrics", "mod_skip_frac", 1 - (sel_M & valid_M).sum() / jnp.maximum(valid_M.sum(), 1))
    self.sow("intermediates", "processed", sel_M)  # bool [B·L]: the token went through the block
    return y

  def _routed(self, x_BLD, plan, r_M, valid_M, deterministic, kwargs):
    b, length, d = x_BLD.shape
    score_M = jnp.where(valid_M, jax.lax.stop_gradient(r_M), -1.0)
    batch = self.config.selection == "batch"
    if batch:
      kwargs = {k: _unique_per_row(v) if k in self.row_unique and _per_token(v, b, length) else v
                for k, v in kwargs.items()}
    per_slice = self.config.slice_tokens(x_BLD.shape)
    k = math.ceil(self.config.capacity * per_slice)

    def select(score):  # one device's tokens: the top k of each routing slice, in token order
      _, idx_NK = jax.lax.top_k(score.reshape(-1, per_slice), k)
      return dispatch.selection(jnp.sort(idx_NK, axis=-1), slice_tokens=per_slice)

    sel = sharding.on_shards(select, (score_M,))
    if batch and self.block_attends:
      kwargs["attention_span"] = length  # a document of a packed row spans ≤ L tokens: attention skips farther
    # One packed row [k] per routing slice, in token order: causality and positions survive packing.
    take = lambda v: sel.dispatch(v.reshape(b * length, -1)).reshape(-1, k, *v.shape[2:])
    sub_kwargs = {k: take(v) if _per_token(v, b, length) else v for k, v in kwargs.items()}
    x_sel = take(x_BLD)
    sub_plan = (dispatch.identity_plan() if plan.group_of_token is None
                else dispatch.partition(take(plan.group_of_token), plan.num_groups))
    y_sel = self.block(x_sel, sub_plan, deterministic=deterministic, **sub_kwargs)
    keep = take(valid_M)
    upd = jnp.where(keep[..., None], take(r_M)[..., None] * (y_sel - x_sel), 0.0).astype(x_BLD.dtype)
    y = x_BLD.reshape(-1, d) + sel.combine(upd.reshape(-1, d), (b * length,))
    sel_M = sel.combine(keep.reshape(-1, 1).astype(jnp.float32), (b * length,))[:, 0] > 0
    return y.reshape(b, length, d), sel_M


def _per_token(v: Any, b: int, length: int) -> bool:
  return isinstance(v, jax.Array) and v.ndim >= 2 and v.shape[:2] == (b, length)


def _unique_per_row(ids_BL: jax.Array) -> jax.Array:
  """Offset non-zero ids by row so that ids from different batch rows never compare equal."""
  offset = (jnp.max(ids_BL) + 1) * jnp.arange(ids_BL.shape[0], dtype=ids_BL.dtype)[:, None]
  return jnp.where(ids_BL != 0, ids_BL + offset, 0)


def flops_per_token(config: ModConfig, d_model: int, block_flops_per_token: float) -> dict:
  """Average forward FLOPs per token of a MoD layer: capacity × the block's, plus the routers."""
  router = 2 * d_model + (2 * (d_model * (d_model // 2) + d_model // 2) if config.aux_router else 0)
  return {"forward_flops": config.capacity * block_flops_per_token + router, "router_flops": router}
