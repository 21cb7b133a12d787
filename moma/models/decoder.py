"""Early-fusion decoder LM: dense transformer, Mixture-of-Transformers (MoT), Mamba and Mixture-of-Mamba.

MoT is this decoder with `untie` ⊆ {"qkv", "o", "ffn", "norm", "qk_norm"}: those weights get one copy per
modality; dense is `untie=()`. The modality sort plan is built once per forward pass and handed to every
layer; layers (`moma.models.blocks`) are stacked with `nn.scan` so compile time does not grow with depth.

MoMa (`ffn="moe"`, `config.model.moe.*`): the FFN is `moma.layers.moe.MoE` under the same name "ffn"; the
modality plan then always has one group per modality (the experts' groups are read off it).
Mixture-of-Depths (`config.model.mod.enabled`): the scan step is `mod.every` layers, the last one wrapped in
`moma.layers.mod.MixtureOfDepths` (params `layers/block_<i>` and `layers/mod/block`). `causal=True`
(`model.clone(causal=True)`) is the generation path: aux routers replace the batch-level routers.
`block="mamba"` (usually with `d_ff=0`: no FFN sublayer) is Mamba, or Mixture-of-Mamba when `untie` names
its projections (`config.model.mamba.*`). Decoding state (attention's keys and values, Mamba's recurrent
state, the document being continued) lives in the "cache" collection (`moma.models.generate`).
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
from moma.layers import selective_scan
from moma.layers import routing
from moma.layers.attention import check_attention_config
from moma.layers.norms import NORM_KINDS, Norm
from moma.models.blocks import Block, ModGroup, Spec

UNTIE_COMPONENTS = {
    "transformer": ("qkv", "o", "ffn", "norm", "qk_norm"),
    "mamba": ("in_proj", "x_proj", "dt_proj", "out_proj", "conv", "norm", "ffn"),
}
# Components applied to sorted rows (the others look up per-token parameters and need no sort).
_SORTED_COMPONENTS = ("qkv", "o", "ffn", "in_proj", "x_proj", "dt_proj", "out_proj", "conv")
NORM_PLACEMENTS = ("pre", "swin")
# config.model.mamba fields and defaults (block="mamba"): the Mamba-1 paper's d_state 16, expand 2, conv 4.
MAMBA_DEFAULTS = dict(d_state=16, d_conv=4, expand=2, dt_rank=0, scan_impl="auto", chunk_size=64)
DTYPES = ("float32", "bfloat16")
# config.model.moe.* / config.model.mod.* defaults (configs/moma.py starts from these).
MOE_DEFAULTS = dict(layout="4t4i", routing="ec", capacity_factor=1.0, token_fractions=None, top_k=2,
                    gate="softmax", dropless=False, load_balance_weight=0.01, z_loss_weight=1e-3,
                    router_noise=0.0, aux_router=False, aux_loss_weight=1.0, routing_rows=0)
MOD_DEFAULTS = dict(enabled=False, capacity=0.25, every=2, selection="batch", router_noise=0.0,
                    aux_router=False, aux_loss_weight=1.0, routing_rows=0)


def parse_untie(untie: str | Sequence[str]) -> tuple[str, ...]:
  """"qkv,o" or ("qkv", "o") → ("qkv", "o")."""
  if isinstance(untie, str):
    untie = [u for u in untie.replace(" ", "").split(",") if u]
  return tuple(untie)


class Model(nn.Module):
  """Decoder LM over the DESIGN.md batch dict; returns float32 logits [B, L, V].

  Fields are `config.model` (use `Model(**config.model)`); `moe`, `mamba`, `mod` are the sub-configs of
  the blocks that use them.
  """

  modalities: Sequence[str] = ("text", "image", "audio")
  vocab_size: int = 0
  d_model: int = 256
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 0  # 0 → num_heads
  head_dim: int = 0  # 0 → d_model // num_heads
  d_ff: int = 1024
  block: str = "transformer"
  ffn: str = "dense"
  untie: str | Sequence[str] = ()
  norm: str = "rms"
  norm_placement: str = "pre"
  qk_norm: bool = False
  qk_norm_kind: str = "rms"  # "rms" (Qwen3-style) | "layer" (LayerNorm with bias, Chameleon)
  norm_eps: float = 1e-6
  rope_theta: float = 10_000.0
  max_seq_len: int = 2048
  tie_embeddings: bool = False
  scale_tied_logits: bool = False  # tied: logits / sqrt(d_model) (unit-variance initial logits); off in the references
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  gmm_impl: str = "auto"
  attention_impl: str = "auto"  # moma.layers.attention.attend: auto | xla | blockwise | pallas_gpu | splash
  attention_block: int = 128  # blockwise attention's block length (a multiple of 8)
  moe: Any = None
  mamba: Any = None
  mod: Any = None
  causal: bool = False  # generation: aux routers instead of batch-level routing (MoE "ec", MoD)
  patch_dim: int = 0  # Transfusion: P floats per image patch (0: no patch projection, discrete images)
  patch_proj: str = "linear"  # moma.layers.patches.KINDS
  diffusion: Any = None  # moma.diffusion.DEFAULTS fields (patch_dim > 0)

  def __post_init__(self):
    check_config(self)
    super().__post_init__()

  @property
  def spec(self) -> Spec:
    return Spec(len(self.modalities), self.d_model, self.num_heads, self.num_kv_heads or self.num_heads,
                self.head_dim or self.d_model // self.num_heads, self.d_ff, self.block, self.ffn,
                parse_untie(self.untie), self.norm, self.norm_placement, self.qk_norm, self.rope_theta,
                jnp.dtype(self.dtype), jnp.dtype(self.param_dtype), self.gmm_impl,
                tuple(self.modalities), _items(self.moe_config) if self.ffn == "moe" else (),
                _items(self.mod_config) if self.mod_config["enabled"] else (), self.causal,
                num_layers=self.num_layers, max_seq_len=self.max_seq_len,
                mamba=_items(self.mamba_config) if self.block == "mamba" else (), norm_eps=self.norm_eps,
                qk_norm_kind=self.qk_norm_kind, attention_impl=self.attention_impl,
                attention_block=self.attention_block)

  @property
  def moe_config(self) -> dict[str, Any]:
    return _resolve("moe", MOE_DEFAULTS, self.moe)

  @property
  def mod_config(self) -> dict[str, Any]:
    return _resolve("mod", MOD_DEFAULTS, self.mod)

  @property
  def mamba_config(self) -> dict[str, Any]:
    return _resolve("mamba", MAMBA_DEFAULTS, self.mamba)

  @property
  def diffusion_config(self) -> dict[str, Any]:
    return _resolve("diffusion", diffusion.DEFAULTS, self.diffusion)

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], deterministic: bool = True) -> jax.Array:
    """`deterministic=False` (training) draws router noise from the "dropout" rng when configured.

    With `patch_dim` and `batch["patches"]` (Transfusion) it returns a `moma.diffusion.Output` (logits and
    the patch prediction); the noise comes from the "diffusion" rng (a fixed key without one: evaluation).
    """
    spec = self.spec
    modality_BL = batch["modality"]
    sorted_untie = set(spec.untie) & set(_SORTED_COMPONENTS)
    # MoE's aux routers are untied per modality group, so a modality layout needs the modality plan.
    by_modality = sorted_untie or (spec.ffn == "moe" and not _moe_layout(self).shared)
    plan = dispatch.partition(modality_BL, spec.num_modalities if by_modality else 1)

    if self.is_mutable_collection("cache") and not self.is_initializing() and not self.has_variable(
        "cache", "document_B"):  # prefill: decoded tokens continue each row's last document
      self.put_variable("cache", "document_B", batch["segment"][:, -1])

    embed = nn.Embed(self.vocab_size, self.d_model, dtype=spec.dtype, param_dtype=spec.param_dtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                 ("vocab", "embed")), name="embed")
    x_BLD = sharding.constrain(embed(batch["tokens"]), ("batch", "length", "embed"))
    segment_BL, image_in = batch["segment"], None
    if self.patch_dim and "patches" in batch:  # Transfusion: image positions read noised patches
      rng = self.make_rng("diffusion") if self.has_rng("diffusion") else jax.random.key(0)
      image_in = diffusion.inputs(batch, self.diffusion_config, rng)
      segment_BL = image_in.segment
      x_BLD, skip = patches.PatchIn(self.d_model, self.patch_proj, spec.dtype, spec.param_dtype,
                                    name="patch_in")(x_BLD, image_in)

    unit, depth = (ModGroup, self.num_layers // self.mod_config["every"]) if spec.mod else (
        Block, self.num_layers)
    # `deterministic` is argument 7 counting self: static under remat.
    unit = nn.remat(unit, prevent_cse=False, static_argnums=(7,)) if self.remat else unit
    step = lambda mdl, x, *ctx: (mdl(x, *ctx, deterministic), None)
    stacked = ("params", "losses", "metrics", "cache", "intermediates")  # per layer, stacked on axis 0
    layers = nn.scan(step, variable_axes=dict.fromkeys(stacked, 0),
                     split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,) * 5,
                     length=depth, metadata_params={nn.PARTITION_NAME: None})
    x_BLD, _ = layers(unit(spec, name="layers"), x_BLD, plan, modality_BL, segment_BL,
                      batch["position"], batch.get("image_block"))
    x_BLD = Norm(spec.norm, spec.groups("norm"), spec.norm_eps, dtype=spec.dtype, param_dtype=spec.param_dtype,
                 name="final_norm")(x_BLD, modality_BL)
    if self.tie_embeddings:
      logits_BLV = embed.attend(x_BLD)
      if self.scale_tied_logits:  # embeddings are N(0, 1): unit-variance initial logits
        logits_BLV = logits_BLV / np.sqrt(self.d_model)
    else:
      logits_BLV = nn.DenseGeneral(
          self.vocab_size, use_bias=False, dtype=spec.dtype, param_dtype=spec.param_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "vocab")),
          name="lm_head")(x_BLD)
    logits_BLV = sharding.constrain(logits_BLV.astype(jnp.float32), ("batch", "length", "vocab"))
    if image_in is None:
      return logits_BLV
    prediction_BLP = patches.PatchOut(self.patch_dim, self.patch_proj, spec.dtype, spec.param_dtype,
                                      name="patch_out")(x_BLD, skip)
    return diffusion.Output(logits_BLV, prediction_BLP, image_in.target, image_in.weight,
                            self.diffusion_config["loss_weight"])


def check_config(cfg: Any) -> None:
  """Raises ValueError naming the config.model field for settings the decoder cannot build."""
  if cfg.vocab_size <= 0:
    raise ValueError(f"config.model.vocab_size={cfg.vocab_size}: must be > 0 (the trainer fills 0 from "
                     "moma.data.vocab_size(config.data))")
  if not cfg.modalities:
    raise ValueError("config.model.modalities is empty: name at least one modality")
  if cfg.num_heads <= 0 or (not cfg.head_dim and cfg.d_model % cfg.num_heads):
    raise ValueError(f"config.model.num_heads={cfg.num_heads} must divide d_model={cfg.d_model} "
                     "(or set config.model.head_dim)")
  kv_heads = cfg.num_kv_heads or cfg.num_heads
  if cfg.num_heads % kv_heads:
    raise ValueError(f"config.model.num_kv_heads={kv_heads} must divide num_heads={cfg.num_heads}: set "
                     f"--config.model.num_kv_heads to a divisor of {cfg.num_heads} (0: num_heads)")
  if cfg.block not in UNTIE_COMPONENTS:
    raise ValueError(f"config.model.block={cfg.block!r}: expected one of {tuple(UNTIE_COMPONENTS)}")
  allowed = UNTIE_COMPONENTS[cfg.block]
  for component in parse_untie(cfg.untie):
    if component not in allowed:
      raise ValueError(f"config.model.untie has unknown component {component!r} for block={cfg.block!r};"
                       f" choose from {allowed}")
  if "qk_norm" in parse_untie(cfg.untie) and not cfg.qk_norm:
    raise ValueError("config.model.untie names 'qk_norm' but config.model.qk_norm=False: there is no QK-norm "
                     "to untie; drop it from untie or set qk_norm=True")
  if not cfg.norm_eps > 0:
    raise ValueError(f"config.model.norm_eps={cfg.norm_eps} must be > 0")
  choices = {"norm": NORM_KINDS, "qk_norm_kind": NORM_KINDS, "norm_placement": NORM_PLACEMENTS, "dtype": DTYPES,
             "param_dtype": DTYPES, "ffn": ("dense", "moe")}
  for field, options in choices.items():
    if getattr(cfg, field) not in options:
      raise ValueError(f"config.model.{field}={getattr(cfg, field)!r}: expected one of {options}")
  check_attention_config(cfg.attention_impl, cfg.attention_block)
  if cfg.ffn == "moe":
    _check_moe(cfg)
  if cfg.mod_config["enabled"]:
    _check_mod(cfg)
  if cfg.block == "mamba":
    _check_mamba(cfg)
  if cfg.patch_dim < 0 or cfg.patch_proj not in patches.KINDS:
    raise ValueError(f"config.model.patch_dim={cfg.patch_dim} must be >= 0 and config.model.patch_proj="
                     f"{cfg.patch_proj!r} one of {patches.KINDS}")
  if cfg.patch_dim:
    diffusion.check(cfg.diffusion_config)


def _resolve(field: str, defaults: Mapping[str, Any], given: Any) -> dict[str, Any]:
  """config.model.<field> (None, dict or ConfigDict) over `defaults`; unknown keys are an error."""
  given = dict(given.items()) if given else {}
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"config.model.{field} has unknown keys {unknown}; known: {sorted(defaults)}")
  return {**defaults, **given}


def _items(d: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
  return tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in sorted(d.items()))


def _moe_layout(cfg: Any) -> routing.Layout:
  try:
    return routing.parse_layout(cfg.moe_config["layout"], cfg.modalities)
  except ValueError as e:
    raise ValueError(f"config.model.{e} (config.model.modalities={tuple(cfg.modalities)})") from None


def _check_moe(cfg: Any) -> None:
  moe, layout = cfg.moe_config, _moe_layout(cfg)
  if moe["capacity_factor"] <= 0:
    raise ValueError(f"config.model.moe.capacity_factor={moe['capacity_factor']} must be > 0")
  if moe["routing"] not in ("ec", "topk"):
    raise ValueError(f"config.model.moe.routing={moe['routing']!r}: expected 'ec' or 'topk'")
  if moe["routing"] == "topk" and not 1 <= moe["top_k"] <= min(layout.sizes):
    raise ValueError(f"config.model.moe.top_k={moe['top_k']} must be in [1, {min(layout.sizes)}], the "
                     f"smallest expert group of layout {moe['layout']!r}")
  if cfg.causal and moe["routing"] == "ec" and not moe["aux_router"]:
    raise ValueError("causal=True with config.model.moe.routing='ec' needs config.model.moe.aux_router=True")


def _check_mod(cfg: Any) -> None:
  mod = cfg.mod_config
  if not 0 < mod["capacity"] <= 1:
    raise ValueError(f"config.model.mod.capacity={mod['capacity']} must be in (0, 1]")
  if mod["every"] < 1 or cfg.num_layers % mod["every"]:
    raise ValueError(f"config.model.mod.every={mod['every']} must divide num_layers={cfg.num_layers}")
  if mod["selection"] not in ("batch", "sequence"):
    raise ValueError(f"config.model.mod.selection={mod['selection']!r}: expected 'batch' or 'sequence'")
  if cfg.causal and not mod["aux_router"]:
    raise ValueError("causal=True with config.model.mod.enabled needs config.model.mod.aux_router=True")


def _check_mamba(cfg: Any) -> None:
  settings = cfg.mamba_config
  for field in ("d_state", "d_conv", "expand", "chunk_size"):
    if settings[field] <= 0:
      raise ValueError(f"config.model.mamba.{field}={settings[field]} must be > 0")
  if settings["dt_rank"] < 0:
    raise ValueError(f"config.model.mamba.dt_rank={settings['dt_rank']} must be >= 0 "
                     "(0: ceil(d_model / 16))")
  if settings["scan_impl"] not in selective_scan.IMPLS:
    raise ValueError(f"config.model.mamba.scan_impl={settings['scan_impl']!r}: expected one of "
                     f"{selective_scan.IMPLS}")


def as_model(model_config: Any) -> Model:
  """config.model (ConfigDict or dict) → a validated Model with defaults filled (no parameters built)."""
  return model_config if isinstance(model_config, Model) else Model(**model_config)


def validate_batch(batch: Mapping[str, Any], model_config: Any) -> None:
  """Host-side check of a concrete batch against config.model; raises ValueError naming the field."""
  model_config = as_model(model_config)
  for key in ("tokens", "modality", "segment", "position"):
    if key not in batch:
      raise ValueError(f"batch is missing {key!r} (see DESIGN.md, Batch)")
  shape = np.shape(batch["tokens"])
  if "patches" in batch:
    _check_patches(batch, model_config, shape)
  for key in ("modality", "segment", "position", "targets", "loss_mask", "image_block"):
    if key in batch and np.shape(batch[key]) != shape:
      raise ValueError(f"batch[{key!r}] has shape {np.shape(batch[key])}, batch['tokens'] has {shape}")
  if len(shape) != 2:
    raise ValueError(f"batch['tokens'] must be [B, L], got shape {shape}")
  if shape[1] > model_config.max_seq_len:
    raise ValueError(f"batch length {shape[1]} exceeds config.model.max_seq_len={model_config.max_seq_len}: "
                     f"raise --config.model.max_seq_len to at least {shape[1]} (or lower --config.train.seq_len)")
  num_modalities = len(model_config.modalities)
  _check_range(batch, "modality", num_modalities,
               f"config.model.modalities={tuple(model_config.modalities)}")
  for key in ("tokens", "targets"):
    if key in batch:
      _check_range(batch, key, model_config.vocab_size,
                   f"config.model.vocab_size={model_config.vocab_size}")


def _check_patches(batch, model_config, shape) -> None:
  if not model_config.patch_dim:
    raise ValueError("batch['patches'] (data.image_form='patches') needs a patch projection: set "
                     "config.model.patch_dim (configs/transfusion.py), or use data.image_form='discrete'")
  if np.shape(batch["patches"]) != (*shape, model_config.patch_dim):
    raise ValueError(f"batch['patches'] has shape {np.shape(batch['patches'])}; config.model.patch_dim="
                     f"{model_config.patch_dim} expects {(*shape, model_config.patch_dim)} (patch_size² × "
                     "channels of config.data)")
  if "image_block" not in batch:
    raise ValueError("batch['patches'] comes without batch['image_block'] (see DESIGN.md, Batch)")


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
