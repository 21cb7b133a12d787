"""Mamba-1 selective scan (contract: ../shared/DESIGN.md), three interchangeable implementations.

  h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t        (h: [batch, D, N], float32)
  y_t = C_t · h_t + D ⊙ u_t;   y *= silu(z)

- "sequential": one `lax.scan` step per token. Least work; the right one on CPU.
- "chunked": an outer `lax.scan` over chunks of `chunk_size` tokens carries the fp32 state [batch, D, N];
  inside a chunk the recurrence is solved in parallel (an associative scan over the chunk, log depth), and
  each chunk is rematerialised, so activation memory grows with one chunk, not with the sequence. The
  quadratic (SSD-style) in-chunk form is not used: Mamba-1's decay is per (channel, state), which would make
  it a [chunk, chunk, D, N] tensor. Decays are only ever multiplied (products underflow to 0 gracefully);
  no cumulative sum is exponentiated anywhere.
- "associative": one `lax.associative_scan` over the whole sequence (log depth, memory ∝ L·D·N).
- "auto": "sequential" on CPU, "chunked" on accelerators.

Beyond the contract (keyword-only): `reset` [batch, L] bool zeroes the state before a token (document starts
of packed sequences), `initial_state` [batch, D, N] continues a recurrence (decoding), and
`return_final_state=True` also returns the state after the last token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLS = ("auto", "sequential", "chunked", "associative")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                   impl="auto", chunk_size=64, reset=None, initial_state=None,
                   return_final_state=False):
  """Selective scan; returns y [batch, L, D] in u's dtype (and the fp32 final state if asked).

  chunk_size (impl="chunked" only): tokens per chunk, a positive int. A sequence whose length is not a
  multiple is padded at the end with Δ = 0 (decay 1, no input), which leaves the state unchanged, and the
  padded outputs are dropped; a chunk larger than the sequence shrinks to the sequence length.
  """
  b, length, d = _check(u, delta, A, B, C, D, z, delta_bias, reset, initial_state, impl, chunk_size)
  f32 = jnp.float32
  dt = delta.astype(f32)
  if delta_bias is not None:
    dt = dt + delta_bias.astype(f32)
  if delta_softplus:
    dt = jax.nn.softplus(dt)
  u32 = u.astype(f32)
  keep = None if reset is None else 1.0 - reset.astype(f32)
  h0 = (jnp.zeros((b, d, A.shape[1]), f32) if initial_state is None
        else initial_state.astype(f32))
  if impl == "auto":
    impl = "sequential" if jax.default_backend() == "cpu" else "chunked"
  core = {"sequential": _sequential, "associative": _associative,
          "chunked": functools.partial(_chunked, chunk_size=chunk_size)}[impl]
  y, h_last = core(dt, u32, A.astype(f32), B.astype(f32), C.astype(f32), keep, h0)
  if D is not None:
    y = y + D.astype(f32) * u32
  if z is not None:
    y = y * jax.nn.silu(z.astype(f32))
  y = y.astype(u.dtype)
  return (y, h_last) if return_final_state else y


def _check(u, delta, A, B, C, D, z, delta_bias, reset, initial_state, impl, chunk_size):
  if impl not in IMPLS:
    raise ValueError(f"selective_scan: impl={impl!r} unknown; choose one of {IMPLS}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"selective_scan: chunk_size={chunk_size!r} must be a positive int")
  if u.ndim != 3:
    raise ValueError(f"selective_scan: u must be [batch, L, D], got shape {u.shape}")
  b, length, d = u.shape
  if A.ndim != 2 or A.shape[0] != d or A.shape[1] <= 0:
    raise ValueError(f"selective_scan: A must be [D={d}, N>0], got shape {A.shape}")
  n = A.shape[1]
  want = {"delta": (delta, (b, length, d)), "B": (B, (b, length, n)), "C": (C, (b, length, n)),
          "D": (D, (d,)), "z": (z, (b, length, d)), "delta_bias": (delta_bias, (d,)),
          "reset": (reset, (b, length)), "initial_state": (initial_state, (b, d, n))}
  for name, (arr, shape) in want.items():
    if arr is not None and tuple(arr.shape) != shape:
      raise ValueError(f"selective_scan: {name} must have shape {shape}, got {tuple(arr.shape)}")
  return b, length, d


def _inputs(dt, u, A, B, keep):
  """Per-token decay [.., D, N] and input [.., D, N] of the linear recurrence h = a ⊙ h + x."""
  a = jnp.exp(dt[..., None] * A)
  if keep is not None:
    a = a * keep[..., None, None]
  x = (dt * u)[..., None] * B[..., None, :]
  return a, x


def _sequential(dt, u, A, B, C, keep, h0):
  time_major = lambda t: None if t is None else jnp.moveaxis(t, 1, 0)

  def step(h, xs):
    dt_t, u_t, b_t, c_t, keep_t = xs
    a, x = _inputs(dt_t, u_t, A, b_t, keep_t)
    h = a * h + x
    # Multiply-and-sum, not einsum: XLA:CPU runs a [D, N]·[N] einsum per batch row as a small dot per
    # step, 25-30% slower for the whole scan (fwd+bwd at batch 16, L 256, D 192, N 16).
    return h, jnp.sum(h * c_t[:, None, :], axis=-1)

  h_last, y = jax.lax.scan(step, h0, tuple(map(time_major, (dt, u, B, C, keep))))
  return jnp.moveaxis(y, 0, 1), h_last


def _combine(left, right):
  a1, x1 = left
  a2, x2 = right
  return a1 * a2, a2 * x1 + x2


def _associative(dt, u, A, B, C, keep, h0):
  a, x = _inputs(dt, u, A, B, keep)
  a_cum, x_cum = jax.lax.associative_scan(_combine, (a, x), axis=1)
  h = x_cum + a_cum * h0[:, None]
  return jnp.einsum("bldn,bln->bld", h, C), h[:, -1]


def _chunked(dt, u, A, B, C, keep, h0, *, chunk_size):
  b, length, d = u.shape
  chunk = min(chunk_size, length)
  pad = -length % chunk
  if keep is None:
    keep = jnp.ones((b, length), jnp.float32)

  def to_chunks(t, fill=0.0):  # [b, L, ...] → [num_chunks, b, chunk, ...]
    t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2), constant_values=fill)
    t = t.reshape(b, -1, chunk, *t.shape[2:])
    return jnp.moveaxis(t, 1, 0)

  @jax.checkpoint
  def body(h, xs):
    dt_c, u_c, b_c, c_c, keep_c = xs
    y_c, h_c = _associative(dt_c, u_c, A, b_c, c_c, keep_c, h)
    return h_c, y_c

  # Padding tokens have Δ = 0 (decay 1, no input) and keep = 1: they leave the state unchanged.
  xs = tuple(map(to_chunks, (dt, u, B, C))) + (to_chunks(keep, fill=1.0),)
  h_last, y = jax.lax.scan(body, h0, xs)
  y = jnp.moveaxis(y, 0, 1).reshape(b, length + pad, d)
  return y[:, :length], h_last
