"""Analytic training FLOPs per token, per modality (model FLOPs: matmuls only, remat not counted).

Training = 3 × forward (the backward pass does two matmuls per forward matmul). Attention counts the
full L × L score and value matmuls, as the masked XLA attention computes them (blockwise attention, the
default, skips masked blocks and executes fewer). Embedding lookups and
elementwise ops (norms, softmax, activations) are left out; they are a few percent at realistic widths.
Dense and MoT cost the same per token: untying gives each modality its own copy, every token uses one.
MoMa / MoE (`ffn="moe"`): expert choice at capacity c gives every token c experts on average, whatever its
modality (c = 1: a dense FFN's FLOPs), token choice top_k; plus the router (and aux router) logits.
Mixture-of-Depths: a MoD layer processes a `mod.capacity` share of the tokens, whose attention context is
that share of the sequence (the model FLOPs). Batch-wide selection packs the batch's picks into one row
and attends within a band of L + 128 keys per query (blockwise attention's `span`), so the
executed masked scores are up to (L + 128) / (c·L) times what this counts: 4–5× at c = 0.25.
Transfusion (`patch_dim` > 0): image (patch) positions also run the patch projections in and out and the
timestep MLP (`moma.layers.patches.flops_per_image_token`), counted in the "image" entry of `per_token`;
"total" stays the FLOPs every token pays.
"""

from typing import Any

from moma.layers import mamba as mamba_layer
from moma.layers import mod as mod_lib
from moma.layers import moe as moe_lib
from moma.layers import patches
from moma.models.model_config import ModelConfig

TRAIN_MULTIPLIER = 3


def _config(model_config: Any) -> ModelConfig:
  """config.model, a ModelConfig or a decoder Model → its ModelConfig."""
  return ModelConfig.from_config(getattr(model_config, "config", model_config))


def forward_per_token(model_config: Any, seq_len: int) -> dict[str, float]:
  """Forward FLOPs per token, split into "attention_proj", "attention", "ffn", "lm_head"."""
  cfg = _config(model_config)
  if cfg.block == "mamba":
    return mamba_forward_per_token(cfg)
  d, d_ff, layers, vocab = cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.vocab_size
  heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  ffn = 2 * 3 * d * d_ff  # SwiGLU gate, up, down
  if cfg.ffn == "moe":
    ffn = moe_layer(cfg)["forward_flops"]
  per_layer = {"attention_proj": 2 * d * (2 * heads + 2 * kv_heads) * head_dim,  # q, k, v, o
               "attention": 2 * 2 * seq_len * heads * head_dim,  # scores and weighted values
               "ffn": ffn}
  out = {k: layers * v for k, v in per_layer.items()}
  if cfg.mod.enabled:
    mod = cfg.mod
    n_mod = layers // mod.every  # one MoD layer per group of `every`
    routed = dict(per_layer, attention=per_layer["attention"] * mod.capacity)
    mod_flops = mod_lib.flops_per_token(mod, d, sum(routed.values()))
    for k in per_layer:
      out[k] -= n_mod * (per_layer[k] - mod.capacity * routed[k])
    out["mod_router"] = n_mod * mod_flops["router_flops"]
  out["lm_head"] = 2 * d * vocab
  return out


def moe_layer(model_config: Any) -> dict[str, float]:
  """`moma.layers.moe.flops_per_token` of one MoE layer of config.model: forward FLOPs, active and total
  parameters (expert weights, router, aux router)."""
  cfg = _config(model_config)
  return moe_lib.flops_per_token(cfg.moe, cfg.d_model, cfg.d_ff, cfg.modalities)


def ffn_params(model_config: Any) -> dict[str, float]:
  """FFN parameters of the whole model: {"active": used per token, "total": stored} (MoE: all experts)."""
  cfg = _config(model_config)
  if cfg.ffn == "moe":
    layer = moe_layer(cfg)
    return {"active": cfg.num_layers * layer["active_params"],
            "total": cfg.num_layers * layer["total_params"]}
  dense = cfg.num_layers * 3 * cfg.d_model * cfg.d_ff
  return {"active": dense, "total": cfg.groups("ffn") * dense}


def per_token(model_config: Any, seq_len: int) -> dict[str, float]:
  """Training FLOPs per token: {"total": ..., "<modality>": ...} (for dense / MoT all equal, but for
  Transfusion's image positions, which add the patch projections)."""
  cfg = _config(model_config)
  total = float(TRAIN_MULTIPLIER * sum(forward_per_token(cfg, seq_len).values()))
  out = {"total": total}
  out.update({m: total for m in cfg.modalities})
  if cfg.patch_dim and "image" in out:
    out["image"] += TRAIN_MULTIPLIER * patches.flops_per_image_token(cfg.d_model, cfg.patch_dim, cfg.patch_proj)
  return out


def mamba_forward_per_token(model_config: Any) -> dict[str, float]:
  """Forward FLOPs per token of the Mamba / Mixture-of-Mamba decoder: "mamba", "ffn", "lm_head".

  "mamba" is `moma.layers.mamba.mamba_flops_per_token` per layer: its projections plus the scan
  (9 per channel and state) and the conv and gates, which are 10-15% of a Mamba layer at these widths and
  not negligible like a transformer's elementwise ops. It does not depend on the sequence length (the
  recurrence has no L x L term). Untying (MoM) changes no active FLOPs; "ffn" counts an FFN sublayer
  (dense SwiGLU or MoE) when d_ff > 0 (the papers' Mamba has none).
  """
  cfg = _config(model_config)
  if cfg.mod.enabled:
    raise ValueError("flops: config.model.mod with block='mamba' is not counted yet")
  d = cfg.d_model
  block = mamba_layer.mamba_flops_per_token(cfg.mamba, d)
  ffn = 0
  if cfg.d_ff:
    ffn = moe_layer(cfg)["forward_flops"] if cfg.ffn == "moe" else 2 * 3 * d * cfg.d_ff
  return {"mamba": cfg.num_layers * block, "ffn": cfg.num_layers * ffn, "lm_head": 2 * d * cfg.vocab_size}
