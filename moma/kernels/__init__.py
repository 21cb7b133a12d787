"""Grouped matmul for expert / modality dispatch (contract: ../shared/DESIGN.md).

Bootstrap version: only the reference implementation. Issue #3 adds the fast ones behind the same API.
"""

import jax
import jax.numpy as jnp


def gmm(lhs, rhs, group_sizes, *, impl="auto", preferred_element_type=None, interpret=False):
  """out[i] = lhs[i] @ rhs[g(i)] where rows are contiguous groups; rows past sum(group_sizes) are zero."""
  del impl, interpret
  out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
  ends = jnp.cumsum(group_sizes)
  row_group = jnp.searchsorted(ends, jnp.arange(lhs.shape[0]), side="right")
  out = jnp.zeros((lhs.shape[0], rhs.shape[2]), out_dtype)
  for g in range(rhs.shape[0]):
    y = jnp.dot(lhs, rhs[g], preferred_element_type=out_dtype)
    out = jnp.where((row_group == g)[:, None], y, out)
  return out
