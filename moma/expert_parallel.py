"""Expert parallelism: rows travel to the device holding their group's weights, and back.

Called by `moma.dispatch.run_grouped` inside `shard_map` when a layer's group axis (`expert`, or `modality`
for MoT) is split over a batch mesh axis: every device holds G / E of the groups' weights and T rows of its
own tokens, sorted by group (padding rows, group G, last). `exchange` ships each block of rows to the device
owning those groups, runs `fn` there on the rows it received (its local groups only), and ships the results
back. Per device and direction this moves only its own rows, whatever the global batch.

Transports:
* equal static groups (expert choice: every expert owns T / G rows on every device): one exact
  `all_to_all` of [E, T / E, D] blocks, no padding;
* ragged groups, "all_to_all": a dense `all_to_all` of [E, T, D] blocks (capacity T per peer, so nothing is
  dropped; unused slots are padding sorted past the last group, where gmm gives zeros); runs everywhere,
  XLA:CPU included (which lacks ragged_all_to_all, jax issue 34755);
* ragged groups, "ragged": `lax.ragged_all_to_all`, sending only the real rows (GPU/TPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

# fn(rows, group_sizes, *weights) → [rows, F], for this device's groups; group_sizes is a tuple of ints
# when equal static groups make them known at trace time, else an int32 array.
GroupFn = Callable[..., jax.Array]


def exchange(fn: GroupFn, rows_TD: jax.Array, group_T: jax.Array, weights: Sequence[jax.Array], *,
             num_groups: int, axis: str, equal_groups: bool = False, impl: str = "auto") -> jax.Array:
  """fn over rows grouped by `group_T` (sorted; G = padding), each group computed where its weights are."""
  if impl not in ("auto", "all_to_all", "ragged"):
    raise ValueError(f"expert_parallel impl={impl!r} must be 'auto', 'all_to_all' or 'ragged'")
  num_shards = jax.lax.axis_size(axis)
  local_groups = num_groups // num_shards
  if equal_groups:
    return _exchange_equal(fn, rows_TD, weights, local_groups, num_shards, axis)
  if impl == "auto":
    impl = "ragged" if jax.default_backend() in ("gpu", "tpu") else "all_to_all"
  t = rows_TD.shape[0]
  dest_counts_E = jnp.bincount(group_T // local_groups, length=num_shards).astype(jnp.int32)  # padding: none
  dest_starts_E = jnp.cumsum(dest_counts_E) - dest_counts_E
  transport = _ragged if impl == "ragged" else _dense
  send = lambda rows: transport(rows, dest_starts_E, dest_counts_E, t, num_shards, axis, forward=True)
  recv_RD = send(rows_TD)
  local_R = send((group_T % local_groups)[:, None])[:, 0]
  local_R = jnp.where(_slot_valid(dest_counts_E, t, num_shards, axis), local_R, local_groups)
  order_R = jnp.argsort(local_R, stable=True)
  inverse_R = jnp.zeros_like(order_R).at[order_R].set(jnp.arange(order_R.shape[0], dtype=order_R.dtype))
  sizes_G = jnp.bincount(local_R, length=local_groups).astype(jnp.int32)
  y_RF = jnp.take(fn(jnp.take(recv_RD, order_R, axis=0), sizes_G, *weights), inverse_R, axis=0)
  return transport(y_RF, dest_starts_E, dest_counts_E, t, num_shards, axis, forward=False)


def _exchange_equal(fn, rows_TD, weights, local_groups, num_shards, axis):
  """Every group owns T / G rows here, so device e's groups are the rows' e-th block of T / E."""
  t, d = rows_TD.shape
  blocks = jax.lax.all_to_all(rows_TD.reshape(num_shards, t // num_shards, d), axis, 0, 0, tiled=True)
  # [source, local group, C] → [local group, source, C]: each local group's rows from every device.
  by_group = blocks.reshape(num_shards, local_groups, -1, d).transpose(1, 0, 2, 3)
  y = fn(by_group.reshape(t, d), (t // local_groups,) * local_groups, *weights)
  f = y.shape[-1]
  y = y.reshape(local_groups, num_shards, -1, f).transpose(1, 0, 2, 3).reshape(num_shards, t // num_shards, f)
  return jax.lax.all_to_all(y, axis, 0, 0, tiled=True).reshape(t, f)


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
