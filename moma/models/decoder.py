"""Early-fusion decoder LM: dense transformer, Mixture-of-Transformers (MoT), Mamba and Mixture-of-Mamba.

MoT is this decoder with `untie` ⊆ {"qkv", "o", "ffn", "norm", "qk_norm"}: those weights get one copy per
modality; dense is `untie=()`. The modality sort plan is built once per forward pass and handed to every
layer; layers (`moma.models.blocks`) are stacked with `nn.scan` so compile time does not grow with depth.

MoMa (`ffn="moe"`, `config.model.moe.*`): the FFN is `moma.layers.moe.MoE` under the same name "ffn"; the
modality plan then always has one group per modality (the experts' groups are read off it).
Mixture-of-Depths (`config.model.mod.enabled`): the scan step is `mod.every` layers, the last one wrapped in
`moma.layers.mod.MixtureOfDepths` (params `layers/block_<i>` and `layers/mod/block`). `aux_routing=True` (set
by `moma.models.generate`) is the generation path: aux routers replace the batch-level routers.
`block="mamba"` (usually with `d_ff=0`: no FFN sublayer) is Mamba, or Mixture-of-Mamba when `untie` names
its projections (`config.model.mamba.*`). Decoding state (attention's keys and values, Mamba's recurrent
state, the document being continued) lives in the "cache" collection (`moma.models.generate`).

All settings are one frozen, hashable `moma.models.model_config.ModelConfig`: `Model(config=cfg)`, or
`as_model(config.model)`; the blocks read it by name.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moma import diffusion
from moma import dispatch
from moma import sharding
from moma.layers import patches
from moma.layers.norms import Norm
from moma.models import model_config
from moma.models.blocks import Block, ModGroup
from moma.models.model_config import ModelConfig


class Model(nn.Module):
  """Decoder LM over the docs/design.md batch dict; returns float32 logits [B, L, V]."""

  config: ModelConfig

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], deterministic: bool = True) -> jax.Array:
    """`deterministic=False` (training) draws router noise from the "dropout" rng when configured.

    With `patch_dim` and `batch["patches"]` (Transfusion) it returns a `moma.diffusion.Output` (logits and
    the patch prediction); the noise comes from the "diffusion" rng (a fixed key without one: evaluation).
    """
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    modality_BL = batch["modality"]
    sorted_untie = set(cfg.untie) & set(model_config.SORTED_COMPONENTS)
    # MoE's aux routers are untied per modality group, so a modality layout needs the modality plan.
    by_modality = sorted_untie or (cfg.ffn == "moe" and not cfg.moe_layout().shared)
    plan = dispatch.partition(modality_BL, cfg.num_modalities if by_modality else 1)

    if self.is_mutable_collection("cache") and not self.is_initializing() and not self.has_variable(
        "cache", "document_B"):  # prefill: decoded tokens continue each row's last document
      self.put_variable("cache", "document_B", batch["segment"][:, -1])

    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                 ("vocab", "embed")), name="embed")
    x_BLD = sharding.constrain(embed(batch["tokens"]), ("batch", "length", "embed"))
    segment_BL, image_in = batch["segment"], None
    if cfg.patch_dim and "patches" in batch:  # Transfusion: image positions read noised patches
      rng = self.make_rng("diffusion") if self.has_rng("diffusion") else jax.random.key(0)
      image_in = diffusion.inputs(batch, cfg.diffusion, rng)
      segment_BL = image_in.segment
      x_BLD, skip = patches.PatchIn(d_model=cfg.d_model, kind=cfg.patch_proj, dtype=dtype,
                                    param_dtype=param_dtype, name="patch_in")(x_BLD, image_in)

    unit, depth = (ModGroup, cfg.num_layers // cfg.mod.every) if cfg.mod.enabled else (Block, cfg.num_layers)
    # `deterministic` is argument 7 counting self: static under remat.
    unit = nn.remat(unit, prevent_cse=False, static_argnums=(7,)) if cfg.remat else unit
    step = lambda mdl, x, *ctx: (mdl(x, *ctx, deterministic), None)
    stacked = ("params", "losses", "metrics", "cache", "intermediates")  # per layer, stacked on axis 0
    layers = nn.scan(step, variable_axes=dict.fromkeys(stacked, 0),
                     split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,) * 5,
                     length=depth, metadata_params={nn.PARTITION_NAME: None})
    x_BLD, _ = layers(unit(cfg, name="layers"), x_BLD, plan, modality_BL, segment_BL,
                      batch["position"], batch.get("image_block"))
    x_BLD = Norm(kind=cfg.norm, num_groups=cfg.groups("norm"), eps=cfg.norm_eps, dtype=dtype,
                 param_dtype=param_dtype, name="final_norm")(x_BLD, modality_BL)
    if cfg.tie_embeddings:
      logits_BLV = embed.attend(x_BLD)
      if cfg.scale_tied_logits:  # embeddings are N(0, 1): unit-variance initial logits
        logits_BLV = logits_BLV / np.sqrt(cfg.d_model)
    else:
      logits_BLV = nn.DenseGeneral(
          cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "vocab")),
          name="lm_head")(x_BLD)
    logits_BLV = sharding.constrain(logits_BLV.astype(jnp.float32), ("batch", "length", "vocab"))
    if image_in is None:
      return logits_BLV
    prediction_BLP = patches.PatchOut(patch_dim=cfg.patch_dim, kind=cfg.patch_proj, dtype=dtype,
                                      param_dtype=param_dtype, name="patch_out")(x_BLD, skip)
    return diffusion.Output(logits_BLV, prediction_BLP, image_in.target, image_in.weight,
                            cfg.diffusion.loss_weight)


def as_model(config: Any) -> Model:
  """config.model (ConfigDict, dict or ModelConfig) or a Model → a validated Model (no parameters built)."""
  return config if isinstance(config, Model) else Model(config=ModelConfig.from_config(config))


def validate_batch(batch: Mapping[str, Any], model_config: Any) -> None:
  """Host-side check of a concrete batch against config.model (or a Model); ValueError naming the field."""
  cfg = as_model(model_config).config
  for key in ("tokens", "modality", "segment", "position"):
    if key not in batch:
      raise ValueError(f"batch is missing {key!r} (see docs/design.md, Batch)")
  shape = np.shape(batch["tokens"])
  if "patches" in batch:
    _check_patches(batch, cfg, shape)
  for key in ("modality", "segment", "position", "targets", "loss_mask", "image_block"):
    if key in batch and np.shape(batch[key]) != shape:
      raise ValueError(f"batch[{key!r}] has shape {np.shape(batch[key])}, batch['tokens'] has {shape}")
  if len(shape) != 2:
    raise ValueError(f"batch['tokens'] must be [B, L], got shape {shape}")
  if shape[1] > cfg.max_seq_len:
    raise ValueError(f"batch length {shape[1]} exceeds config.model.max_seq_len={cfg.max_seq_len}: "
                     f"raise --config.model.max_seq_len to at least {shape[1]} (or lower --config.train.seq_len)")
  num_modalities = len(cfg.modalities)
  _check_range(batch, "modality", num_modalities,
               f"config.model.modalities={tuple(cfg.modalities)}")
  for key in ("tokens", "targets"):
    if key in batch:
      _check_range(batch, key, cfg.vocab_size,
                   f"config.model.vocab_size={cfg.vocab_size}")


def _check_patches(batch, cfg, shape) -> None:
  if not cfg.patch_dim:
    raise ValueError("batch['patches'] (data.image_form='patches') needs a patch projection: set "
                     "config.model.patch_dim (configs/transfusion.py), or use data.image_form='discrete'")
  if np.shape(batch["patches"]) != (*shape, cfg.patch_dim):
    raise ValueError(f"batch['patches'] has shape {np.shape(batch['patches'])}; config.model.patch_dim="
                     f"{cfg.patch_dim} expects {(*shape, cfg.patch_dim)} (patch_size² × "
                     "channels of config.data)")
  if "image_block" not in batch:
    raise ValueError("batch['patches'] comes without batch['image_block'] (see docs/design.md, Batch)")


def _check_range(batch, key, upper, what):
  values = np.asarray(batch[key])
  if values.size and (values.min() < 0 or values.max() >= upper):
    bad = values.min() if values.min() < 0 else values.max()
    raise ValueError(f"batch[{key!r}] holds {bad}, outside [0, {upper}) set by {what}")


def target_modality(batch: Mapping[str, jax.Array]) -> jax.Array:
  """Modality of each position's target: token i+1 when it is in the same document, else token i."""
  modality_BL, segment_BL = batch["modality"], batch["segment"]
  same_doc = segment_BL[:, 1:] == segment_BL[:, :-1]
  nxt = jnp.where(same_doc, modality_BL[:, 1:], modality_BL[:, :-1])
  return jnp.concatenate([nxt, modality_BL[:, -1:]], axis=1)


def loss_fn(outputs: jax.Array | diffusion.Output, batch: Mapping[str, jax.Array],
            modalities: Sequence[str]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-token cross-entropy over `loss_mask`, plus `loss/<m>` grouped by the target's modality.

  Also returns `tokens/<m>` (the loss-mask weight of modality m): sum_m tokens/m * loss/m / sum_m tokens/m
  equals the total loss; a modality absent from the batch has tokens/m == 0 and loss/m == 0.
  Transfusion (`outputs` a `moma.diffusion.Output`): the loss is L_LM + λ·L_diffusion (λ =
  `outputs.loss_weight`); `loss/image_diffusion` (with `tokens/image_diffusion`) is the unweighted L_diffusion.
  """
  if isinstance(outputs, diffusion.Output):
    lm_loss, metrics = loss_fn(outputs.logits, batch, modalities)
    mse, count = diffusion.loss(outputs.prediction, outputs.target, outputs.weight)
    metrics.update({"loss/image_diffusion": mse, "tokens/image_diffusion": count})
    return lm_loss + outputs.loss_weight * mse, metrics
  logits_BLV = outputs
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32),
                                                          batch["targets"])
  mask_BL = batch["loss_mask"].astype(jnp.float32)
  loss = jnp.sum(ce_BL * mask_BL) / jnp.maximum(jnp.sum(mask_BL), 1.0)
  metrics = {}
  tm_BL = target_modality(batch)
  for i, name in enumerate(modalities):
    w_BL = mask_BL * (tm_BL == i)
    count = jnp.sum(w_BL)
    metrics[f"loss/{name}"] = jnp.sum(ce_BL * w_BL) / jnp.maximum(count, 1.0)
    metrics[f"tokens/{name}"] = count
  return loss, metrics
