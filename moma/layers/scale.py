"""`scale_features(x, w)`: x * w with the weight broadcast over x's leading dims (a norm's scale, a conv tap).

Same values and gradients as `x * w`; only the weight gradient's schedule differs. Autodiff gives
dw = sum(g * x) over the broadcast dims, and XLA:CPU fuses that product into the reduction as a strided
column walk: the RMSNorm scale's backward took 97 ms at [1024, 1536] (forward 0.3 ms) and Mamba's tied
conv kernel's 400 ms. Materialising g * x first (an optimization barrier) makes it a plain reduction
(`experiments/bench_scale.py`, BENCHMARKS.md).
"""

import jax
import jax.numpy as jnp


@jax.custom_vjp
def scale_features(x: jax.Array, w: jax.Array) -> jax.Array:
  """x * w, w broadcastable to x (right-aligned)."""
  return x * w


def _forward(x, w):
  return x * w, (x, w)


def _backward(res, g):
  x, w = res
  # The broadcast dims of w: those x has beyond w's rank and those where w has size 1.
  lead = x.ndim - w.ndim
  axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(w.shape)
                                     if n == 1 and x.shape[lead + i] != 1)
  dw = g * x
  if axes:
    dw = jnp.sum(jax.lax.optimization_barrier(dw), axis=axes, keepdims=True)
  dx = g * w
  return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


scale_features.defvjp(_forward, _backward)
