"""The one dispatch mechanism: per-token decisions → a `Plan` → rows grouped by weight → grouped matmul → back.

Every sparse layer asks, per token, which weights it uses, and answers with a `Plan`:

* `partition(group_ids)`: MoT / Mixture-of-Mamba modality groups (a permutation; the decoder builds it once
  per forward pass and hands it to every layer);
* `token_choice(expert_ids_MK)`: top-k MoE, rows = tokens·k sorted by expert (id E = dropped);
* `expert_choice(...)`: expert-choice MoMa, each expert takes a static number of rows;
* `selection(index_K)`: Mixture-of-Depths, the rows are the selected tokens.

`plan.dispatch(x) → rows` and `plan.combine(rows, weights) → x` are gathers in both directions (custom
VJPs: each one's gradient is the other's gather, never a scatter-add); `plan.group_sizes` feed
`moma.kernels.gmm` through `grouped_matmul` / `grouped_swiglu`, which also carry the weights.

**Mesh-aware.** Under `moma.sharding.activate`, plans are built, and rows dispatched and combined, inside
`jax.shard_map` over the batch mesh axes (`moma.sharding.on_shards`): each device plans over its own tokens,
so a plan's arrays are the concatenation of per-device plans with per-device indices, and nothing about them
crosses devices. Other mesh axes (`tensor`) stay automatic (GSPMD) inside. When a layer's group axis (`modality` or
`expert`) is sharded over a batch mesh axis, each group's weights live on their devices and rows travel
there and back (`moma.expert_parallel`). With no mesh, all of this is the plain single-device computation.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moma import expert_parallel
from moma import kernels
from moma import sharding
from moma.kernels.layout import row_groups


# -------------------------------------------------------------------------------------------------- plans


@flax.struct.dataclass
class Plan:
  """How tokens become rows and back. M tokens, K choices per token, R rows, G groups (all per device).

  slot_of_row: int32 [R], row r holds token slot // K's choice slot % K; slot ≥ M·K: a padding row.
  row_of_slot: int32 [M, K], the row holding each choice; ≥ R: none (it contributes zero).
  group_sizes: int32 [G], rows per group in group order; rows past their sum are padding.
  group_of_token: int32 [M], each token's group (partition plans only; None elsewhere).
  Both index arrays are None for the identity plan (one group, rows = tokens).
  """

  slot_of_row: jax.Array | None
  row_of_slot: jax.Array | None
  group_sizes: jax.Array
  num_groups: int = flax.struct.field(pytree_node=False)
  group_of_token: jax.Array | None = None

  @property
  def is_identity(self) -> bool:
    return self.slot_of_row is None

  def dispatch(self, x: jax.Array) -> jax.Array:
    """[..., D] tokens → [R, D] rows (padding rows are zero; integer ids too, without a gradient)."""
    x_MD = x.reshape(-1, x.shape[-1])
    if self.is_identity:
      return x_MD
    gather = _dispatch if jnp.issubdtype(x.dtype, jnp.inexact) else _gather_rows
    return sharding.on_shards(lambda p, x: gather(x, p.slot_of_row, p.row_of_slot), (self, x_MD))

  def combine(self, rows_RD: jax.Array, lead_shape: Sequence[int],
              weights_MK: jax.Array | None = None) -> jax.Array:
    """[R, ...] rows → tokens with leading dims `lead_shape`: sum over each token's K rows, weighted."""
    if self.is_identity:
      return rows_RD.reshape(*lead_shape, *rows_RD.shape[1:])
    flat_RF = rows_RD.reshape(rows_RD.shape[0], -1)

    def local(p, rows, *w):
      y_MKF = _combine(rows, p.row_of_slot, p.slot_of_row)
      if not w:
        return y_MKF.sum(1)
      return jnp.einsum("mk,mkf->mf", w[0].astype(y_MKF.dtype), y_MKF)

    args = (self, flat_RF) + (() if weights_MK is None else (weights_MK,))
    return sharding.on_shards(local, args).reshape(*lead_shape, *rows_RD.shape[1:])

  def use_if(self, untied: bool) -> Plan:
    """This plan for a layer whose weights are untied, else the identity (plain dense, no sort)."""
    return self if untied or self.num_groups == 1 else identity_plan()


def identity_plan() -> Plan:
  return Plan(None, None, jnp.zeros((0,), jnp.int32), 1)


def partition(group_ids: jax.Array, num_groups: int) -> Plan:
  """Rows = tokens sorted by group id (stable); ids of any shape, values in [0, num_groups)."""
  if num_groups == 1:
    return identity_plan()
  ids_M = group_ids.reshape(-1).astype(jnp.int32)
  plan = sharding.on_shards(lambda ids: _sorted_plan(ids[:, None], num_groups, num_groups), (ids_M,))
  return plan.replace(group_of_token=ids_M)


def token_choice(expert_ids_MK: jax.Array, num_experts: int) -> Plan:
  """Rows = (token, choice) pairs sorted by expert; id `num_experts` marks a dropped choice (no row)."""
  return sharding.on_shards(lambda ids: _sorted_plan(ids, num_experts + 1, num_experts),
                   (expert_ids_MK.astype(jnp.int32),))


def _sorted_plan(ids_MK: jax.Array, num_ids: int, num_groups: int) -> Plan:
  """Slots sorted by id; ids ≥ num_groups get no row (their rows sort last and are padding)."""
  m, k = ids_MK.shape
  flat = ids_MK.reshape(-1)
  perm = jnp.argsort(flat, stable=True).astype(jnp.int32)
  inv = jnp.zeros_like(perm).at[perm].set(jnp.arange(m * k, dtype=jnp.int32), unique_indices=True)
  sizes = jnp.bincount(flat, length=num_ids).astype(jnp.int32)[:num_groups]
  if num_ids > num_groups:
    real = jnp.arange(m * k) < sizes.sum()
    perm, inv = jnp.where(real, perm, m * k), jnp.where(flat < num_groups, inv, m * k)
  return Plan(perm, inv.reshape(m, k), sizes, num_groups)


def expert_choice(picks: Sequence[tuple[jax.Array, jax.Array]], *, slice_tokens: int,
                  expert_slot: Sequence[int], slots: int) -> Plan:
  """Rows = every expert's picks, expert-major: expert e owns the [n, C] rows of its picks in n slices.

  picks: one (top_NEC, valid_NEC) per block of experts with one capacity C: top is the token (index inside
  its routing slice of `slice_tokens` tokens) that expert e picked c-th in slice n; valid says the pick is
  real (a filler pick outside the expert's group gets a padding row). expert_slot[e]: the choice slot (of
  `slots`) expert e fills in `row_of_slot`, i.e. its index inside its group.
  """

  def local(*flat):
    tops, valids = flat[0::2], flat[1::2]
    n = tops[0].shape[0]
    num_slots = n * slice_tokens * slots
    slot_of_row, sizes, first = [], [], 0
    for top, valid in zip(tops, valids):
      e, c = top.shape[1:]
      token = top + slice_tokens * jnp.arange(n, dtype=jnp.int32)[:, None, None]
      slot = token * slots + jnp.asarray(expert_slot[first:first + e], jnp.int32)[None, :, None]
      slot_of_row.append(jnp.where(valid, slot, num_slots).transpose(1, 0, 2).reshape(-1))
      sizes.append(jnp.full((e,), n * c, jnp.int32))
      first += e
    slot_of_row = jnp.concatenate(slot_of_row)
    rows = jnp.arange(slot_of_row.shape[0], dtype=jnp.int32)
    row_of_slot = jnp.full((num_slots,), rows.shape[0], jnp.int32).at[slot_of_row].set(rows, mode="drop")
    return Plan(slot_of_row, row_of_slot.reshape(-1, slots), jnp.concatenate(sizes), first)

  return sharding.on_shards(local, tuple(a for top, valid in picks for a in (top.astype(jnp.int32), valid)))


def selection(index_NK: jax.Array, *, slice_tokens: int) -> Plan:
  """Rows = the tokens `index_NK` picks (index inside each of n slices of `slice_tokens`), in that order."""

  def local(index):
    n, k = index.shape
    token = (index + slice_tokens * jnp.arange(n, dtype=jnp.int32)[:, None]).reshape(-1)
    row_of_slot = jnp.full((n * slice_tokens,), n * k, jnp.int32).at[token].set(
        jnp.arange(n * k, dtype=jnp.int32), unique_indices=True)
    return Plan(token, row_of_slot[:, None], jnp.full((1,), n * k, jnp.int32), 1)

  return sharding.on_shards(local, (index_NK.astype(jnp.int32),))


# ------------------------------------------------------------------------------ gathers, both directions


def _gather_rows(x_MD, slot_of_row_R, row_of_slot_MK):
  """rows[r] = x[slot_of_row[r] // K] (zero for padding rows)."""
  k = row_of_slot_MK.shape[1]
  return jnp.take(x_MD, slot_of_row_R // k, axis=0, mode="fill", fill_value=0)


_dispatch = jax.custom_vjp(_gather_rows)


def _dispatch_fwd(x_MD, slot_of_row_R, row_of_slot_MK):
  return _dispatch(x_MD, slot_of_row_R, row_of_slot_MK), (slot_of_row_R, row_of_slot_MK)


def _dispatch_bwd(residuals, ct_RD):
  slot_of_row_R, row_of_slot_MK = residuals  # d x[m] = Σ_k ct[row_of_slot[m, k]]: a gather
  return _combine(ct_RD, row_of_slot_MK, slot_of_row_R).sum(1), None, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def _combine(rows_RD, row_of_slot_MK, slot_of_row_R):
  """[M, K, D]: the row of each (token, choice) (zero where there is none)."""
  return jnp.take(rows_RD, row_of_slot_MK, axis=0, mode="fill", fill_value=0)


def _combine_fwd(rows_RD, row_of_slot_MK, slot_of_row_R):
  return _combine(rows_RD, row_of_slot_MK, slot_of_row_R), (row_of_slot_MK, slot_of_row_R)


def _combine_bwd(residuals, ct_MKD):
  row_of_slot_MK, slot_of_row_R = residuals  # d rows[r] = ct[slot_of_row[r]]: a gather
  ct = ct_MKD.reshape(-1, ct_MKD.shape[-1])
  return jnp.take(ct, slot_of_row_R, axis=0, mode="fill", fill_value=0), None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


# ------------------------------------------------------------------------------------ grouped weights


def grouped_matmul(rows_RK: jax.Array, kernel: jax.Array, plan: Plan, *, impl: str = "auto",
                   dtype: Any = jnp.float32, group_axis: str = "modality") -> jax.Array:
  """rows [R, K] of `plan` → [R, N]: a dense dot for a [K, N] kernel, `gmm` for a [G, K, N] one."""
  x, w = rows_RK.astype(dtype), kernel.astype(dtype)
  if w.ndim == 2:
    return jnp.dot(x, w, preferred_element_type=dtype)
  if w.shape[0] != plan.num_groups:
    raise ValueError(f"grouped_matmul: kernel has {w.shape[0]} groups, plan has {plan.num_groups}")
  fn = lambda rows, sizes, w: kernels.gmm(rows, w, sizes, impl=impl, preferred_element_type=dtype)
  return run_grouped(fn, x, plan, w, group_axis=group_axis)


def grouped_swiglu(rows_RD: jax.Array, plan: Plan, wi: jax.Array, wo: jax.Array, *, impl: str = "auto",
                   dtype: Any = jnp.float32, group_axis: str = "modality",
                   static_sizes: Sequence[int] | None = None) -> jax.Array:
  """down(silu(gate(x)) · up(x)) over rows grouped by `plan`: the MoT FFN and every MoE expert.

  wi: gate and up fused, [(G,) D, 2, F] (one matmul); wo: [(G,) F, D] (`layers.ffn.swiglu_kernels`).
  `static_sizes`: each group's rows on every device when they are known at trace time (expert choice).
  """
  x, wi, wo = (a.astype(dtype) for a in (rows_RD, wi, wo))
  batched = lambda a, w: jnp.einsum("...rd,...df->...rf", a, w, preferred_element_type=dtype)
  if wo.ndim == 2:
    return _swiglu(x, wi, wo, batched)

  def fn(rows, sizes, wo, wi):
    if not isinstance(sizes, tuple):
      return _swiglu(rows, wi, wo, lambda a, w: kernels.gmm(a, w, sizes, impl=impl, preferred_element_type=dtype))
    # Static sizes: one batched matmul per run of equal-size groups.
    if sum(sizes) != rows.shape[0]:
      raise ValueError(f"grouped_swiglu: static_sizes {sizes} do not add up to this device's "
                       f"{rows.shape[0]} rows")
    runs = [(size, len(list(same))) for size, same in itertools.groupby(sizes)]
    # Split, not index: a split's gradient is one concatenate, indexed slices' are zero-padded adds.
    split = lambda w: jnp.split(w, np.cumsum([n for _, n in runs])[:-1])
    rows_r = jnp.split(rows, np.cumsum([size * n for size, n in runs])[:-1])
    return jnp.concatenate([
        _swiglu(r.reshape(n, size, -1), w_in, w_out, batched).reshape(n * size, -1)
        for r, (size, n), w_in, w_out in zip(rows_r, runs, split(wi), split(wo))])

  return run_grouped(fn, x, plan, wo, wi, group_axis=group_axis, static_sizes=static_sizes)


def _swiglu(x, wi, wo, matmul):
  """SwiGLU of rows x with fused wi [.., D, 2, F] and wo [.., F, D]; `matmul(a, w)`: dense, batched or gmm."""
  f = wi.shape[-1]
  h = matmul(x, wi.reshape(*wi.shape[:-2], -1))
  return matmul(nn.silu(h[..., :f]) * h[..., f:], wo)


def run_grouped(fn: Callable, rows_RD: jax.Array, plan: Plan, *weights: jax.Array, group_axis: str,
                static_sizes: Sequence[int] | None = None) -> jax.Array:
  """fn(rows, group_sizes, *weights) per device, where weights' leading axis holds the G groups.

  group_sizes is a tuple of ints when `static_sizes` gives them (rows per group on every device, known at
  trace time), else the plan's int32 array. When `group_axis` is split over a batch mesh axis, each device
  holds only its groups: rows travel to the devices holding their group and back
  (`moma.expert_parallel.exchange`)."""
  static = None if static_sizes is None else tuple(int(n) for n in static_sizes)
  axes = sharding.batch_axes()
  expert_axes = tuple(a for a in sharding.mesh_axes(group_axis) if a in axes)
  if not expert_axes:
    if static is not None:
      return sharding.on_shards(lambda rows, *w: fn(rows, static, *w), (rows_RD,), weights)
    return sharding.on_shards(fn, (rows_RD, plan.group_sizes), weights)
  if len(expert_axes) > 1:
    raise ValueError(f"logical axis {group_axis!r} maps to several batch mesh axes {expert_axes}; map it to "
                     "one (config.mesh.rules)")
  (axis,) = expert_axes
  mesh = jax.sharding.get_abstract_mesh()
  if plan.num_groups % mesh.shape[axis]:
    raise ValueError(f"{plan.num_groups} groups ({group_axis!r}) do not divide over mesh axis {axis!r} of "
                     f"size {mesh.shape[axis]}: change config.mesh.shape, or keep them whole with "
                     f"config.mesh.rules=(({group_axis!r}, None),)")
  equal = static is not None and len(set(static)) == 1

  def local(rows, sizes, *w):
    return expert_parallel.exchange(fn, rows, row_groups(sizes, rows.shape[0]), w,
                                    num_groups=plan.num_groups, axis=axis, equal_groups=equal)

  return sharding.on_shards(local, (rows_RD, plan.group_sizes), weights,
                   weight_specs=tuple(P(axis) for _ in weights))


class GroupedKernel(nn.Module):
  """The weight of a grouped linear layer: [in, *features] for one group, [G, in, *features] otherwise.

  Annotated with logical axes (group_axis, in_axis, *out_axes) so the mesh rules decide its sharding.
  """

  features: int | Sequence[int]
  num_groups: int = 1
  in_axis: str = "embed"
  out_axes: Sequence[str | None] = ("mlp",)
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
  """y[r] = x[r] @ W[group(r)] over the rows of `plan`; a plain dense layer when num_groups == 1."""

  use_bias: bool = False
  dtype: Any = jnp.float32
  gmm_impl: str = "auto"

  @nn.compact
  def __call__(self, rows: jax.Array, plan: Plan) -> jax.Array:
    features = self._features()
    if plan.num_groups != self.num_groups and self.num_groups != 1:
      raise ValueError(f"GroupedDense: plan has {plan.num_groups} groups, layer has {self.num_groups}")
    kernel = self._kernel(rows.shape[-1])
    kernel = kernel.reshape(*kernel.shape[:-len(features)], -1)  # [(G,) in, N]
    y = grouped_matmul(rows, kernel, plan, impl=self.gmm_impl, dtype=self.dtype, group_axis=self.group_axis)
    y = y.reshape(*y.shape[:-1], *features)
    if self.use_bias:
      grouped = self.num_groups > 1
      bshape = ((self.num_groups,) if grouped else ()) + tuple(features)
      baxes = ((self.group_axis,) if grouped else ()) + tuple(self.out_axes)
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, baxes), bshape,
                        self.param_dtype).astype(self.dtype)
      y = add_per_group(y, bias, plan) if grouped else y + bias
    return y


def add_per_group(y_RF: jax.Array, per_group_GF: jax.Array, plan: Plan) -> jax.Array:
  """y[r] + per_group[group(r)] for the rows of `plan` (e.g. a per-group bias; padding rows get the last)."""
  def local(sizes, y, per_group):
    groups_R = jnp.minimum(row_groups(sizes, y.shape[0]), plan.num_groups - 1)
    return y + jnp.take(per_group, groups_R, axis=0)
  return sharding.on_shards(local, (plan.group_sizes, y_RF), (per_group_GF,))


def per_group_init(init: Callable) -> Callable:
  """Apply a dense initialiser to each group's [in, *out] slice, so fan-in excludes the group axis."""

  def grouped_init(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, shape[0])
    return jax.vmap(lambda k: init(k, shape[1:], dtype))(keys)

  return grouped_init
