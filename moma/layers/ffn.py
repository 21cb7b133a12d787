"""SwiGLU feed-forward, untied per modality on demand (MoT): sort once, grouped gate/up and down, unsort once."""

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
  def __call__(self, x_BLD: jax.Array, plan: dispatch.SortPlan) -> jax.Array:
    untied = "ffn" in self.untie
    plan = plan.use_if(untied)
    groups = self.num_modalities if untied else 1
    dense = lambda name, features, in_axis, out_axes: dispatch.GroupedDense(
        features, num_groups=groups, in_axis=in_axis, out_axes=out_axes, dtype=self.dtype,
        param_dtype=self.param_dtype, gmm_impl=self.gmm_impl, name=name)
    rows_MD = plan.sort(x_BLD)
    # gate and up share one grouped matmul: [M, 2, F].
    gate_up_M2F = dense("wi", (2, self.d_ff), "embed", (None, "mlp"))(rows_MD, plan)
    hidden_MF = nn.silu(gate_up_M2F[:, 0]) * gate_up_M2F[:, 1]
    y_MD = dense("wo", x_BLD.shape[-1], "mlp", ("embed",))(hidden_MF, plan)
    return plan.unsort(y_MD, x_BLD.shape[:-1])
