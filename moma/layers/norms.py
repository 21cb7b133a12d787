"""RMSNorm / LayerNorm whose scale (and bias) can be untied per modality.

Tied: one scale [D]. Untied: a table [G, D]; each token looks up its modality's row (a [B, L] gather
from a tiny table, cheaper than sorting), so a norm never needs the sort plan.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moma.layers.scale import scale_features

NORM_KINDS = ("rms", "layer")


class Norm(nn.Module):
  """Normalises over the last axis in float32; `groups` (e.g. modality_BL) picks per-token parameters.

  `groups` has the leading shape of `x` (x may carry extra axes, e.g. heads for QK-norm).
  """

  kind: str = "rms"
  num_groups: int = 1
  eps: float = 1e-6
  feature_axis: str = "embed"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, groups: jax.Array | None = None) -> jax.Array:
    if self.kind not in NORM_KINDS:
      raise ValueError(f"norm={self.kind!r}: expected one of {NORM_KINDS}")
    grouped = self.num_groups > 1
    if grouped and groups is None:
      raise ValueError("Norm: untied (num_groups > 1) norms need per-token `groups` ids")
    xf = x.astype(jnp.float32)
    if self.kind == "layer":
      xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    y = scale_features(y, self._param("scale", nn.initializers.ones, x, groups))
    if self.kind == "layer":
      y = y + self._param("bias", nn.initializers.zeros, x, groups)
    return y.astype(self.dtype)

  def _param(self, name, init, x, groups):
    d = x.shape[-1]
    if self.num_groups == 1:
      return self.param(name, nn.with_logical_partitioning(init, (self.feature_axis,)), (d,),
                        self.param_dtype).astype(jnp.float32)
    table = self.param(name, nn.with_logical_partitioning(init, ("modality", self.feature_axis)),
                       (self.num_groups, d), self.param_dtype).astype(jnp.float32)
    per_token = jnp.take(table, groups, axis=0)  # [*groups.shape, D]
    extra = x.ndim - groups.ndim - 1
    return per_token.reshape(*groups.shape, *(1,) * extra, d)
