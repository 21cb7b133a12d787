"""The decoder's typed, frozen, hashable configuration, validated once.

`config.model` (ml_collections) stays the user-facing surface: CLI overrides, config.json, sweeps and presets
edit it. `ModelConfig.from_config(config.model)` turns it into a `ModelConfig` once: defaults filled, lists
made tuples, `moe` / `mod` / `mamba` / `diffusion` made `MoeConfig` / `ModConfig` / `MambaConfig` /
`moma.diffusion.DiffusionConfig`, and every setting checked (a ValueError naming the config.model field).
This module is the one place that holds each setting's default and its check: presets (configs/*.py) state
only how they differ, and layers trust what they are given. Modules take it by name (`decoder.Model(config=
cfg)`, `blocks.Block(cfg)`); the routed and Mamba layers take their typed sub-config (`MoE(cfg.moe, ...)`,
`MixtureOfDepths(block, cfg.mod, ...)`, `MambaBlock(cfg.mamba, ...)`), the others their fields by keyword.
Being hashable, a model (and its config) can key a compile cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from moma import diffusion
from moma import sharding
from moma.diffusion import DiffusionConfig
from moma.layers import patches
from moma.layers import routing
from moma.layers import selective_scan
from moma.layers.attention import check_attention_config
from moma.layers.norms import NORM_KINDS

# Mixture-of-Mamba's per-modality projections (the paper's four; the conv is an extra ablation).
MAMBA_PROJECTIONS = ("in_proj", "x_proj", "dt_proj", "out_proj")
# What `untie` may name per block kind: every component with weights.
UNTIE_COMPONENTS = {
    "transformer": ("qkv", "o", "ffn", "norm", "qk_norm"),
    "mamba": MAMBA_PROJECTIONS + ("conv", "norm", "ffn"),
}
# Components applied to sorted rows (the others look up per-token parameters and need no sort).
SORTED_COMPONENTS = ("qkv", "o", "ffn", "in_proj", "x_proj", "dt_proj", "out_proj", "conv")
NORM_PLACEMENTS = ("pre", "swin")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """config.model.moe (ffn="moe"): the routed experts of `moma.layers.moe.MoE`, which takes this config."""

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
  routing_rows: int = 1  # batch rows routed together (expert choice, token-choice capacity); 0: each device's

  def slice_tokens(self, shape_BLD: Sequence[int]) -> int:
    """Tokens routed together in a [B, L, D] batch (per device under a mesh)."""
    return _slice_tokens("moe", self.routing_rows, shape_BLD)


@dataclasses.dataclass(frozen=True)
class ModConfig:
  """config.model.mod: Mixture-of-Depths every `every` layers (`moma.layers.mod.MixtureOfDepths` takes it)."""

  enabled: bool = False
  capacity: float = 0.25
  every: int = 2
  selection: str = "batch"
  router_noise: float = 0.0
  aux_router: bool = False
  aux_loss_weight: float = 1.0
  routing_rows: int = 1  # selection="batch": rows selected among together; 0: each device's

  def slice_tokens(self, shape_BLD: Sequence[int]) -> int:
    """Tokens selected among together in a [B, L, D] batch (per device under a mesh)."""
    return _slice_tokens("mod", self.routing_rows, shape_BLD) if self.selection == "batch" else shape_BLD[1]


@dataclasses.dataclass(frozen=True)
class MambaConfig:
  """config.model.mamba (block="mamba"): the Mamba-1 paper's d_state 16, expand 2, conv 4 (`MambaBlock`)."""

  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int = 0  # 0: ceil(d_model / 16)
  scan_impl: str = "auto"
  chunk_size: int = 64


def routing_group(field: str, routing_rows: int, rows_per_device: int) -> int:
  """Batch rows routed together: `routing_rows`, or all of a device's rows for 0.

  Batch-level routing (MoE expert choice, token-choice capacity, MoD's batch selection) picks among the
  tokens of one group of rows. A fixed number of rows gives the same choice on every mesh; 0 makes the
  device count part of the model (the trainer records the rows it stands for: `moma.train.resolve_config`).
  """
  if rows_per_device % (routing_rows or rows_per_device):
    raise ValueError(f"config.model.{field}.routing_rows={routing_rows} does not divide the {rows_per_device} "
                     "batch rows each device holds: choose a divisor (1, the default, routes each row alone)")
  return routing_rows or rows_per_device


def _slice_tokens(field: str, routing_rows: int, shape_BLD: Sequence[int]) -> int:
  """Tokens routed together in a [B, L, ...] batch split over the active mesh's batch shards."""
  return routing_group(field, routing_rows, shape_BLD[0] // sharding.num_shards()) * shape_BLD[1]


_NESTED = {"moe": MoeConfig, "mod": ModConfig, "mamba": MambaConfig, "diffusion": DiffusionConfig}


def defaults(kind: type) -> dict[str, Any]:
  """A config dataclass's defaults as a dict, its sections as dicts (the presets, configs/*.py, start from
  these and state only what they change)."""
  return {f.name: dataclasses.asdict(f.default) if dataclasses.is_dataclass(f.default) else f.default
          for f in dataclasses.fields(kind)}


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
  # qk_norm=True alone is Qwen3's RMSNorm over each head; "layer" is Chameleon's LayerNorm with bias (7B preset).
  qk_norm_kind: str = "rms"
  norm_eps: float = 1e-5  # LLaMA / Chameleon
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
  # Route per token with the auxiliary routers instead of over the batch (MoE "ec", MoD): decoding and
  # aux-router evaluation set it (`moma.models.generate`); it has nothing to do with causal attention.
  aux_routing: bool = False
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


# The size fields of config.model and its sections, each with its least value: 1, or 0 where 0 stands for
# a default worked out at construction (or, for a Mamba block's d_ff, no FFN sublayer).
_SIZES = {
    "": dict(d_model=1, num_layers=1, num_heads=1, num_kv_heads=0, head_dim=0, d_ff=1, max_seq_len=1,
             attention_block=1, patch_dim=0),
    "moe": dict(top_k=1, routing_rows=0),
    "mod": dict(every=1, routing_rows=0),
    "mamba": dict(d_state=1, d_conv=1, expand=1, dt_rank=0, chunk_size=1),
    "diffusion": dict(timesteps=1, noise_limit=1),
}


def _check_sizes(cfg: ModelConfig) -> None:
  """Every size field (`_SIZES`) is an integer at or above its least value, whether or not the model
  uses its section: a d_ff=0 that silently drops the FFN is refused as much as a d_model=0."""
  for section, least in _SIZES.items():
    given = getattr(cfg, section) if section else cfg
    for field, low in least.items():
      path = ".".join(p for p in (section, field) if p)
      if field == "d_ff" and cfg.block == "mamba" and cfg.ffn == "dense":
        low = 0  # a Mamba block without an FFN
      value = getattr(given, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        why = " (d_ff=0, no FFN, is for block='mamba' with ffn='dense')" if field == "d_ff" else ""
        raise ValueError(f"config.model.{path}={value!r} must be an integer >= {low}{why}; set e.g. "
                         f"--config.model.{path}={defaults(type(given))[field]}")


def _check(cfg: ModelConfig) -> None:
  """Raises ValueError naming the config.model field for settings the decoder cannot build."""
  if cfg.vocab_size <= 0:
    raise ValueError(f"config.model.vocab_size={cfg.vocab_size}: must be > 0 (the trainer fills 0 from "
                     "moma.data.vocab_size(config.data))")
  _check_sizes(cfg)
  if not cfg.modalities:
    raise ValueError("config.model.modalities is empty: name at least one modality")
  if not cfg.head_dim and cfg.d_model % cfg.num_heads:
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
  if cfg.patch_proj not in patches.KINDS:
    raise ValueError(f"config.model.patch_proj={cfg.patch_proj!r}: expected one of {patches.KINDS}")
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
  if moe.routing == "topk" and not 1 <= moe.top_k <= min(layout.sizes):
    raise ValueError(f"config.model.moe.top_k={moe.top_k} must be in [1, {min(layout.sizes)}], the "
                     f"smallest expert group of layout {moe.layout!r}")
  if moe.routing == "ec":  # token choice routes per token already
    _check_aux_routing(cfg, "moe")


def _check_mod(cfg: ModelConfig) -> None:
  mod = cfg.mod
  if not 0 < mod.capacity <= 1:
    raise ValueError(f"config.model.mod.capacity={mod.capacity} must be in (0, 1]")
  if cfg.num_layers % mod.every:
    raise ValueError(f"config.model.mod.every={mod.every} must divide num_layers={cfg.num_layers}")
  if mod.selection not in ("batch", "sequence"):
    raise ValueError(f"config.model.mod.selection={mod.selection!r}: expected 'batch' or 'sequence'")
  _check_aux_routing(cfg, "mod")


def _check_aux_routing(cfg: ModelConfig, field: str) -> None:
  if cfg.aux_routing and not getattr(cfg, field).aux_router:
    raise ValueError(f"config.model.aux_routing=True (decoding, or evaluation with aux routers) routes "
                     f"config.model.{field} per token: it needs config.model.{field}.aux_router=True, trained by "
                     "the aux_routers stage (configs/moma.py)")


def _check_mamba(mamba: MambaConfig) -> None:
  if mamba.scan_impl not in selective_scan.IMPLS:
    raise ValueError(f"config.model.mamba.scan_impl={mamba.scan_impl!r}: expected one of "
                     f"{selective_scan.IMPLS}")
