"""MoMa: modality-aware experts (expert-choice or token-choice routing), and the shared-expert MoE baseline.

Each expert is a full-size SwiGLU FFN; a token only reaches the experts of its modality's group (the layout,
see `routing.parse_layout`). Two routings:

* expert choice ("ec", the paper's): score = sigmoid(x·W_g); expert e of group g takes the top
  k_g = ceil(c·b_g/|E_g|) tokens of group g in each routing slice of `routing_rows` batch rows (b_g: the
  slice's tokens of g) and its output is weighted by the score. Shapes are static: each expert owns
  `static_capacity` slots (ceil(c·f_g·M/|E_g|), f_g a per-group token-fraction bound from config); slots
  past k_g are computed and weighted 0. The experts then run as one batched matmul per run of experts with
  equal capacity (`grouped_swiglu(static_sizes=...)`), gathered from and back to token order: no sort of
  the activations at all.
* token choice ("topk"): softmax or sigmoid gates over the group's experts, top-k per token, optional
  capacity with dropping (GShard priority: all first choices before second choices), load-balancing and
  router z-losses; the rows go through a sort plan over expert ids and `moma.kernels.gmm`.

`aux_routing=True` is the inference mode for expert choice: a token uses expert e when its auxiliary router
(`aux_router=True`) says so (score > 0.5), weighted by the main router's score; nothing looks at other
tokens. With `aux_router=True` and `aux_routing=False` the aux router trains on stop-gradient inputs against
the main router's choices (loss `aux_router_bce`), so it never changes the main model's gradients.

Settings come as a `MoeConfig` (`moma.models.model_config`, which holds their defaults and checks).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moma import dispatch
from moma import sharding
from moma.layers import ffn
from moma.layers import routing as rt
from moma.models.model_config import MoeConfig


class MoE(nn.Module):
  """Routed SwiGLU experts. Params: router [d, E], `wi/kernel` [E, d, 2, d_ff] (gate and up fused, as the
  MoT FFN's), `wo/kernel` [E, d_ff, d]: `dispatch.GroupedKernel`s on the logical axis "expert"."""

  config: MoeConfig
  d_ff: int
  modalities: Sequence[str] = ("text", "image")
  aux_routing: bool = False  # route per token with the aux routers (decoding), not over the batch
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  gmm_impl: str = "auto"

  @nn.compact
  def __call__(self, x_BLD: jax.Array, plan: dispatch.Plan, *, segment: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    """plan: the decoder's modality partition (its group_of_token picks each token's expert group)."""
    cfg = self.config
    layout = rt.parse_layout(cfg.layout, self.modalities)
    *lead, d = x_BLD.shape
    x_MD = x_BLD.reshape(-1, d)
    m, e = x_MD.shape[0], layout.num_experts
    if not layout.shared and (plan.group_of_token is None or plan.num_groups != len(layout.sizes)):
      raise ValueError(f"moe.layout has {len(layout.sizes)} modality groups but the plan has "
                       f"{plan.num_groups}: pass dispatch.partition(modality, len(modalities))")
    group_M = jnp.zeros((m,), jnp.int32) if layout.shared else plan.group_of_token
    valid_M = jnp.ones((m,), bool) if segment is None else segment.reshape(-1) != 0
    allowed_ME = (group_M[:, None] == jnp.asarray(layout.expert_group)[None, :]) & valid_M[:, None]

    router = self.param("router", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                               ("embed", "expert")), (d, e), self.param_dtype)
    logits_ME = jnp.dot(x_MD.astype(jnp.float32), router.astype(jnp.float32))
    if cfg.router_noise > 0 and not deterministic:
      logits_ME += cfg.router_noise * rt.logistic_noise(self.make_rng("dropout"), logits_ME.shape)
    w = ffn.swiglu_kernels(d, self.d_ff, e, self.param_dtype, group_axis="expert")  # (wi, wo)
    aux = rt.AuxRouter(e, len(layout.sizes), self.dtype, self.param_dtype, self.gmm_impl, name="aux_router")
    x_in = x_MD.astype(self.dtype)

    if cfg.routing == "ec" and self.aux_routing:
      scores_ME = jax.nn.sigmoid(logits_ME)
      use_ME = allowed_ME & (aux(x_in, plan) > 0)
      y_MD, chosen_ME = self._per_token(x_in, layout, group_M, use_ME, scores_ME, w), use_ME
      probs_ME = scores_ME
    elif cfg.routing == "ec":
      y_MD, chosen_ME, probs_ME = self._expert_choice(x_in, layout, allowed_ME, logits_ME, w,
                                                      cfg.slice_tokens(x_BLD.shape))
    else:
      y_MD, chosen_ME, probs_ME = self._token_choice(x_in, layout, allowed_ME, valid_M, logits_ME, w,
                                                     x_BLD.shape)

    self.sow("intermediates", "chosen", chosen_ME)  # bool [M, E]: token m used expert e (for analysis)
    self._sow_metrics(layout, allowed_ME, valid_M, chosen_ME, probs_ME)
    if cfg.aux_router and not self.aux_routing:
      aux_logits = aux(jax.lax.stop_gradient(x_in), plan)
      bce, acc = rt.aux_router_loss(aux_logits, chosen_ME, allowed_ME)
      self.sow("losses", "aux_router_bce", cfg.aux_loss_weight * bce)
      self.sow("metrics", "aux_router_acc", acc)
    return y_MD.reshape(*lead, d).astype(x_BLD.dtype)

  def _experts(self, rows_RD, plan, w, static_sizes=None):
    return dispatch.grouped_swiglu(rows_RD, plan, *w, impl=self.gmm_impl,
                                   dtype=self.dtype, group_axis="expert", static_sizes=static_sizes)

  def _expert_choice(self, x_MD, layout, allowed_ME, logits_ME, w, tokens):
    """Each expert takes the top tokens of its group in every routing slice of `tokens` (static shapes)."""
    cfg = self.config
    m, e = allowed_ME.shape
    scores_ME = jax.nn.sigmoid(logits_ME)
    slot_E = np.concatenate([np.arange(size) for size in layout.sizes])
    caps = rt.static_capacity(layout, cfg.capacity_factor, tokens, cfg.token_fractions)

    def local(scores, allowed):  # one device's tokens, in n routing slices of `tokens`
      n = scores.shape[0] // tokens
      scores_NEM = scores.reshape(n, tokens, e).transpose(0, 2, 1)
      allowed_NEM = allowed.reshape(n, tokens, e).transpose(0, 2, 1)
      masked_NEM = jnp.where(allowed_NEM, jax.lax.stop_gradient(scores_NEM), -1.0)
      picks, gates, chosen, overflow = [], [], jnp.zeros((n * tokens, e), bool), jnp.zeros((2,), jnp.int32)
      for g, (start, size) in enumerate(zip(layout.starts, layout.sizes)):
        experts = slice(start, start + size)
        vals, top_NEC = jax.lax.top_k(masked_NEM[:, experts], caps[g])  # vals < 0: outside the group
        want_NE = jnp.ceil(cfg.capacity_factor * allowed_NEM[:, experts].sum(-1) / size).astype(jnp.int32)
        keep_NEC = (jnp.arange(caps[g]) < want_NE[..., None]) & (vals >= 0)
        picks.append((top_NEC, vals >= 0))
        gates.append(jnp.where(keep_NEC, jnp.take_along_axis(scores_NEM[:, experts], top_NEC, axis=2), 0.0)
                     .transpose(1, 0, 2).reshape(-1))  # rows are expert-major
        token = (top_NEC + tokens * jnp.arange(n)[:, None, None]).reshape(-1)
        expert = jnp.broadcast_to((start + jnp.arange(size))[None, :, None], top_NEC.shape).reshape(-1)
        chosen = chosen.at[token, expert].max(keep_NEC.reshape(-1))
        overflow += jnp.stack([size * jnp.maximum(want_NE - caps[g], 0).sum(), size * want_NE.sum()])
      plan = dispatch.expert_choice(picks, slice_tokens=tokens, expert_slot=slot_E, slots=max(layout.sizes))
      return plan, jnp.concatenate(gates), chosen, overflow[None]

    plan, gate_R, chosen_ME, overflow = sharding.on_shards(local, (scores_ME, allowed_ME))
    rows_E = np.repeat(caps, layout.sizes) * (m // sharding.num_shards() // tokens)  # per device
    out_RD = self._experts(plan.dispatch(x_MD), plan, w, static_sizes=rows_E)
    y_MD = plan.combine(out_RD * gate_R[:, None].astype(out_RD.dtype), (m,))
    overflow = overflow.sum(0)
    self.sow("metrics", "capacity_overflow", (overflow[0] / jnp.maximum(overflow[1], 1)).astype(jnp.float32))
    return y_MD, chosen_ME, scores_ME

  def _per_token(self, x_MD, layout, group_M, use_ME, scores_ME, w):
    """Causal expert choice: the experts of the token's group its aux router switches on, main-router weighted."""
    e, width = layout.num_experts, max(layout.sizes)
    slot = jnp.arange(width)
    cand_MK = jnp.asarray(layout.starts)[group_M][:, None] + slot
    in_group = slot < jnp.asarray(layout.sizes)[group_M][:, None]
    cand_MK = jnp.where(in_group, cand_MK, 0)
    use_MK = jnp.take_along_axis(use_ME, cand_MK, axis=1) & in_group
    gates_MK = jnp.where(use_MK, jnp.take_along_axis(scores_ME, cand_MK, axis=1), 0.0)
    return self._routed(x_MD, jnp.where(use_MK, cand_MK, e), gates_MK, w, e)

  def _token_choice(self, x_MD, layout, allowed_ME, valid_M, logits_ME, w, shape_BLD):
    cfg = self.config
    m, e = allowed_ME.shape
    k = cfg.top_k
    masked = jnp.where(allowed_ME, logits_ME, -1e9)
    if cfg.gate == "softmax":
      probs_ME = jnp.where(allowed_ME, jax.nn.softmax(masked, axis=-1), 0.0)
    else:
      probs_ME = jnp.where(allowed_ME, jax.nn.sigmoid(logits_ME), 0.0)
    # Per device: XLA does not partition top_k's batch dimension (it would gather every token's scores).
    _, top_MK = sharding.on_shards(lambda p: jax.lax.top_k(p, k),
                                   (jnp.where(allowed_ME, jax.lax.stop_gradient(probs_ME), -1.0),))
    gates_MK = jnp.take_along_axis(probs_ME, top_MK, axis=1)
    keep_MK = jnp.broadcast_to(valid_M[:, None], top_MK.shape)
    onehot_KME = jax.nn.one_hot(top_MK.T, e, dtype=jnp.int32) * keep_MK.T[..., None]
    if not (cfg.dropless or self.aux_routing):
      tokens = cfg.slice_tokens(shape_BLD)
      caps = rt.static_capacity(layout, cfg.capacity_factor, tokens, cfg.token_fractions, per_token=k)
      cap_E = jnp.asarray(np.repeat(caps, layout.sizes))

      def under_capacity(top, onehot):  # one device's tokens, per routing slice
        n = top.shape[0] // tokens
        # Priority: every token's first choice before any second choice, then token order.
        assigned_NKTE = onehot.reshape(n, tokens, k, e).transpose(0, 2, 1, 3)
        pos_NKTE = (jnp.cumsum(assigned_NKTE.reshape(n, k * tokens, e), axis=1).reshape(assigned_NKTE.shape)
                    - 1) * assigned_NKTE
        pos_MK = pos_NKTE.sum(-1).transpose(0, 2, 1).reshape(-1, k)
        return pos_MK < cap_E[top]

      keep_MK &= sharding.on_shards(under_capacity, (top_MK, onehot_KME.transpose(1, 0, 2)))
      dropped = 1 - keep_MK.sum() / jnp.maximum(valid_M.sum() * k, 1)
      self.sow("metrics", "dropped_frac", dropped.astype(jnp.float32))
    y = self._routed(x_MD, jnp.where(keep_MK, top_MK, e), jnp.where(keep_MK, gates_MK, 0.0), w, e)
    chosen_ME = jnp.zeros((m, e), bool).at[jnp.arange(m)[:, None], top_MK].max(keep_MK)
    if not self.aux_routing:
      self._sow_token_choice_losses(layout, allowed_ME, valid_M, logits_ME, probs_ME, onehot_KME.sum(0))
    return y, chosen_ME, probs_ME

  def _sow_token_choice_losses(self, layout, allowed_ME, valid_M, logits_ME, probs_ME, assigned_ME):
    """Switch-style balance loss per group (1.0 when balanced), weighted by the group's token share."""
    b_E = allowed_ME.sum(0).astype(jnp.float32)
    sizes_E = jnp.asarray(np.repeat(layout.sizes, layout.sizes), jnp.float32)
    p_ME = probs_ME / jnp.maximum(probs_ME.sum(-1, keepdims=True), 1e-9)
    frac_E = assigned_ME.sum(0) / (self.config.top_k * jnp.maximum(b_E, 1))
    prob_E = p_ME.sum(0) / jnp.maximum(b_E, 1)
    share_E = b_E / jnp.maximum(valid_M.sum(), 1)
    balance = (sizes_E * frac_E * prob_E * share_E).sum()
    z = jax.nn.logsumexp(jnp.where(allowed_ME, logits_ME, -1e9), axis=-1)
    z_loss = jnp.where(valid_M, z ** 2, 0.0).sum() / jnp.maximum(valid_M.sum(), 1)
    self.sow("losses", "load_balance", self.config.load_balance_weight * balance)
    self.sow("losses", "router_z", self.config.z_loss_weight * z_loss)

  def _routed(self, x_MD, ids_MK, gates_MK, w, num_experts):
    """Rows (token, choice) grouped by expert id (E: an unused choice, no row), experts, weighted combine."""
    plan = dispatch.token_choice(ids_MK, num_experts)
    return plan.combine(self._experts(plan.dispatch(x_MD), plan, w), (x_MD.shape[0],), gates_MK)

  def _sow_metrics(self, layout, allowed_ME, valid_M, chosen_ME, probs_ME):
    load_E = chosen_ME.sum(0).astype(jnp.float32)
    n_experts = chosen_ME.sum(-1)
    for g, name in enumerate(layout.group_names):
      start, size = layout.starts[g], layout.sizes[g]
      load = load_E[start:start + size]
      self.sow("metrics", f"expert_load_max/{name}", load.max() / jnp.maximum(load.mean(), 1e-9))
      in_g = allowed_ME[:, start]
      self.sow("metrics", f"no_expert/{name}",
               jnp.where(in_g, n_experts == 0, False).sum() / jnp.maximum(in_g.sum(), 1))
    self.sow("metrics", "router_entropy", rt.group_entropy(probs_ME, allowed_ME, valid_M))


def flops_per_token(config: MoeConfig, d_model: int, d_ff: int, modalities: Sequence[str]) -> dict:
  """Analytic forward FLOPs per token (2 per multiply-add) and parameter counts of one MoE layer.

  Expert choice at capacity c gives a token c experts on average (c = 1: a dense SwiGLU FFN's FLOPs);
  token choice gives it top_k. The router computes all E logits for every token.
  """
  lay = rt.parse_layout(config.layout, modalities)
  e, ffn = lay.num_experts, 3 * d_model * d_ff
  per_token_experts = config.capacity_factor if config.routing == "ec" else config.top_k
  half = d_model // 2
  aux = (d_model * half * len(lay.sizes) + half * e) if config.aux_router else 0
  aux_active = (d_model * half + half * e) if config.aux_router else 0
  active = per_token_experts * ffn + d_model * e + aux_active
  return {"forward_flops": 2 * active, "expert_flops": 2 * per_token_experts * ffn,
          "active_params": active, "total_params": e * ffn + d_model * e + aux}
