"""`moma.layers.scale.scale_features` is `x * w` with another schedule for the weight gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma.layers.scale import scale_features


@pytest.mark.parametrize("x_shape,w_shape", [
    ((2, 5, 8), (8,)),  # a norm's scale / a conv tap: broadcast over the leading dims
    ((2, 5, 8), (2, 5, 8)),  # per-token weights (untied): nothing to reduce
    ((2, 5, 3, 8), (2, 5, 1, 8)),  # size-1 dims broadcast too
])
def test_values_and_gradients_equal_plain_multiply(x_shape, w_shape):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  g = jax.random.normal(kg, x_shape)
  got, got_vjp = jax.vjp(scale_features, x, w)
  want, want_vjp = jax.vjp(lambda x, w: x * w, x, w)
  np.testing.assert_array_equal(got, want)
  for a, b in zip(got_vjp(g), want_vjp(g)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_dtypes_follow_the_operands():
  x, w = jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8,), jnp.float32)
  dx, dw = jax.grad(lambda x, w: jnp.sum(scale_features(x, w)), argnums=(0, 1))(x, w)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  np.testing.assert_array_equal(dw, np.full(8, 4.0))


def test_weight_gradient_reduces_a_materialised_product():
  """The product g * x sits behind an optimization barrier, so XLA cannot fuse it into the reduction."""
  x, w = jnp.ones((64, 32)), jnp.ones((32,))
  hlo = jax.jit(jax.grad(lambda x, w: jnp.sum(scale_features(x, w) ** 2), argnums=1)).lower(x, w).as_text()
  assert "optimization_barrier" in hlo
