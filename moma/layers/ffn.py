"""SwiGLU feed-forward, untied per modality on demand (MoT): dispatch once, one grouped SwiGLU, combine once."""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moma import dispatch


class SwiGLU(nn.Module):
  """x_BLD → down(silu(gate(x)) * up(x)); weights per modality when "ffn" is in `untie`."""

  d_ff: int
  num_modalities: int = 1
  untie: Sequence[str] = ()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  gmm_impl: str = "auto"

  @nn.compact
  def __call__(self, x_BLD: jax.Array, plan: dispatch.Plan) -> jax.Array:
    untied = "ffn" in self.untie
    plan = plan.use_if(untied)
    groups = self.num_modalities if untied else 1
    kernel = lambda name, features, in_axis, out_axes, in_dim: dispatch.GroupedKernel(
        features, num_groups=groups, in_axis=in_axis, out_axes=out_axes, param_dtype=self.param_dtype,
        name=name)(in_dim)
    d = x_BLD.shape[-1]
    wi = kernel("wi", (2, self.d_ff), "embed", (None, "mlp"), d)  # gate and up: one matmul, [(G,) D, 2, F]
    wo = kernel("wo", d, "mlp", ("embed",), self.d_ff)
    y_RD = dispatch.grouped_swiglu(plan.dispatch(x_BLD), plan, wi, wo, impl=self.gmm_impl, dtype=self.dtype)
    return plan.combine(y_RD, x_BLD.shape[:-1])
