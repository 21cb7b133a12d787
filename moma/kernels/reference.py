"""Reference twins: plain, obviously correct, and slow (G× the work). The test oracle for every impl."""

import jax
import jax.numpy as jnp

from moma.kernels.layout import row_groups


def gmm(lhs_MK, rhs_GKN, group_sizes_G, out_dtype):
  """out[i] = lhs[i] @ rhs[group(i)], zero for rows past sum(group_sizes)."""
  row_group_M = row_groups(group_sizes_G, lhs_MK.shape[0])
  out_MN = jnp.zeros((lhs_MK.shape[0], rhs_GKN.shape[2]), out_dtype)
  for g in range(rhs_GKN.shape[0]):
    y_MN = jnp.dot(lhs_MK, rhs_GKN[g], preferred_element_type=out_dtype)
    out_MN = jnp.where((row_group_M == g)[:, None], y_MN, out_MN)
  return out_MN


def tgmm(lhs_MK, dout_MN, group_sizes_G, out_dtype):
  """out[g] = lhs[rows of g]ᵀ @ dout[rows of g]: the rhs gradient of `gmm`."""
  num_groups = group_sizes_G.shape[0]
  onehot_MG = row_groups(group_sizes_G, lhs_MK.shape[0])[:, None] == jnp.arange(num_groups)
  return jnp.einsum("mg,mk,mn->gkn", onehot_MG.astype(out_dtype), lhs_MK.astype(out_dtype),
                    dout_MN.astype(out_dtype))
