"""Expert parallelism: send each token row to the device that holds its group's weights, and back.

Plain GSPMD is already correct for grouped weights sharded over the `expert` mesh axis, but it moves whole
activations (it all-gathers the tokens that a global sort plan needs). `grouped(fn, x_MD, group_M, params)`
instead runs inside `jax.shard_map`: every device sorts its own tokens by group, ships each block to the
device owning those groups, runs `fn` on the rows it received (its local groups only), and ships the results
back. Per device and direction this moves only its own token rows.

Two transports with one buffer layout (row slot `src * T + j` holds row j sent by device `src`, T = local
tokens, unused slots are padding sorted past the last group, where gmm yields zeros):

* "all_to_all": dense `lax.all_to_all` of [E, T, D] blocks (static capacity T per peer, so nothing is ever
  dropped); runs on every backend, XLA:CPU included (which lacks ragged_all_to_all, jax issue 34755);
* "ragged": `lax.ragged_all_to_all`, sending only the real rows (GPU/TPU).

"auto" picks "ragged" on GPU/TPU and "all_to_all" elsewhere. Both equal the single-device computation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moma import dispatch

GroupFn = Callable[[jax.Array, dispatch.SortPlan, Any], jax.Array]


def grouped(fn: GroupFn, x_MD: jax.Array, group_M: jax.Array, params: Any, *, num_groups: int,
            expert_axis: str = "expert", token_axes: tuple[str, ...] | None = None,
            impl: str = "auto") -> jax.Array:
  """y[m] = fn(rows of group g(m), plan, params)[m], with params' leading axis (the G groups) sharded.

  fn(rows_RD, plan, params) gets rows sorted by group under `plan` (rows past sum(plan.group_sizes) are
  padding; `moma.kernels.gmm` gives zeros there) and params holding this device's groups only; it returns
  [R, F]. x_MD is sharded over `token_axes` (default: the mesh axes of the logical `batch` axis under the
  active `nn.logical_axis_rules`), which must include `expert_axis`. Without a mesh this is the plain
  single-device computation; on a mesh without an expert axis every device sorts only its own tokens (a
  GSPMD sort plan over the global batch would gather all tokens on every device).
  """
  if impl not in ("auto", "all_to_all", "ragged"):
    raise ValueError(f"expert_parallel impl={impl!r} must be 'auto', 'all_to_all' or 'ragged'")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _local(fn, x_MD, group_M, params, num_groups)
  num_shards = mesh.shape[expert_axis] if expert_axis in mesh.axis_names else 1
  if num_groups % num_shards:
    raise ValueError(f"expert parallelism: {num_groups} groups are not divisible by mesh axis "
                     f"{expert_axis!r} (size {num_shards}); change config.mesh.shape")
  if token_axes is None:
    spec = nn.logical_to_mesh_axes(("batch",))
    entry = spec[0] if spec is not None and len(spec) else None
    token_axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
  if num_shards == 1:  # no expert axis: each device sorts and computes its own tokens, all groups' weights
    body = lambda x, g, p: _local(fn, x, g, p, num_groups)
    return jax.shard_map(body, in_specs=(P(token_axes), P(token_axes), jax.tree.map(lambda _: P(), params)),
                         out_specs=P(token_axes))(x_MD, group_M, params)
  if expert_axis not in token_axes:
    raise ValueError(f"expert parallelism: tokens must be sharded over {expert_axis!r} too (got token axes "
                     f"{token_axes}); map 'batch' to include it in config.mesh.rules")
  if impl == "auto":
    impl = "ragged" if jax.default_backend() in ("gpu", "tpu") else "all_to_all"
  body = lambda x, g, p: _expert_parallel_body(fn, x, g, p, num_groups // num_shards, num_shards,
                                               expert_axis, impl)
  param_specs = jax.tree.map(lambda _: P(expert_axis), params)
  return jax.shard_map(body, in_specs=(P(token_axes), P(token_axes), param_specs),
                       out_specs=P(token_axes))(x_MD, group_M, params)


def _local(fn, x_MD, group_M, params, num_groups):
  plan = dispatch.make_plan(group_M, num_groups)
  return plan.unsort(fn(plan.sort(x_MD), plan, params), x_MD.shape[:1])


def _expert_parallel_body(fn, x_TD, group_T, params, local_groups, num_shards, axis, impl):
  """Per device: T local tokens → rows for this device's `local_groups` groups → fn → back to token order."""
  t = x_TD.shape[0]
  order_T = jnp.argsort(group_T, stable=True)  # group-sorted, hence destination-contiguous
  group_sorted_T = group_T[order_T]
  dest_counts_E = jnp.bincount(group_sorted_T // local_groups, length=num_shards).astype(jnp.int32)
  dest_starts_E = jnp.cumsum(dest_counts_E) - dest_counts_E
  transport = _ragged if impl == "ragged" else _dense
  send = lambda rows: transport(rows, dest_starts_E, dest_counts_E, t, num_shards, axis, forward=True)
  recv_RD = send(x_TD[order_T])
  local_R = send((group_sorted_T % local_groups)[:, None])[:, 0]
  slot_valid_R = _slot_valid(dest_counts_E, t, num_shards, axis)
  local_R = jnp.where(slot_valid_R, local_R, local_groups)  # padding slots sort past the last group
  plan = dispatch.make_plan(local_R, local_groups + 1)
  plan = dispatch.SortPlan(plan.group_sizes[:local_groups], plan.perm, plan.inv_perm, local_groups)
  y_RF = plan.unsort(fn(plan.sort(recv_RD), plan, params), (num_shards * t,))
  y_sorted_TF = transport(y_RF, dest_starts_E, dest_counts_E, t, num_shards, axis, forward=False)
  return jnp.zeros_like(y_sorted_TF).at[order_T].set(y_sorted_TF)


def _slot_valid(dest_counts_E, t, num_shards, axis):
  """Which of this device's E*T receive slots hold a real row (slot src*T + j, j < rows src sent here)."""
  recv_counts_E = jax.lax.all_to_all(dest_counts_E, axis, 0, 0, tiled=True)
  return (jnp.arange(t)[None, :] < recv_counts_E[:, None]).reshape(num_shards * t)


def _dense(rows, starts_E, counts_E, t, num_shards, axis, forward):
  """Static-capacity transport: one [E, T, X] all_to_all (slot j of block e: sorted row starts[e] + j)."""
  idx_ET = starts_E[:, None] + jnp.arange(t)[None, :]
  valid_ET = jnp.arange(t)[None, :] < counts_E[:, None]
  if forward:
    blocks = jnp.where(valid_ET[..., None], jnp.take(rows, jnp.minimum(idx_ET, t - 1), axis=0), 0)
    return jax.lax.all_to_all(blocks, axis, 0, 0, tiled=True).reshape(num_shards * t, -1)
  back_ETX = jax.lax.all_to_all(rows.reshape(num_shards, t, -1), axis, 0, 0, tiled=True)
  dst = jnp.where(valid_ET, idx_ET, t).reshape(-1)  # padding slots scatter out of range and are dropped
  return jnp.zeros((t, rows.shape[-1]), rows.dtype).at[dst].set(back_ETX.reshape(num_shards * t, -1),
                                                                   mode="drop")


def _ragged(rows, starts_E, counts_E, t, num_shards, axis, forward):
  """`ragged_all_to_all` transport with the same slot layout as `_dense`, moving only real rows."""
  me = jax.lax.axis_index(axis)
  recv_counts_E = jax.lax.all_to_all(counts_E, axis, 0, 0, tiled=True)
  if forward:  # my block for peer e goes to slot me * T of e's buffer
    out = jnp.zeros_like(rows, shape=(num_shards * t, rows.shape[-1]))  # typed varying like rows
    return jax.lax.ragged_all_to_all(rows, out, starts_E, counts_E,
                                     jnp.full((num_shards,), me * t, jnp.int32), recv_counts_E,
                                     axis_name=axis)
  # back: the block from peer src (slot src * T) returns to where src sorted it (src's starts[me])
  peer_starts_E = jax.lax.all_to_all(starts_E, axis, 0, 0, tiled=True)
  out = jnp.zeros_like(rows, shape=(t, rows.shape[-1]))
  return jax.lax.ragged_all_to_all(rows, out, jnp.arange(num_shards, dtype=jnp.int32) * t, recv_counts_E,
                                   peer_starts_E, counts_E, axis_name=axis)
