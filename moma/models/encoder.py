"""The IMP model: one backbone for decoder objectives and for the encoder's perception objectives.

`Model(backbone=decoder.as_model(config.model), objective=...)` holds the decoder (dense, MoT, MoMa:
whatever `config.model` builds) under "backbone" plus small encoder heads, so every AGD task trains the
same parameter tree and one optimizer state:

  decoder objectives ("lm", "captioning", ...)  → the backbone's logits [B, L, V];
  "classification" → class logits [B, C] of the mean-pooled image;
  "contrastive"    → {"image": [B, E], "text": [B, E], "logit_scale": []} pooled and projected.

The encoder runs the very same layers with bidirectional attention: its sequence batches set
`image_block = segment`, which the decoder's attention mask reads as "attend both ways inside this
block" (the Transfusion rule), so nothing in the layers is duplicated. Features are the backbone's final
normalised hidden states, read by intercepting its `final_norm`; the unused LM head is dead code under jit.
Mamba blocks stay causal (a scan has no bidirectional form), so their encoder is a causal one.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ENCODER_OBJECTIVES = ("contrastive", "classification")


class Model(nn.Module):
  """Backbone + encoder heads; `objective` picks the forward pass (see the module docstring).

  Every head's parameters are created whatever the objective, so initialising on any task's batch
  gives the full shared tree.
  """

  backbone: nn.Module
  objective: str = "lm"
  num_classes: int = 10
  embed_dim: int = 0  # contrastive embedding width; 0 → d_model

  @nn.compact
  def __call__(self, batch: Mapping, deterministic: bool = True):
    d_model = self.backbone.config.d_model
    kernel = lambda name, shape, axes: self.param(
        name, nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes), shape)
    proj_DE = kernel("contrastive_proj", (d_model, self.embed_dim or d_model), ("embed", None))
    # CLIP's learnable temperature, initialised at 1/0.07 and capped at 100.
    logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
        nn.initializers.constant(np.log(1 / 0.07)), ()), ())
    classifier_DC = kernel("classifier", (d_model, self.num_classes), ("embed", None))
    classifier_bias_C = self.param("classifier_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                                   (self.num_classes,))

    if self.objective == "classification":
      return self.pooled(batch["image"], deterministic) @ classifier_DC + classifier_bias_C
    if self.objective == "contrastive":
      return {"image": self.pooled(batch["image"], deterministic) @ proj_DE,
              "text": self.pooled(batch["text"], deterministic) @ proj_DE,
              "logit_scale": jnp.minimum(logit_scale, np.log(100.0))}
    return self.backbone(batch, deterministic=deterministic)

  def pooled(self, seq: Mapping, deterministic: bool) -> jax.Array:
    """Mean over the non-padding positions of the backbone's final hidden states: [B, D]."""
    hidden_BLD = final_hidden(self.backbone, seq, deterministic)
    mask_BL1 = (seq["segment"] > 0)[..., None].astype(hidden_BLD.dtype)
    total_BD = jnp.sum(hidden_BLD * mask_BL1, axis=1)
    return (total_BD / jnp.maximum(jnp.sum(mask_BL1, axis=1), 1.0)).astype(jnp.float32)


def final_hidden(backbone: nn.Module, seq: Mapping, deterministic: bool) -> jax.Array:
  """The backbone's `final_norm` output [B, L, D] for `seq` (its logits are discarded)."""
  captured = []

  def grab(call, args, kwargs, context):
    out = call(*args, **kwargs)
    if context.module.name == "final_norm" and context.method_name == "__call__":
      captured.append(out)
    return out

  with nn.intercept_methods(grab):
    backbone(seq, deterministic=deterministic)
  if not captured:
    raise ValueError(f"config.model.name: {type(backbone).__name__} has no 'final_norm' submodule, "
                     "so the encoder cannot read its hidden states.")
  return captured[-1]
