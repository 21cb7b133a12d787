"""Analytic training FLOPs per token, per modality (model FLOPs: matmuls only, remat not counted).

Training = 3 × forward (the backward pass does two matmuls per forward matmul). Attention counts the
full L × L score and value matmuls, as the masked XLA attention computes them. Embedding lookups and
elementwise ops (norms, softmax, activations) are left out; they are a few percent at realistic widths.
Dense and MoT cost the same per token: untying gives each modality its own copy, every token uses one.
"""

from typing import Any

from moma.models import decoder

TRAIN_MULTIPLIER = 3


def _model(model_config: Any) -> decoder.Model:
  """config.model (ConfigDict or dict) → a validated Model with defaults filled (no parameters built)."""
  return model_config if isinstance(model_config, decoder.Model) else decoder.Model(**model_config)


def forward_per_token(model_config: Any, seq_len: int) -> dict[str, float]:
  """Forward FLOPs per token, split into "attention_proj", "attention", "ffn", "lm_head"."""
  model = _model(model_config)
  spec = model.spec
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
  out.update({m: total for m in _model(model_config).modalities})
  return out
