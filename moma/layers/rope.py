"""Rotary position embeddings (rotate-half form) at per-token positions (in-document for packed rows)."""

import jax
import jax.numpy as jnp


def apply_rope(x_BLHK: jax.Array, position_BL: jax.Array, theta: float) -> jax.Array:
  """Rotates pairs (x[..., i], x[..., i + K/2]) by position * theta^(-2i/K); computed in float32."""
  head_dim = x_BLHK.shape[-1]
  if head_dim % 2:
    raise ValueError(f"head_dim={head_dim}: RoPE needs an even head_dim")
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angle_BLF = position_BL.astype(jnp.float32)[..., None] * inv_freq
  sin, cos = jnp.sin(angle_BLF)[:, :, None, :], jnp.cos(angle_BLF)[:, :, None, :]
  x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHK.dtype)
