"""The decoder's typed, frozen, hashable configuration, validated once.

`config.model` (ml_collections) stays the user-facing surface: CLI overrides, config.json, sweeps and presets
edit it. `ModelConfig.from_config(config.model)` turns it into a `ModelConfig` once: defaults filled, lists
made tuples, `moe` / `mod` / `mamba` / `diffusion` made `MoeConfig` / `ModConfig` / `MambaConfig` /
`moma.diffusion.DiffusionConfig`, and every setting checked (a ValueError naming the config.model field).
Modules take it by name (`decoder.Model(config=cfg)`, `blocks.Block(cfg)`); layers get their fields by
keyword from it. Being hashable, a model (and its config) can key a compile cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from moma import diffusion
from moma.diffusion import DiffusionConfig
from moma.layers import patches
from moma.layers import routing
from moma.layers import selective_scan
from moma.layers.attention import check_attention_config
from moma.layers.norms import NORM_KINDS

UNTIE_COMPONENTS = {
    "transformer": ("qkv", "o", "ffn", "norm", "qk_norm"),
    "mamba": ("in_proj", "x_proj", "dt_proj", "out_proj", "conv", "norm", "ffn"),
}
# Components applied to sorted rows (the others look up per-token parameters and need no sort).
SORTED_COMPONENTS = ("qkv", "o", "ffn", "in_proj", "x_proj", "dt_proj", "out_proj", "conv")
NORM_PLACEMENTS = ("pre", "swin")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """config.model.moe (ffn="moe"): the fields of `moma.layers.moe.MoE`."""

  layout: str = "4t4i"
  routing: str = "ec"
  capacity_factor: float = 1.0
  token_fractions: tuple[float, ...] | None = None
  top_k: int = 2
  gate: str = "softmax"
  dropless: bool = False
  load_balance_weight: float = 0.01
  z_loss_weight: float = 1e-3
  router_noise: float = 0.0
  aux_router: bool = False
  aux_loss_weight: float = 1.0
  routing_rows: int = 0


@dataclasses.dataclass(frozen=True)
class ModConfig:
  """config.model.mod: Mixture-of-Depths every `every` layers (`moma.layers.mod.MixtureOfDepths`)."""

  enabled: bool = False
  capacity: float = 0.25
  every: int = 2
  selection: str = "batch"
  router_noise: float = 0.0
  aux_router: bool = False
  aux_loss_weight: float = 1.0
  routing_rows: int = 0


@dataclasses.dataclass(frozen=True)
class MambaConfig:
  """config.model.mamba (block="mamba"): the Mamba-1 paper's d_state 16, expand 2, conv 4."""

  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int = 0  # 0: ceil(d_model / 16)
  scan_impl: str = "auto"
  chunk_size: int = 64


_NESTED = {"moe": MoeConfig, "mod": ModConfig, "mamba": MambaConfig, "diffusion": DiffusionConfig}


def defaults(kind: type) -> dict[str, Any]:
  """A nested config's defaults as a dict (presets start from these: `configs/moma.py`)."""
  return dataclasses.asdict(kind())


def parse_untie(untie: str | Sequence[str]) -> tuple[str, ...]:
  """"qkv,o" or ("qkv", "o") → ("qkv", "o")."""
  if isinstance(untie, str):
    untie = [u for u in untie.replace(" ", "").split(",") if u]
  return tuple(untie)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """config.model of the decoder. `num_kv_heads` and `head_dim` of 0 are resolved at construction."""

  name: str = "decoder"  # the moma.models module (`steps.model_module`)
  modalities: tuple[str, ...] = ("text", "image", "audio")
  vocab_size: int = 0
  d_model: int = 256
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 0  # 0 → num_heads
  head_dim: int = 0  # 0 → d_model // num_heads
  d_ff: int = 1024
  block: str = "transformer"
  ffn: str = "dense"
  untie: tuple[str, ...] = ()  # also "qkv,o"
  norm: str = "rms"
  norm_placement: str = "pre"
  qk_norm: bool = False
  qk_norm_kind: str = "rms"  # "rms" (Qwen3-style) | "layer" (LayerNorm with bias, Chameleon)
  norm_eps: float = 1e-6
  rope_theta: float = 10_000.0
  max_seq_len: int = 2048
  tie_embeddings: bool = False
  scale_tied_logits: bool = False  # tied: logits / sqrt(d_model) (unit-variance initial logits); off in references
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  gmm_impl: str = "auto"
  attention_impl: str = "auto"  # moma.layers.attention.attend: auto | xla | blockwise | pallas_gpu | splash
  attention_block: int = 128  # blockwise attention's block length (a multiple of 8)
  moe: MoeConfig = MoeConfig()
  mamba: MambaConfig = MambaConfig()
  mod: ModConfig = ModConfig()
  causal: bool = False  # generation: aux routers instead of batch-level routing (MoE "ec", MoD)
  patch_dim: int = 0  # Transfusion: P floats per image patch (0: no patch projection, discrete images)
  patch_proj: str = "linear"  # moma.layers.patches.KINDS
  diffusion: DiffusionConfig = DiffusionConfig()  # used when patch_dim > 0

  def __post_init__(self):
    put = lambda field, value: object.__setattr__(self, field, value)
    put("modalities", tuple(self.modalities))
    put("untie", parse_untie(self.untie))
    for field, kind in _NESTED.items():
      put(field, _nested(field, kind, getattr(self, field)))
    _check(self)
    put("num_kv_heads", self.num_kv_heads or self.num_heads)
    put("head_dim", self.head_dim or self.d_model // self.num_heads)

  @classmethod
  def from_config(cls, model_config: Any) -> ModelConfig:
    """config.model (ConfigDict, dict or ModelConfig) → a validated ModelConfig; unknown keys are an error."""
    if isinstance(model_config, cls):
      return model_config
    given = {k: _hashable(v) for k, v in model_config.items()}
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(known))
    if unknown:
      raise ValueError(f"config.model has unknown keys {unknown}; known: {sorted(known)}")
    return cls(**given)

  @property
  def num_modalities(self) -> int:
    return len(self.modalities)

  def groups(self, component: str) -> int:
    """Copies of `component`'s weights: one per modality when untied."""
    return self.num_modalities if component in self.untie else 1

  def moe_layout(self) -> routing.Layout:
    try:
      return routing.parse_layout(self.moe.layout, self.modalities)
    except ValueError as e:
      raise ValueError(f"config.model.{e} (config.model.modalities={self.modalities})") from None


def _hashable(value: Any) -> Any:
  """Lists (config.json) → tuples, ConfigDicts → dicts, so that the config hashes."""
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v) for v in value)
  if hasattr(value, "items") and not dataclasses.is_dataclass(value):
    return {k: _hashable(v) for k, v in value.items()}
  return value


def _nested(field: str, kind: type, given: Any) -> Any:
  """config.model.<field> (None, a mapping or a `kind`) → a `kind`; unknown keys are an error."""
  if isinstance(given, kind):
    return given
  given = _hashable(given) if given else {}
  known = defaults(kind)
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise ValueError(f"config.model.{field} has unknown keys {unknown}; known: {sorted(known)}")
  return kind(**given)


def _check(cfg: ModelConfig) -> None:
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
  for component in cfg.untie:
    if component not in allowed:
      raise ValueError(f"config.model.untie has unknown component {component!r} for block={cfg.block!r};"
                       f" choose from {allowed}")
  if "qk_norm" in cfg.untie and not cfg.qk_norm:
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
  if cfg.mod.enabled:
    _check_mod(cfg)
  if cfg.block == "mamba":
    _check_mamba(cfg.mamba)
  if cfg.patch_dim < 0 or cfg.patch_proj not in patches.KINDS:
    raise ValueError(f"config.model.patch_dim={cfg.patch_dim} must be >= 0 and config.model.patch_proj="
                     f"{cfg.patch_proj!r} one of {patches.KINDS}")
  if cfg.patch_dim:
    diffusion.check(cfg.diffusion)


def _check_moe(cfg: ModelConfig) -> None:
  moe, layout = cfg.moe, cfg.moe_layout()
  if moe.capacity_factor <= 0:
    raise ValueError(f"config.model.moe.capacity_factor={moe.capacity_factor} must be > 0")
  if moe.routing not in ("ec", "topk"):
    raise ValueError(f"config.model.moe.routing={moe.routing!r}: expected 'ec' or 'topk'")
  if moe.gate not in ("softmax", "sigmoid"):
    raise ValueError(f"config.model.moe.gate={moe.gate!r}: expected 'softmax' or 'sigmoid'")
  groups = len(layout.sizes)
  if moe.token_fractions is not None and (len(moe.token_fractions) != groups
                                          or any(not 0 < f <= 1 for f in moe.token_fractions)):
    raise ValueError(f"config.model.moe.token_fractions={moe.token_fractions} needs {groups} values in (0, 1] "
                     f"(one per expert group of layout {moe.layout!r}), or None for equal shares")
  if moe.routing_rows < 0:
    raise ValueError(f"config.model.moe.routing_rows={moe.routing_rows} must be >= 0 (0: each device's rows)")
  if moe.routing == "topk" and not 1 <= moe.top_k <= min(layout.sizes):
    raise ValueError(f"config.model.moe.top_k={moe.top_k} must be in [1, {min(layout.sizes)}], the "
                     f"smallest expert group of layout {moe.layout!r}")
  if cfg.causal and moe.routing == "ec" and not moe.aux_router:
    raise ValueError("causal=True with config.model.moe.routing='ec' needs config.model.moe.aux_router=True")


def _check_mod(cfg: ModelConfig) -> None:
  mod = cfg.mod
  if not 0 < mod.capacity <= 1:
    raise ValueError(f"config.model.mod.capacity={mod.capacity} must be in (0, 1]")
  if mod.every < 1 or cfg.num_layers % mod.every:
    raise ValueError(f"config.model.mod.every={mod.every} must divide num_layers={cfg.num_layers}")
  if mod.selection not in ("batch", "sequence"):
    raise ValueError(f"config.model.mod.selection={mod.selection!r}: expected 'batch' or 'sequence'")
  if mod.routing_rows < 0:
    raise ValueError(f"config.model.mod.routing_rows={mod.routing_rows} must be >= 0 (0: each device's rows)")
  if cfg.causal and not mod.aux_router:
    raise ValueError("causal=True with config.model.mod.enabled needs config.model.mod.aux_router=True")


def _check_mamba(mamba: MambaConfig) -> None:
  for field in ("d_state", "d_conv", "expand", "chunk_size"):
    if getattr(mamba, field) <= 0:
      raise ValueError(f"config.model.mamba.{field}={getattr(mamba, field)} must be > 0")
  if mamba.dt_rank < 0:
    raise ValueError(f"config.model.mamba.dt_rank={mamba.dt_rank} must be >= 0 (0: ceil(d_model / 16))")
  if mamba.scan_impl not in selective_scan.IMPLS:
    raise ValueError(f"config.model.mamba.scan_impl={mamba.scan_impl!r}: expected one of "
                     f"{selective_scan.IMPLS}")
