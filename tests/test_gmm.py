"""moma.kernels.gmm: every impl against the reference twin; gradients; input checks; properties."""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma import kernels
from moma.kernels import reference
from moma.kernels import xla

FAST_IMPLS = ["xla", "ragged_dot"]
PALLAS_IMPLS = ["pallas_gpu", "pallas_tpu"]
# fp32: accumulation-order noise only. bf16 operands and output: one bf16 rounding (2^-8) of values ~ √K.
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-4), jnp.bfloat16: dict(rtol=2e-2, atol=6e-2)}

# name → (M, group sizes): zeros, one group holding every row, M not a tile multiple, rows past the sum.
GROUP_CASES = {
    "random_with_zeros": (300, [0, 117, 0, 90, 93]),
    "one_group_all_rows": (300, [0, 0, 300, 0]),
    "rows_past_sum": (300, [40, 0, 161, 2]),
    "all_empty": (64, [0, 0, 0]),
}


def _operands(m, sizes, k=24, n=40, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 2)
  lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
  rhs = jax.random.normal(keys[1], (len(sizes), k, n), jnp.float32).astype(dtype)
  return lhs, rhs, jnp.asarray(sizes, jnp.int32)


def _expected(lhs, rhs, group_sizes):
  """The reference in float32 from the same (possibly bf16) operands."""
  return reference.gmm(lhs.astype(jnp.float32), rhs.astype(jnp.float32), group_sizes, jnp.float32)


def _check_forward(impl, case, dtype):
  m, sizes = GROUP_CASES[case]
  lhs, rhs, group_sizes = _operands(m, sizes, dtype=dtype)
  fn = jax.jit(lambda a, b, g: kernels.gmm(a, b, g, impl=impl, interpret=impl in PALLAS_IMPLS))
  out = fn(lhs, rhs, group_sizes)
  assert out.shape == (m, rhs.shape[2]) and out.dtype == dtype
  np.testing.assert_allclose(out.astype(jnp.float32), _expected(lhs, rhs, group_sizes), **TOL[dtype])
  np.testing.assert_array_equal(out[int(sum(sizes)):], 0)


def _loss(impl, lhs, rhs, group_sizes):
  out = kernels.gmm(lhs, rhs, group_sizes, impl=impl, interpret=impl in PALLAS_IMPLS)
  weights = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
  return jnp.sum(out * weights)


def _check_grads(impl, case):
  m, sizes = GROUP_CASES[case]
  lhs, rhs, group_sizes = _operands(m, sizes)
  grad = lambda impl: jax.jit(jax.grad(lambda a, b, g: _loss(impl, a, b, g), argnums=(0, 1)))
  for got, want in zip(grad(impl)(lhs, rhs, group_sizes), grad("reference")(lhs, rhs, group_sizes)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", list(GROUP_CASES))
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_forward_matches_reference_fp32(impl, case):
  _check_forward(impl, case, jnp.float32)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_forward_matches_reference_bf16(impl):
  _check_forward(impl, "random_with_zeros", jnp.bfloat16)


@pytest.mark.parametrize("case", ["random_with_zeros", "rows_past_sum", "all_empty"])
def test_xla_grads_match_reference(case):
  _check_grads("xla", case)


def test_bf16_grads_keep_operand_dtypes():
  lhs, rhs, group_sizes = _operands(*GROUP_CASES["random_with_zeros"], dtype=jnp.bfloat16)
  dlhs, drhs = jax.jit(jax.grad(lambda a, b: _loss("xla", a, b, group_sizes), argnums=(0, 1)))(lhs, rhs)
  assert dlhs.dtype == jnp.bfloat16 and drhs.dtype == jnp.bfloat16
  want = jax.jit(jax.grad(lambda a, b: _loss("reference", a, b, group_sizes), argnums=(0, 1)))(
      lhs.astype(jnp.float32), rhs.astype(jnp.float32))
  for got, w in zip((dlhs, drhs), want):
    np.testing.assert_allclose(got.astype(jnp.float32), w, rtol=2e-2, atol=0.5)


def test_preferred_element_type_sets_output_dtype():
  lhs, rhs, group_sizes = _operands(*GROUP_CASES["random_with_zeros"], dtype=jnp.bfloat16)
  out = kernels.gmm(lhs, rhs, group_sizes, impl="xla", preferred_element_type=jnp.float32)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, _expected(lhs, rhs, group_sizes), rtol=1e-5, atol=1e-4)


def test_traced_group_sizes_without_host_transfer():
  lhs, rhs, group_sizes = _operands(*GROUP_CASES["random_with_zeros"])
  step = jax.jit(jax.value_and_grad(lambda a, b, g: _loss("xla", a, b, g), argnums=(0, 1)))
  step(lhs, rhs, group_sizes)  # compile outside the guard
  with jax.transfer_guard_device_to_host("disallow"):
    jax.block_until_ready(step(lhs, rhs, group_sizes[::-1]))  # new sizes, same compiled program


def test_auto_is_xla_on_cpu():
  assert jax.default_backend() != "cpu" or kernels.resolve_impl("auto") == "xla"


@pytest.mark.parametrize("args, message", [
    (dict(impl="cuda"), "impl"),
    (dict(lhs=jnp.ones((4, 3, 2))), "lhs must be"),
    (dict(rhs=jnp.ones((3, 2))), "rhs must be"),
    (dict(rhs=jnp.ones((2, 5, 4))), "disagree on K"),
    (dict(group_sizes=jnp.array([2, 2, 0], jnp.int32)), "group_sizes must have shape"),
    (dict(group_sizes=jnp.array([2.0, 2.0])), "integer"),
    (dict(group_sizes=jnp.array([5, -1], jnp.int32)), "non-negative"),
    (dict(impl="pallas_tpu"), "interpret=True"),
])
def test_bad_input_raises_clear_error(args, message):
  call = dict(lhs=jnp.ones((4, 3)), rhs=jnp.ones((2, 3, 4)), group_sizes=jnp.array([2, 2], jnp.int32))
  call.update(args)
  if jax.default_backend() == "tpu" and call.get("impl") == "pallas_tpu":
    pytest.skip("pallas_tpu runs natively here")
  impl = call.pop("impl", "auto")
  with pytest.raises(ValueError, match=message):
    kernels.gmm(call["lhs"], call["rhs"], call["group_sizes"], impl=impl)


@functools.partial(jax.jit, static_argnames=("bulk", "step"))
def _xla_pair(lhs, rhs, dout, group_sizes, bulk, step):
  return (xla.gmm(lhs, rhs, group_sizes, jnp.float32, bulk=bulk, step=step),
          xla.tgmm(lhs, dout, group_sizes, jnp.float32, bulk=bulk, step=step))


@jax.jit
def _reference_pair(lhs, rhs, dout, group_sizes):
  return (reference.gmm(lhs, rhs, group_sizes, jnp.float32),
          reference.tgmm(lhs, dout, group_sizes, jnp.float32))


def _check_xla_pair(m, sizes, k, n, bulk, step):
  lhs, rhs, group_sizes = _operands(m, sizes, k=k, n=n)
  dout = jax.random.normal(jax.random.key(m), (m, n))
  for got, want in zip(_xla_pair(lhs, rhs, dout, group_sizes, bulk, step),
                       _reference_pair(lhs, rhs, dout, group_sizes)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_windows_cover_every_row_once():
  """Bulk 16, step 4 on 37 rows: bulk tiles, end-aligned windows reaching into the previous group, a
  window clamped at row 0 that runs past its group's end, and an empty group."""
  _check_xla_pair(37, [5, 0, 19, 1, 9], k=6, n=7, bulk=16, step=4)


def test_no_tile_spans_every_row():
  """A tile as long as lhs is loop-invariant and XLA hoists its dot out of the (zero-trip) window loop, so
  it ran for every group (2.6x the forward time at M=1024, G=2): no dot of the compiled gmm may produce all
  M rows. (tgmm walks the same `_for_each_window` tiles.)"""
  m, n = 64, 16
  lhs, rhs, group_sizes = _operands(m, [40, 24], k=8, n=n)
  hlo = jax.jit(lambda *a: xla.gmm(*a, jnp.float32)).lower(lhs, rhs, group_sizes).compile().as_text()
  dots = [line for line in hlo.splitlines() if " dot(" in line]
  assert dots and not [line for line in dots if f"f32[{m},{n}]" in line.split(" dot(")[0]], dots


# Few distinct shapes (4 groups, trailing ones possibly empty) keep jit caches warm; the group sizes, which
# decide every tile boundary, vary freely since they are traced.
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    m=st.sampled_from([1, 33, 48]),
    raw_sizes=st.lists(st.integers(0, 48), min_size=4, max_size=4),
    bulk_step=st.sampled_from([(8, 2), (32, 8), (4, 1), (1024, 64)]),
)
def test_xla_property_any_shape_and_sizes(m, raw_sizes, bulk_step):
  ends = np.minimum(np.cumsum(raw_sizes), m)  # ragged_dot semantics: sum(group_sizes) ≤ M
  _check_xla_pair(m, np.diff(ends, prepend=0).tolist(), 7, 6, *bulk_step)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_inside_shard_map_with_replicated_weights(impl):
  """Rows sharded over 4 devices, each with its own group sizes, rhs replicated: the custom VJP's d rhs is
  summed over devices (gmm types rhs as varying like the rows), matching the single-device gradient."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((4,), ("rows",), devices=jax.devices()[:4])
  lhs, rhs, _ = _operands(4 * 24, [1, 2, 3])
  sizes = jnp.array([[5, 0, 19], [24, 0, 0], [3, 9, 2], [0, 12, 12]], jnp.int32)  # per device, 24 rows each

  def loss(lhs, rhs, sizes, sharded):
    if not sharded:  # the same computation, device by device
      outs = [kernels.gmm(lhs[24 * i:24 * (i + 1)], rhs, sizes[i], impl=impl) for i in range(4)]
      return jnp.sum(jnp.sin(jnp.concatenate(outs)))
    per_device = lambda x, w, gs: kernels.gmm(x, w, gs[0], impl=impl)
    out = jax.shard_map(per_device, mesh=mesh, in_specs=(P("rows"), P(), P("rows")), out_specs=P("rows"))(
        lhs, rhs, sizes)
    return jnp.sum(jnp.sin(out))

  want = jax.grad(loss, (0, 1))(lhs, rhs, sizes, False)
  args = (jax.device_put(lhs, NamedSharding(mesh, P("rows"))), jax.device_put(rhs, NamedSharding(mesh, P())),
          jax.device_put(sizes, NamedSharding(mesh, P("rows"))))
  got = jax.jit(jax.grad(loss, (0, 1)), static_argnums=3)(*args, True)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
