"""Mamba-1 selective scan (contract: docs/design.md), three interchangeable implementations.

  h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t        (h: [batch, D, N], float32)
  y_t = C_t · h_t + D ⊙ u_t;   y *= silu(z)

- "sequential": one `lax.scan` step per token. Least work; the right one on CPU. Its backward is written by
  hand (`jax.custom_vjp`): a reverse-time scan that recomputes the states from one saved state every
  16 tokens; 2.6x faster and 1/8 the temporary memory of differentiating the forward scan on CPU (fwd+bwd
  at the `small` preset's shape, BENCHMARKS.md). Being a custom VJP, it has no forward-mode derivative
  (`jax.jvp`); "associative" has both.
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
import numpy as np

from moma.kernels import layout

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
  keep = None if reset is None else ~reset.astype(bool)
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


# Tokens between the states the sequential forward saves for its backward, which recomputes the states
# in between one chunk at a time: saving every state ([L, batch, D, N] f32) measured 20% slower on CPU
# (memory traffic), and a chunk of states stays in cache.
_CHECKPOINT_EVERY = 16


def _sequential(dt, u, A, B, C, keep, h0):
  """The recurrence token by token. The state is kept as [b, N, D] (D minor): the sums over N (y_t, and
  Δ's cotangent) are then vector adds instead of in-register reductions: on CPU the forward is 2x and
  forward + backward 1.6x faster than with [b, D, N]."""
  b, length, d = u.shape
  chunk = min(_CHECKPOINT_EVERY, length)
  pad = -length % chunk

  def to_chunks(t, fill=0):  # [b, L, ...] → [num_chunks, chunk, b, ...]; padding: Δ = 0 and keep leave h
    if t is None:
      return None
    t = layout.pad_axis(t, 1, chunk, fill)
    return jnp.moveaxis(t, 1, 0).reshape(-1, chunk, *t.shape[:1], *t.shape[2:])

  y, h_last = _sequential_chunks(*map(to_chunks, (dt, u)), A.T, *map(to_chunks, (B, C)),
                                 to_chunks(keep, fill=True), jnp.swapaxes(h0, 1, 2))
  y = jnp.moveaxis(y.reshape(length + pad, b, d), 0, 1)
  return y[:, :length], jnp.swapaxes(h_last, 1, 2)


def _advance(h_BND, dt_BD, u_BD, A_ND, b_BN, keep_B):
  """h_t from h_{t-1}, state layout [b, N, D]."""
  a_BND = jnp.exp(dt_BD[:, None, :] * A_ND)
  if keep_B is not None:
    a_BND = a_BND * keep_B[:, None, None]
  return a_BND * h_BND + (dt_BD * u_BD)[:, None, :] * b_BN[:, :, None]


@jax.custom_vjp
def _sequential_chunks(dt, u, A_ND, B, C, keep, h0_BND):
  """Time-major chunked inputs [num_chunks, chunk, b, ...] → (y [num_chunks, chunk, b, D], h_last_BND)."""
  return _sequential_fwd(dt, u, A_ND, B, C, keep, h0_BND)[0]


def _sequential_fwd(dt, u, A_ND, B, C, keep, h0_BND):
  def token(h, xs):
    dt_t, u_t, b_t, c_t, keep_t = xs
    h = _advance(h, dt_t, u_t, A_ND, b_t, keep_t)
    # Multiply-and-sum, not einsum: XLA:CPU runs the contraction per batch row as a small dot per step.
    return h, jnp.sum(h * c_t[:, :, None], axis=1)

  def chunk(h, xs):
    h_end, y = jax.lax.scan(token, h, xs)
    return h_end, (y, h)

  h_last, (y, h_starts) = jax.lax.scan(chunk, h0_BND, (dt, u, B, C, keep))
  return (y, h_last), (dt, u, A_ND, B, C, keep, h_last, h_starts)


def _sequential_bwd(res, cotangents):
  """Reverse-time scan, chunk by chunk: recompute the chunk's states from its saved start, then walk back.

  Per token t (reversed), with g the cotangent of h_t and a_t = exp(Δ_t A)·keep_t: dC_t = Σ_d gy_t·h_t;
  g += gy_t ⊗ C_t; Δ_t·u_t gets Σ_n g·B_t, B_t gets Σ_d g·Δ_t·u_t; h_{t-1} gets g·a_t; with
  P = g·a_t·h_{t-1} (the cotangent of the exponent Δ_t A), Δ_t gets Σ_n P·A and A gets Σ_b P·Δ_t.
  A's cotangent accumulates over [b, N, D] and is summed over b once at the end: an elementwise update per
  token is cheaper than a reduction. keep is boolean (float0 cotangent): reset is not differentiable.
  """
  dt, u, A_ND, B, C, keep, h_last, h_starts = res
  gy, gh_last = cotangents

  def recompute(h, xs):
    dt_t, u_t, b_t, keep_t = xs
    return _advance(h, dt_t, u_t, A_ND, b_t, keep_t), h

  def token(carry, xs):
    g, dA_BND, h_t = carry
    h_before, dt_t, u_t, b_t, c_t, keep_t, gy_t = xs
    dc_t = jnp.sum(gy_t[:, None, :] * h_t, axis=2)
    g = g + gy_t[:, None, :] * c_t[:, :, None]
    dx_t = jnp.sum(g * b_t[:, :, None], axis=1)  # cotangent of Δ_t·u_t
    db_t = jnp.sum(g * (dt_t * u_t)[:, None, :], axis=2)
    g = g * jnp.exp(dt_t[:, None, :] * A_ND)
    if keep_t is not None:
      g = g * keep_t[:, None, None]
    p = g * h_before
    ddt_t = jnp.sum(p * A_ND, axis=1) + dx_t * u_t
    return (g, dA_BND + p * dt_t[:, None, :], h_before), (ddt_t, dx_t * dt_t, db_t, dc_t)

  def chunk(carry, xs):
    g, dA_BND, h_end = carry
    h_start, dt_c, u_c, b_c, c_c, keep_c, gy_c = xs
    _, h_before = jax.lax.scan(recompute, h_start, (dt_c, u_c, b_c, keep_c))
    # unroll=2: ~10% faster than 1 (4 is no better) on CPU at the small preset's shape.
    (g, dA_BND, _), grads = jax.lax.scan(token, (g, dA_BND, h_end),
                                         (h_before, dt_c, u_c, b_c, c_c, keep_c, gy_c),
                                         reverse=True, unroll=2)
    return (g, dA_BND, h_start), grads

  (dh0, dA_BND, _), (ddt, du, dB, dC) = jax.lax.scan(
      chunk, (gh_last, jnp.zeros_like(h_last), h_last), (h_starts, dt, u, B, C, keep, gy), reverse=True)
  dkeep = None if keep is None else np.zeros(keep.shape, jax.dtypes.float0)
  return ddt, du, dA_BND.sum(0), dB, dC, dkeep, dh0


_sequential_chunks.defvjp(_sequential_fwd, _sequential_bwd)


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
    keep = jnp.ones((b, length), bool)

  def to_chunks(t, fill=0.0):  # [b, L, ...] → [num_chunks, b, chunk, ...]
    t = layout.pad_axis(t, 1, chunk, fill)
    t = t.reshape(b, -1, chunk, *t.shape[2:])
    return jnp.moveaxis(t, 1, 0)

  @jax.checkpoint
  def body(h, xs):
    dt_c, u_c, b_c, c_c, keep_c = xs
    y_c, h_c = _associative(dt_c, u_c, A, b_c, c_c, keep_c, h)
    return h_c, y_c

  # Padding tokens have Δ = 0 (decay 1, no input) and keep = True: they leave the state unchanged.
  xs = tuple(map(to_chunks, (dt, u, B, C))) + (to_chunks(keep, fill=True),)
  h_last, y = jax.lax.scan(body, h0, xs)
  y = jnp.moveaxis(y, 0, 1).reshape(b, length + pad, d)
  return y[:, :length], h_last
