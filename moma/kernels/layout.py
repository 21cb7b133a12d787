"""Helpers shared by the kernels: group bounds, tile choice, padding to whole tiles, varying types."""

import jax
import jax.numpy as jnp


def group_bounds(group_sizes_G: jax.Array, num_rows: int):
  """First and one-past-last row of each group (int32 [G] each), clipped to [0, num_rows]."""
  ends_G = jnp.minimum(jnp.cumsum(group_sizes_G), num_rows).astype(jnp.int32)
  starts_G = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G[:-1]])
  return starts_G, ends_G


def bucket(values_N: jax.Array, ends_G: jax.Array) -> jax.Array:
  """int32 [N]: how many of the sorted `ends_G` are ≤ each value (searchsorted, side='right').

  A count, not jnp.searchsorted, which fails on varying values under a partly manual shard_map (jax 0.10).
  """
  return jnp.sum(values_N[:, None] >= ends_G[None, :], axis=1, dtype=jnp.int32)


def row_groups(group_sizes_G: jax.Array, num_rows: int) -> jax.Array:
  """int32 [num_rows]: the group of each row; rows past sum(group_sizes) get G (no group)."""
  return bucket(jnp.arange(num_rows, dtype=jnp.int32), jnp.cumsum(group_sizes_G))


def tile(dim: int, preferred: int, minimum: int = 8) -> int:
  """A power-of-two tile ≤ preferred for a dimension (the dimension gets padded to a multiple of it)."""
  t = minimum
  while t < preferred and t < dim:
    t *= 2
  return t


def pad_axis(x: jax.Array, axis: int, multiple: int, fill=0) -> jax.Array:
  """Pad `axis` at its end with `fill` up to a multiple of `multiple` (a no-op, and no copy, when it
  already is one): whole tiles for the gmm kernels, whole blocks for attention, whole chunks for the scan."""
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=fill)


def varying_zeros(shape, dtype, *operands):
  """Zeros as varying over manual mesh axes as the operands (under shard_map; plain zeros elsewhere).

  `zeros_like` types its result like its argument and a sum joins the types: this uses no API for the
  varying-axes type itself (jax renamed it between versions). Outside shard_map the zeros stay plain:
  under GSPMD `zeros_like` would also copy the operand's sharding, which deadlocked 8-device CPU runs.
  """
  zeros = jnp.zeros(shape, dtype)
  if not jax.sharding.get_abstract_mesh().manual_axes:
    return zeros
  return sum((jnp.zeros_like(x, dtype, shape=()) for x in operands), zeros)


def out_struct(shape, dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
  """A pallas_call's out_shape, varying over the manual mesh axes `like` varies over (inside shard_map,
  where a kernel's output must state them; a plain struct elsewhere)."""
  if not jax.sharding.get_abstract_mesh().manual_axes:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)
