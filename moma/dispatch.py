"""The one dispatch mechanism: group ids → sort plan → grouped matmul → unsort.

MoT and Mixture-of-Mamba group tokens by modality, MoMa by expert inside a modality, plain MoE by expert.
The modality ids are the same in every layer, so the decoder builds one `SortPlan` per forward pass and
hands it to every layer. With one group the plan is the identity: no gather, no sort, a plain dense matmul.

Layout convention: a layer calls `rows = plan.sort(x_BLD)` once, runs any number of `GroupedDense` on the
sorted rows (e.g. gate, up and down projections of an FFN) and calls `plan.unsort(rows, x_BLD.shape[:-1])`
once at the end. A layer that fuses several weights into one matmul (attention's q and kv) creates them
with `GroupedKernel` and calls `grouped_matmul` on their concatenation. Sort and unsort differentiate
into each other (a gather, never a scatter-add).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from moma import kernels


@flax.struct.dataclass
class SortPlan:
  """How the rows of a flattened [M, ...] activation are grouped.

  group_sizes: int32 [G], rows per group in group order (sums to M).
  perm: int32 [M], sorted row r holds token perm[r] (None when G == 1: the identity).
  inv_perm: int32 [M], token t sits at sorted row inv_perm[t] (None when G == 1).
  """

  group_sizes: jax.Array
  perm: jax.Array | None
  inv_perm: jax.Array | None
  num_groups: int = flax.struct.field(pytree_node=False)

  def sort(self, x: jax.Array) -> jax.Array:
    """[..., D] in token order → [M, D] rows sorted by group (stable inside a group)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if self.perm is None else _permute_rows(rows, self.perm, self.inv_perm)

  def unsort(self, rows: jax.Array, lead_shape: Sequence[int]) -> jax.Array:
    """[M, ...] sorted rows → token order with leading dims `lead_shape` (e.g. (B, L))."""
    if self.inv_perm is not None:
      rows = _permute_rows(rows, self.inv_perm, self.perm)
    return rows.reshape(*lead_shape, *rows.shape[1:])

  def use_if(self, untied: bool) -> SortPlan:
    """This plan for a layer whose weights are untied, else the identity plan (plain dense, no sort)."""
    if untied or self.num_groups == 1:
      return self
    return SortPlan(jnp.sum(self.group_sizes, keepdims=True), None, None, 1)


@jax.custom_vjp
def _permute_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """x[index] along axis 0 for a permutation `index` with inverse `inverse`.

  Its gradient is the inverse permutation's gather, ct[inverse], not the scatter-add that autodiff of a
  gather gives (scatters are slow on CPU and serialise on accelerators).
  """
  return x.at[index].get(mode="promise_in_bounds", unique_indices=True)


def _permute_rows_fwd(x, index, inverse):
  return _permute_rows(x, index, inverse), (index, inverse)


def _permute_rows_bwd(residuals, ct):
  index, inverse = residuals
  return _permute_rows(ct, inverse, index), None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def make_plan(group_ids: jax.Array, num_groups: int) -> SortPlan:
  """Sort plan for integer group ids of any shape (values in [0, num_groups)); jit-able, no host sync."""
  ids = group_ids.reshape(-1).astype(jnp.int32)
  if num_groups == 1:
    return SortPlan(jnp.array([ids.shape[0]], jnp.int32), None, None, 1)
  perm = jnp.argsort(ids, stable=True).astype(jnp.int32)
  inv_perm = jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=jnp.int32))
  group_sizes = jnp.bincount(ids, length=num_groups).astype(jnp.int32)
  return SortPlan(group_sizes, perm, inv_perm, num_groups)


class GroupedKernel(nn.Module):
  """The weight of a grouped linear layer: [in, *features] for one group, [G, in, *features] otherwise.

  Annotated with logical axes (group_axis, in_axis, *out_axes) so the mesh rules decide its sharding. Used
  alone when a layer fuses several weights into one `grouped_matmul` (attention's q and kv).
  """

  features: int | Sequence[int]
  num_groups: int = 1
  in_axis: str = "embed"
  out_axes: Sequence[str] = ("mlp",)
  group_axis: str = "modality"
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, in_dim: int) -> jax.Array:
    return self._kernel(in_dim)

  def _features(self) -> tuple[int, ...]:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    if len(self.out_axes) != len(features):
      raise ValueError(f"{type(self).__name__}: out_axes {self.out_axes} must name each of features "
                       f"{features}")
    return features

  def _kernel(self, in_dim: int) -> jax.Array:
    grouped = self.num_groups > 1
    shape = ((self.num_groups,) if grouped else ()) + (in_dim, *self._features())
    axes = ((self.group_axis,) if grouped else ()) + (self.in_axis, *self.out_axes)
    # fan-in is `in_dim` for every group: initialise each group's matrix like a dense layer's.
    init = per_group_init(self.kernel_init) if grouped else self.kernel_init
    return self.param("kernel", nn.with_logical_partitioning(init, axes), shape, self.param_dtype)


class GroupedDense(GroupedKernel):
  """y[r] = x[r] @ W[group(r)] over rows sorted by `plan`; a plain dense layer when num_groups == 1."""

  use_bias: bool = False
  dtype: Any = jnp.float32
  gmm_impl: str = "auto"

  @nn.compact
  def __call__(self, rows: jax.Array, plan: SortPlan) -> jax.Array:
    features = self._features()
    if plan.num_groups != self.num_groups and self.num_groups != 1:
      raise ValueError(f"GroupedDense: plan has {plan.num_groups} groups, layer has {self.num_groups}")
    kernel = self._kernel(rows.shape[-1])
    kernel = kernel.reshape(*kernel.shape[:-len(features)], -1)  # [(G,) in, N]
    y = grouped_matmul(rows, kernel, plan, impl=self.gmm_impl, dtype=self.dtype)
    y = y.reshape(*y.shape[:-1], *features)
    if self.use_bias:
      grouped = self.num_groups > 1
      bshape = ((self.num_groups,) if grouped else ()) + tuple(features)
      baxes = ((self.group_axis,) if grouped else ()) + tuple(self.out_axes)
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, baxes), bshape,
                        self.param_dtype).astype(self.dtype)
      y = y + (group_rows(bias, plan, y.shape[0]) if grouped else bias)
    return y


def grouped_matmul(rows_MK: jax.Array, kernel: jax.Array, plan: SortPlan, *, impl: str = "auto",
                   dtype: Any = jnp.float32) -> jax.Array:
  """rows [M, K] sorted by `plan` → [M, N]: a dense dot for a [K, N] kernel, `gmm` for a [G, K, N] one."""
  x, w = rows_MK.astype(dtype), kernel.astype(dtype)
  if w.ndim == 2:
    return jnp.dot(x, w, preferred_element_type=dtype)
  if w.shape[0] != plan.num_groups:
    raise ValueError(f"grouped_matmul: kernel has {w.shape[0]} groups, plan has {plan.num_groups}")
  return kernels.gmm(x, w, plan.group_sizes, impl=impl, preferred_element_type=dtype)


def group_rows(per_group: jax.Array, plan: SortPlan, num_rows: int) -> jax.Array:
  """Broadcast a per-group array [G, ...] to the sorted rows [M, ...] (row r gets its group's entry)."""
  ends = jnp.cumsum(plan.group_sizes)
  row_group = jnp.searchsorted(ends, jnp.arange(num_rows), side="right")
  return jnp.take(per_group, jnp.minimum(row_group, plan.num_groups - 1), axis=0)


def per_group_init(init: Callable) -> Callable:
  """Apply a dense initialiser to each group's [in, *out] slice, so fan-in excludes the group axis."""

  def grouped_init(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, shape[0])
    return jax.vmap(lambda k: init(k, shape[1:], dtype))(keys)

  return grouped_init
