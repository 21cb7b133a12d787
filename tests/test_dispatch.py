"""The sort plan and grouped dense layer against a per-token reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma import dispatch


@pytest.mark.parametrize("num_groups", [1, 2, 3])
def test_partition_roundtrip_and_group_sizes(num_groups):
  ids = jax.random.randint(jax.random.key(0), (3, 7), 0, num_groups)
  x = jax.random.normal(jax.random.key(1), (3, 7, 5))
  plan = dispatch.partition(ids, num_groups)
  rows = plan.dispatch(x)
  if num_groups > 1:
    np.testing.assert_array_equal(plan.group_sizes, np.bincount(np.ravel(ids), minlength=num_groups))
    np.testing.assert_array_equal(np.ravel(ids)[np.asarray(plan.slot_of_row)], np.sort(np.ravel(ids)))
    np.testing.assert_array_equal(plan.group_of_token, np.ravel(ids))
  np.testing.assert_array_equal(plan.combine(rows, (3, 7)), x)


def _no_scatter(fn, *args):
  text = str(jax.make_jaxpr(jax.grad(fn))(*args))
  return "scatter" not in text


@pytest.mark.parametrize("build", ["partition", "token_choice", "expert_choice", "selection"])
def test_every_plan_dispatches_and_combines_by_gathers_both_ways(build):
  """combine(dispatch(x)) against a per-token reference, and gradients with no scatter(-add)."""
  m, d = 12, 3
  x = jax.random.normal(jax.random.key(0), (m, d))
  if build == "partition":
    plan, k = dispatch.partition(jnp.arange(m) % 3, 3), 1
    want = x
  elif build == "token_choice":
    ids = jnp.stack([jnp.arange(m) % 4, jnp.where(jnp.arange(m) < 4, 4, (jnp.arange(m) + 1) % 4)], 1)
    plan, k = dispatch.token_choice(ids, 4), 2
    want = x * (ids < 4).sum(1, keepdims=True)  # a dropped choice (id 4) has no row
  elif build == "expert_choice":  # 2 experts in one group, each picks 3 tokens; expert 1's last is a filler
    top = jnp.array([[[0, 5, 7], [5, 2, 11]]])
    valid = jnp.array([[[True, True, True], [True, True, False]]])
    plan, k = dispatch.expert_choice([(top, valid)], slice_tokens=m, expert_slot=(0, 1), slots=2), 2
    want = x * np.bincount([0, 5, 7, 5, 2], minlength=m)[:, None]
  else:
    plan, k = dispatch.selection(jnp.array([[1, 4, 9]]), slice_tokens=m), 1
    want = x * np.isin(np.arange(m), [1, 4, 9])[:, None]
  y = plan.combine(plan.dispatch(x), (m,))
  np.testing.assert_allclose(y, want, rtol=1e-6)
  assert plan.row_of_slot.shape == (m, k)
  assert _no_scatter(lambda x: jnp.sum(jnp.sin(plan.combine(2 * plan.dispatch(x), (m,)))), x)


def test_grouped_dense_matches_per_token_weights():
  num_groups, d_in, d_out = 3, 4, 6
  ids = jnp.array([[2, 0, 1, 1, 0, 2, 2, 0]])
  x = jax.random.normal(jax.random.key(2), (1, 8, d_in))
  layer = dispatch.GroupedDense(d_out, num_groups=num_groups, use_bias=True)
  plan = dispatch.partition(ids, num_groups)
  params = layer.init(jax.random.key(3), plan.dispatch(x), plan)
  params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero bias
  y = plan.combine(jax.jit(layer.apply)(params, plan.dispatch(x), plan), (1, 8))
  w, b = params["params"]["kernel"].unbox(), params["params"]["bias"].unbox()
  expected = jnp.einsum("ld,ldo->lo", x[0], w[ids[0]]) + b[ids[0]]
  np.testing.assert_allclose(y[0], expected, rtol=1e-5, atol=1e-5)


def test_one_group_is_plain_dense():
  x = jax.random.normal(jax.random.key(4), (2, 5, 4))
  plan = dispatch.partition(jnp.zeros((2, 5), jnp.int32), 1)
  assert plan.is_identity
  layer = dispatch.GroupedDense((2, 3), out_axes=("heads", "kv"))
  params = layer.init(jax.random.key(5), plan.dispatch(x), plan)
  kernel = params["params"]["kernel"].unbox()
  assert kernel.shape == (4, 2, 3)
  y = plan.combine(layer.apply(params, plan.dispatch(x), plan), (2, 5))
  np.testing.assert_allclose(y, jnp.einsum("bld,dhk->blhk", x, kernel), rtol=1e-5, atol=1e-5)
