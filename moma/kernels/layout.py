"""Row layout helpers shared by the kernels: group bounds, tile choice, padding to whole tiles."""

import jax
import jax.numpy as jnp


def group_bounds(group_sizes_G: jax.Array, num_rows: int):
  """First and one-past-last row of each group (int32 [G] each), clipped to [0, num_rows]."""
  ends_G = jnp.minimum(jnp.cumsum(group_sizes_G), num_rows).astype(jnp.int32)
  starts_G = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G[:-1]])
  return starts_G, ends_G


def tile(dim: int, preferred: int, minimum: int = 8) -> int:
  """A power-of-two tile ≤ preferred for a dimension (the dimension gets padded to a multiple of it)."""
  t = minimum
  while t < preferred and t < dim:
    t *= 2
  return t


def pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  """Zero-pad `axis` up to a multiple of `multiple` (a no-op, and no copy, when it already is one)."""
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)
