"""Analytic training FLOPs per token, per modality (model FLOPs: matmuls only, remat not counted).

Training = 3 × forward (the backward pass does two matmuls per forward matmul). Attention counts the
full L × L score and value matmuls, as the masked XLA attention computes them. Embedding lookups and
elementwise ops (norms, softmax, activations) are left out; they are a few percent at realistic widths.
Dense and MoT cost the same per token: untying gives each modality its own copy, every token uses one.
"""

from typing import Any

from moma.layers import mamba as mamba_layer
from moma.models import decoder

TRAIN_MULTIPLIER = 3


def forward_per_token(model_config: Any, seq_len: int) -> dict[str, float]:
  """Forward FLOPs per token, split into "attention_proj", "attention", "ffn", "lm_head"."""
  model = decoder.as_model(model_config)
  spec = model.spec
  if spec.block == "mamba":
    return mamba_forward_per_token(model)
  if spec.block != "transformer" or spec.ffn != "dense":
    raise ValueError(f"flops: config.model.block={spec.block!r} / ffn={spec.ffn!r} not counted yet "
                     "(have: block='transformer', ffn='dense')")
  d, d_ff, layers, vocab = spec.d_model, spec.d_ff, model.num_layers, model.vocab_size
  heads, kv_heads, head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
  return {
      "attention_proj": layers * 2 * d * (2 * heads + 2 * kv_heads) * head_dim,  # q, k, v, o
      "attention": layers * 2 * 2 * seq_len * heads * head_dim,  # scores and weighted values
      "ffn": layers * 2 * 3 * d * d_ff,  # SwiGLU gate, up, down
      "lm_head": 2 * d * vocab,
  }


def per_token(model_config: Any, seq_len: int) -> dict[str, float]:
  """Training FLOPs per token: {"total": ..., "<modality>": ...} (for dense / MoT all equal)."""
  total = float(TRAIN_MULTIPLIER * sum(forward_per_token(model_config, seq_len).values()))
  out = {"total": total}
  out.update({m: total for m in decoder.as_model(model_config).modalities})
  return out


def mamba_forward_per_token(model_config: Any) -> dict[str, float]:
  """Forward FLOPs per token of the Mamba / Mixture-of-Mamba decoder: "mamba", "ffn", "lm_head".

  "mamba" is `moma.layers.mamba.mamba_flops_per_token` per layer: its projections plus the scan
  (9 per channel and state) and the conv and gates, which are 10-15% of a Mamba layer at these widths and
  not negligible like a transformer's elementwise ops. It does not depend on the sequence length (the
  recurrence has no L x L term). Untying (MoM) changes no active FLOPs; "ffn" counts a dense SwiGLU
  sublayer when d_ff > 0 (the papers' Mamba has none).
  """
  model = decoder.as_model(model_config)
  spec = model.spec
  if spec.d_ff and spec.ffn != "dense":
    raise ValueError(f"flops: config.model.ffn={spec.ffn!r} with block='mamba' is not counted yet "
                     "(have: ffn='dense' or d_ff=0)")
  settings = dict(spec.mamba)
  d = spec.d_model
  block = mamba_layer.mamba_flops_per_token(d, settings["d_state"], settings["d_conv"], settings["expand"],
                                            settings["dt_rank"])
  return {"mamba": model.num_layers * block, "ffn": model.num_layers * 2 * 3 * d * spec.d_ff,
          "lm_head": 2 * d * model.vocab_size}
