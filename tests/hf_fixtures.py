"""Tiny random Hugging Face checkpoints, written with numpy + safetensors under each family's real tensor
names and config.json keys (the names of transformers' LlamaForCausalLM, Qwen3ForCausalLM,
ChameleonForConditionalGeneration and MambaForCausalLM), independent of moma's own mapping.

`write(family, directory, config=..., drop=..., shards=...)`: `config` overrides config.json keys (the
tensors follow the overridden shape), `drop` leaves tensors out, `shards` > 1 splits the tensors over
files named by model.safetensors.index.json (`shapes`, `unsaid`: see `write`).
"""

from __future__ import annotations

import json
import os

import numpy as np

FAMILIES = ("llama", "qwen3", "chameleon", "mamba")
VOCAB = 300  # more than moma's 256 byte ids, so the imported run also takes moma's embedded text data

_CONFIGS = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                  rope_scaling=None,
                  attention_bias=False, mlp_bias=False, hidden_act="silu", tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=32,
                  intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  rope_scaling=None,
                  attention_bias=False, hidden_act="silu", tie_word_embeddings=True, use_sliding_window=False,
                  sliding_window=None, bos_token_id=5, eos_token_id=5),
    "chameleon": dict(architectures=["ChameleonForConditionalGeneration"], model_type="chameleon",
                      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_theta=10000.0, rope_scaling=None, attention_bias=False, mlp_bias=False,
                      hidden_act="silu", tie_word_embeddings=False, swin_norm=False, qk_layernorm=True,
                      bos_token_id=0, eos_token_id=2, pad_token_id=1, vocabulary_map={}),
    "mamba": dict(architectures=["MambaForCausalLM"], model_type="mamba", hidden_size=32, state_size=8,
                  num_hidden_layers=2, expand=2, conv_kernel=4, time_step_rank=4, intermediate_size=64,
                  layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True, hidden_act="silu",
                  tie_word_embeddings=True, residual_in_fp32=True, bos_token_id=0, eos_token_id=0),
}


def _transformer(c: dict, family: str) -> dict[str, tuple[int, ...]]:
  d, f = c["hidden_size"], c["intermediate_size"]
  heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
  k = c.get("head_dim") or d // heads
  shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (heads * k, d), p + "self_attn.k_proj.weight": (kv * k, d),
                   p + "self_attn.v_proj.weight": (kv * k, d), p + "self_attn.o_proj.weight": (d, heads * k),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f)})
    if family == "qwen3":
      shapes.update({p + "self_attn.q_norm.weight": (k,), p + "self_attn.k_norm.weight": (k,)})
    if family == "chameleon":
      for n, h in (("q", heads), ("k", kv)):
        shapes.update({p + f"self_attn.{n}_norm.weight": (h, k), p + f"self_attn.{n}_norm.bias": (h, k)})
  return shapes


def _mamba(c: dict) -> dict[str, tuple[int, ...]]:
  d, n, r = c["hidden_size"], c["state_size"], c["time_step_rank"]
  i_ = c["expand"] * d
  shapes = {"backbone.embeddings.weight": (c["vocab_size"], d), "backbone.norm_f.weight": (d,)}
  for i in range(c["num_hidden_layers"]):
    p = f"backbone.layers.{i}."
    shapes.update({p + "norm.weight": (d,), p + "mixer.in_proj.weight": (2 * i_, d),
                   p + "mixer.conv1d.weight": (i_, 1, c["conv_kernel"]), p + "mixer.conv1d.bias": (i_,),
                   p + "mixer.x_proj.weight": (r + 2 * n, i_), p + "mixer.dt_proj.weight": (i_, r),
                   p + "mixer.dt_proj.bias": (i_,), p + "mixer.A_log": (i_, n), p + "mixer.D": (i_,),
                   p + "mixer.out_proj.weight": (d, i_)})
  return shapes


def _value(name: str, shape, rng) -> np.ndarray:
  """Random weights a real model could hold: norms near 1, A_log = log(1..N), small projections."""
  if name.endswith(("norm.weight", "layernorm.weight", "norm_f.weight")):
    return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
  if name.endswith("A_log"):
    return np.log(np.broadcast_to(np.arange(1, shape[1] + 1, dtype=np.float32), shape)).copy()
  scale = 1.0 if "embed" in name else 0.02 if name.endswith("bias") else 1 / np.sqrt(shape[-1])
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def hf_config(family: str) -> dict:
  """The config.json `write` writes for `family` (without overrides)."""
  return {**_CONFIGS[family], "vocab_size": VOCAB}


def tensor_shapes(family: str, config: dict) -> dict[str, tuple[int, ...]]:
  shapes = _mamba(config) if family == "mamba" else _transformer(config, family)
  if not config["tie_word_embeddings"]:
    shapes["lm_head.weight"] = (config["vocab_size"], config["hidden_size"])
  return shapes


def write(family: str, directory: str, config: dict | None = None, drop=(), shards: int = 1,
          seed: int = 0, shapes: dict | None = None, unsaid=()) -> str:
  """Writes a tiny `family` checkpoint to `directory`; returns it. `shapes` overrides tensor shapes;
  `unsaid` config keys are left out of config.json."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  config = {**hf_config(family), **(config or {})}
  rng = np.random.default_rng(seed)
  all_shapes = {**tensor_shapes(family, config), **(shapes or {})}
  tensors = {name: _value(name, shape, rng) for name, shape in all_shapes.items() if name not in drop}
  if family == "chameleon":  # one QK-norm table per head, repeated as HF's conversion writes Chameleon-7B
    for name in [n for n in tensors if "_norm." in n and "self_attn" in n]:
      if name not in (shapes or {}):
        tensors[name] = np.ascontiguousarray(np.broadcast_to(tensors[name][:1], tensors[name].shape))
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({k: v for k, v in config.items() if k not in unsaid}, f, indent=2)
  names = sorted(tensors)
  if shards == 1:
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return directory
  weight_map = {}
  for s in range(shards):
    file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: tensors[n] for n in names[s::shards]}
    save_file(part, os.path.join(directory, file), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(part, file))
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return directory


def read(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of an HF directory (single file or shards)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  out = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".safetensors"):
      out.update(load_file(os.path.join(directory, name)))
  return out
