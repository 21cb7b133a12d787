"""selective_scan implementations against a NumPy per-timestep loop, and their gradients against each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma.layers.mamba import selective_scan

IMPLS = [("sequential", 64), ("chunked", 1), ("chunked", 5), ("chunked", 64), ("associative", 64)]


def oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, reset=None, initial_state=None,
           softplus=True):
  """Float64 loop over time, written from the Mamba-1 recurrence."""
  f64 = lambda t: None if t is None else np.asarray(t, np.float64)
  u, delta, A, B, C, D, z, delta_bias, h = map(f64, (u, delta, A, B, C, D, z, delta_bias, initial_state))
  dt = delta if delta_bias is None else delta + delta_bias
  dt = np.log1p(np.exp(dt)) if softplus else dt
  h = np.zeros(u.shape[:1] + A.shape) if h is None else h
  ys = []
  for t in range(u.shape[1]):
    if reset is not None:
      h = h * (1.0 - np.asarray(reset[:, t], np.float64))[:, None, None]
    h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
    y = np.einsum("bdn,bn->bd", h, C[:, t])
    y = y if D is None else y + D * u[:, t]
    ys.append(y if z is None else y * z[:, t] / (1 + np.exp(-z[:, t])))
  return np.stack(ys, 1), h


def make_inputs(key, b=2, length=23, d=6, n=4, dtype=jnp.float32, dt_scale=1.0):
  ks = jax.random.split(key, 10)
  normal = lambda k, s, scale=1.0: (scale * jax.random.normal(k, s)).astype(dtype)
  return dict(
      u=normal(ks[0], (b, length, d)), delta=normal(ks[1], (b, length, d), dt_scale),
      A=-jnp.exp(jax.random.normal(ks[2], (d, n))), B=normal(ks[3], (b, length, n)),
      C=normal(ks[4], (b, length, n)), D=jax.random.normal(ks[5], (d,)),
      z=normal(ks[6], (b, length, d)), delta_bias=jax.random.normal(ks[7], (d,)),
      reset=jax.random.bernoulli(ks[8], 0.15, (b, length)),
      initial_state=jax.random.normal(ks[9], (b, d, n)))


@pytest.mark.parametrize("impl,chunk", IMPLS)
def test_matches_numpy_loop_fp32(impl, chunk):
  x = make_inputs(jax.random.key(0))
  y, h = selective_scan(**x, delta_softplus=True, impl=impl, chunk_size=chunk, return_final_state=True)
  y_ref, h_ref = oracle(**x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl,chunk", [("sequential", 64), ("chunked", 128), ("associative", 64)])
def test_bf16_inputs_fp32_state_long_slow_decay(impl, chunk):
  # Δ ≈ 1e-3 and |A| ≤ 1: the state integrates ~2000 tokens, where a bf16 state would drift.
  x = make_inputs(jax.random.key(1), b=1, length=2048, d=4, n=4, dtype=jnp.bfloat16, dt_scale=0.1)
  x["delta_bias"] = jnp.full((4,), -7.0)
  x["A"] = -jnp.linspace(0.01, 1.0, 16).reshape(4, 4)
  x["reset"] = None
  y, h = selective_scan(**x, delta_softplus=True, impl=impl, chunk_size=chunk, return_final_state=True)
  assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
  y_ref, h_ref = oracle(**x)
  np.testing.assert_allclose(h, h_ref, rtol=1e-4, atol=1e-4)
  scale = np.abs(y_ref).max()
  np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, atol=1e-2 * scale)


@pytest.mark.parametrize("impl,chunk", [("chunked", 5), ("associative", 64)])
def test_gradients_match_sequential(impl, chunk):
  x = make_inputs(jax.random.key(2), length=17)
  reset = x.pop("reset")
  w = jax.random.normal(jax.random.key(3), x["u"].shape)

  def loss(impl, chunk, args):
    y, h = selective_scan(**args, reset=reset, delta_softplus=True, impl=impl, chunk_size=chunk,
                          return_final_state=True)
    return jnp.sum(y * w) + jnp.sum(h ** 2)

  g_ref = jax.grad(loss, argnums=2)("sequential", 64, x)
  g = jax.jit(jax.grad(loss, argnums=2), static_argnums=(0, 1))(impl, chunk, x)
  for name in x:
    np.testing.assert_allclose(g[name], g_ref[name], rtol=1e-4, atol=1e-4, err_msg=name)


# length 5: one short chunk; 37: three checkpoint chunks with padding. The other two pairings are slow
# (their twins: the same length with the other pairing).
@pytest.mark.parametrize("length,with_reset,with_state", [
    (37, True, True), (5, False, False),
    pytest.param(5, True, True, marks=pytest.mark.slow), pytest.param(37, False, False, marks=pytest.mark.slow)])
def test_sequential_custom_vjp_matches_autodiff(length, with_reset, with_state):
  # "sequential" has a hand-written backward; "associative" is differentiated by JAX.
  x = make_inputs(jax.random.key(6), length=length)
  reset = x.pop("reset")
  if not with_reset:
    reset = None
  if not with_state:
    x.pop("initial_state")
  w_y = jax.random.normal(jax.random.key(7), x["u"].shape)
  w_h = jax.random.normal(jax.random.key(8), (2, 6, 4))

  def loss(impl, args):
    y, h = selective_scan(**args, reset=reset, delta_softplus=True, impl=impl, return_final_state=True)
    return jnp.sum(y * w_y) + jnp.sum(h * w_h)

  g_ref = jax.grad(loss, argnums=1)("associative", x)
  g = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)("sequential", x)
  for name in x:
    np.testing.assert_allclose(g[name], g_ref[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("impl", ["auto", "sequential", "chunked", "associative"])
def test_optional_arguments_omitted(impl):
  x = make_inputs(jax.random.key(4))
  core = {k: x[k] for k in ("u", "delta", "A", "B", "C")}
  core["delta"] = jnp.abs(core["delta"])  # no softplus: Δ must already be positive
  y_ref, _ = oracle(**core, softplus=False)
  np.testing.assert_allclose(selective_scan(**core, impl=impl), y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,field", [
    (dict(impl="pallas"), "impl"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=2.5), "chunk_size"),
    (dict(B=jnp.zeros((2, 23, 5))), "B"),
    (dict(A=jnp.zeros((6, 0))), "A"),
    (dict(D=jnp.zeros((7,))), "D"),
])
def test_bad_input_names_the_field(kwargs, field):
  x = {k: v for k, v in make_inputs(jax.random.key(5)).items() if k in ("u", "delta", "A", "B", "C")}
  with pytest.raises(ValueError, match=field):
    selective_scan(**{**x, **kwargs})
