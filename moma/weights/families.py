"""The Hugging Face families moma reads and writes: config.json keys ↔ config.model, tensors ↔ params.

Llama (2/3), Qwen3 and Chameleon are moma's dense decoder (`block="transformer"`); Mamba
(`MambaForCausalLM`) is `block="mamba"` with no FFN. `model_fields` maps a config.json onto config.model
and refuses, by key, every option moma cannot express; `tensors` lists each HF tensor with the param it
fills; `hf_config` writes config.json back. The tensors' layouts are HF's own: moma's RoPE is the
rotate-half form HF's converted q/k weights are permuted for, so projections are transposed, never
permuted.
"""

from __future__ import annotations

import dataclasses
import math

from moma.models.model_config import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "chameleon": "ChameleonForConditionalGeneration", "mamba": "MambaForCausalLM"}
# HF Chameleon's QK LayerNorm has its eps fixed at 1e-5; moma's QK-norm takes config.model.norm_eps.
CHAMELEON_QK_EPS = 1e-5
def embedding_name(family: str) -> str:
  return "backbone.embeddings.weight" if family == "mamba" else "model.embed_tokens.weight"


# Tensors that hold no weight of the language model: skipped on import (and said so).
NOT_THE_LM = {"model.vqmodel.": "Chameleon's VQ image tokenizer", "rotary_emb.inv_freq": "RoPE frequencies "
              "(recomputed from rope_theta)"}


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One HF tensor ("{i}": the layer) and the moma param it fills (under "layers": stacked on axis 0).

  kind, HF ↔ moma: "same"; "linear" [out, in] ↔ [in, *out]; "conv" [I, 1, K] ↔ [K, I]; "heads": per-head
  tables [repeat, K] ↔ one [K] (refused when the heads differ). slot: the index on the moma leaf's axis 1 it
  fills (k 0 / v 1 of "kv", gate 0 / up 1 of "wi"). vocab: rows are token ids (moma.weights.Layout).
  """

  name: str
  path: tuple[str, ...]
  kind: str = "same"
  slot: int | None = None
  vocab: bool = False
  repeat: int = 0

  @property
  def stacked(self) -> bool:
    return self.path[0] == "layers"


def _refuse(key: str, value, why: str) -> ValueError:
  return ValueError(f"config.json {key}={value!r}: {why}, which moma cannot express; not imported")


def _rope_theta(hf: dict) -> float:
  """rope_theta, refusing scaled RoPE (rope_scaling, or transformers 5's rope_parameters)."""
  params = hf.get("rope_parameters") or {}
  for key, value in (("rope_scaling", hf.get("rope_scaling")), ("rope_parameters", params)):
    if value and value.get("rope_type", value.get("type", "default")) != "default":
      raise _refuse(key, value, f"RoPE scaling {value.get('rope_type', value.get('type'))!r}")
  return float(hf.get("rope_theta", params.get("rope_theta", 10_000.0)))


def model_fields(hf: dict) -> tuple[str, dict]:
  """(family, config.model fields) of an HF config.json; ValueError naming the key moma cannot express."""
  family = hf.get("model_type")
  if family not in ARCHITECTURES:
    raise ValueError(f"config.json model_type={family!r} (architectures {hf.get('architectures')}) is not a "
                     f"family moma imports; supported: {sorted(ARCHITECTURES)}")
  if hf.get("hidden_act", "silu") != "silu":
    raise _refuse("hidden_act", hf["hidden_act"], "an activation other than SiLU")
  fields = dict(d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                tie_embeddings=bool(hf.get("tie_word_embeddings", family == "mamba")))
  if family == "mamba":
    for key, bad, why in (("use_bias", True, "biases on in_proj / out_proj"),
                          ("use_conv_bias", False, "a conv without bias")):
      if hf.get(key, not bad) == bad:
        raise _refuse(key, bad, why)
    rank = hf.get("time_step_rank", "auto")
    fields.update(block="mamba", d_ff=0, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                  mamba=dict(d_state=hf.get("state_size", 16), d_conv=hf.get("conv_kernel", 4),
                             expand=hf.get("expand", 2),
                             dt_rank=math.ceil(hf["hidden_size"] / 16) if rank == "auto" else rank))
    return family, fields
  for key, why in (("attention_bias", "attention biases"), ("mlp_bias", "MLP biases")):
    if hf.get(key):
      raise _refuse(key, True, why)
  if hf.get("sliding_window") and hf.get("use_sliding_window", True):
    raise _refuse("sliding_window", hf["sliding_window"], "sliding-window attention")
  if any(kind != "full_attention" for kind in hf.get("layer_types") or ()):
    raise _refuse("layer_types", hf["layer_types"], "layers other than full attention")
  if hf.get("attention_dropout", 0.0):
    raise _refuse("attention_dropout", hf["attention_dropout"], "attention dropout")
  heads = hf["num_attention_heads"]
  fields.update(num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, d_ff=hf["intermediate_size"],
                max_seq_len=hf["max_position_embeddings"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=_rope_theta(hf), qk_norm=family != "llama",
                qk_norm_kind="layer" if family == "chameleon" else "rms")
  if family == "chameleon":
    if fields["norm_eps"] != CHAMELEON_QK_EPS:
      raise _refuse("rms_norm_eps", fields["norm_eps"], f"an eps other than its QK LayerNorm's "
                    f"{CHAMELEON_QK_EPS} (moma's QK-norm shares config.model.norm_eps)")
    fields["norm_placement"] = "swin" if hf.get("swin_norm") else "pre"
  return family, fields


def family_of(cfg: ModelConfig) -> str:
  """The HF family a dense or Mamba config.model exports as; ValueError naming the field for the others."""
  shapes = {"untie": (cfg.untie, "() (MoT unties weights per modality: no HF class holds its copies)"),
            "ffn": (cfg.ffn, "'dense' (MoMa's experts have no HF class)"),
            "mod.enabled": (cfg.mod.enabled, "False (Mixture-of-Depths has no HF class)"),
            "patch_dim": (cfg.patch_dim, "0 (Transfusion's patch layers have no HF class)"),
            "norm": (cfg.norm, "'rms'"), "scale_tied_logits": (cfg.scale_tied_logits, "False")}
  wanted = {"untie": (), "ffn": "dense", "mod.enabled": False, "patch_dim": 0, "norm": "rms",
            "scale_tied_logits": False}
  for field, (value, need) in shapes.items():
    if value != wanted[field]:
      raise ValueError(f"config.model.{field}={value!r}: exporting to Hugging Face needs {need}; export a "
                       "dense (configs/dense.py) or Mamba (configs/mamba.py) run")
  if cfg.block == "mamba":
    if cfg.d_ff:
      raise ValueError(f"config.model.d_ff={cfg.d_ff}: MambaForCausalLM has no FFN sublayer; export d_ff=0")
    return "mamba"
  if cfg.qk_norm and cfg.qk_norm_kind == "layer" or cfg.norm_placement == "swin":
    if not (cfg.qk_norm and cfg.qk_norm_kind == "layer" and cfg.norm_eps == CHAMELEON_QK_EPS
            and cfg.head_dim * cfg.num_heads == cfg.d_model):
      raise ValueError("config.model: a LayerNorm QK-norm or swin norms export as Chameleon, which needs "
                       f"qk_norm=True, qk_norm_kind='layer', norm_eps={CHAMELEON_QK_EPS} and head_dim = "
                       "d_model / num_heads")
    return "chameleon"
  return "qwen3" if cfg.qk_norm else "llama"


def hf_config(family: str, cfg: ModelConfig, base: dict, vocab_size: int, special_ids: dict) -> dict:
  """config.json of `family` for `cfg`: `base` (the imported run's own, or {}) with moma's fields set."""
  out = dict(base, architectures=[ARCHITECTURES[family]], model_type=family, hidden_size=cfg.d_model,
             num_hidden_layers=cfg.num_layers, vocab_size=vocab_size, tie_word_embeddings=cfg.tie_embeddings,
             hidden_act="silu", torch_dtype=cfg.param_dtype, **special_ids)
  if family == "mamba":
    out.update(state_size=cfg.mamba.d_state, conv_kernel=cfg.mamba.d_conv, expand=cfg.mamba.expand,
               intermediate_size=cfg.mamba.expand * cfg.d_model, layer_norm_epsilon=cfg.norm_eps,
               time_step_rank=math.ceil(cfg.d_model / 16) if not cfg.mamba.dt_rank else cfg.mamba.dt_rank,
               use_bias=False, use_conv_bias=True)
    return out
  out.update(num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
             intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
             rope_theta=cfg.rope_theta, attention_bias=False, mlp_bias=False, rope_scaling=None)
  if family == "chameleon":
    out["swin_norm"] = cfg.norm_placement == "swin"
  else:
    out["head_dim"] = cfg.head_dim
  return out


def tensors(family: str, cfg: ModelConfig) -> list[Tensor]:
  """Every tensor of `family`'s checkpoint for `cfg`, with the moma param it fills."""
  head = [] if cfg.tie_embeddings else [Tensor("lm_head.weight", ("lm_head", "kernel"), "linear", vocab=True)]
  if family == "mamba":
    p, mixer = "backbone.layers.{i}.", ("layers", "mixer")
    return [Tensor(embedding_name(family), ("embed", "embedding"), vocab=True),
            Tensor("backbone.norm_f.weight", ("final_norm", "scale")),
            Tensor(p + "norm.weight", ("layers", "mixer_norm", "scale")),
            Tensor(p + "mixer.in_proj.weight", mixer + ("in_proj", "kernel"), "linear"),
            Tensor(p + "mixer.conv1d.weight", mixer + ("conv_kernel",), "conv"),
            Tensor(p + "mixer.conv1d.bias", mixer + ("conv_bias",)),
            Tensor(p + "mixer.x_proj.weight", mixer + ("x_proj", "kernel"), "linear"),
            Tensor(p + "mixer.dt_proj.weight", mixer + ("dt_proj", "kernel"), "linear"),
            Tensor(p + "mixer.dt_proj.bias", mixer + ("dt_bias",)),
            Tensor(p + "mixer.A_log", mixer + ("A_log",)),
            Tensor(p + "mixer.D", mixer + ("D",)),
            Tensor(p + "mixer.out_proj.weight", mixer + ("out_proj", "kernel"), "linear")] + head
  p, attn = "model.layers.{i}.", ("layers", "mixer")
  out = [Tensor(embedding_name(family), ("embed", "embedding"), vocab=True),
         Tensor("model.norm.weight", ("final_norm", "scale")),
         Tensor(p + "input_layernorm.weight", ("layers", "mixer_norm", "scale")),
         Tensor(p + "post_attention_layernorm.weight", ("layers", "ffn_norm", "scale")),
         Tensor(p + "self_attn.q_proj.weight", attn + ("q", "kernel"), "linear"),
         Tensor(p + "self_attn.k_proj.weight", attn + ("kv", "kernel"), "linear", slot=0),
         Tensor(p + "self_attn.v_proj.weight", attn + ("kv", "kernel"), "linear", slot=1),
         Tensor(p + "self_attn.o_proj.weight", attn + ("o", "kernel"), "linear"),
         Tensor(p + "mlp.gate_proj.weight", ("layers", "ffn", "wi", "kernel"), "linear", slot=0),
         Tensor(p + "mlp.up_proj.weight", ("layers", "ffn", "wi", "kernel"), "linear", slot=1),
         Tensor(p + "mlp.down_proj.weight", ("layers", "ffn", "wo", "kernel"), "linear")] + head
  if family == "qwen3":
    out += [Tensor(p + f"self_attn.{n}_norm.weight", attn + (f"{n}_norm", "scale")) for n in "qk"]
  if family == "chameleon":
    heads = {"q": cfg.num_heads, "k": cfg.num_kv_heads}
    out += [Tensor(p + f"self_attn.{n}_norm.{hf}", attn + (f"{n}_norm", leaf), "heads", repeat=heads[n])
            for n in "qk" for hf, leaf in (("weight", "scale"), ("bias", "bias"))]
  return out
