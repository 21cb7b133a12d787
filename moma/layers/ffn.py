"""SwiGLU feed-forward, untied per modality on demand (MoT): dispatch once, one grouped SwiGLU, combine once."""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moma import dispatch


def swiglu_kernels(d: int, d_ff: int, num_groups: int, param_dtype: Any, group_axis: str = "modality"):
  """(wi [(G,) D, 2, F]: gate and up fused for one matmul, wo [(G,) F, D]) as `GroupedKernel`s named
  "wi" / "wo" in the calling module: the MoT FFN's weights (groups = modalities) and MoE's (experts)."""
  kernel = lambda name, features, in_axis, out_axes, in_dim: dispatch.GroupedKernel(
      features, num_groups=num_groups, in_axis=in_axis, out_axes=out_axes, group_axis=group_axis,
      param_dtype=param_dtype, name=name)(in_dim)
  return (kernel("wi", (2, d_ff), "embed", (None, "mlp"), d),
          kernel("wo", d, "mlp", ("embed",), d_ff))


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
    wi, wo = swiglu_kernels(x_BLD.shape[-1], self.d_ff, groups, self.param_dtype)
    y_RD = dispatch.grouped_swiglu(plan.dispatch(x_BLD), plan, wi, wo, impl=self.gmm_impl, dtype=self.dtype)
    return plan.combine(y_RD, x_BLD.shape[:-1])
