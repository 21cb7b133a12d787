"""The sort plan and grouped dense layer against a per-token reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma import dispatch


@pytest.mark.parametrize("num_groups", [1, 2, 3])
def test_sort_unsort_roundtrip_and_group_sizes(num_groups):
  ids = jax.random.randint(jax.random.key(0), (3, 7), 0, num_groups)
  x = jax.random.normal(jax.random.key(1), (3, 7, 5))
  plan = dispatch.make_plan(ids, num_groups)
  rows = plan.sort(x)
  np.testing.assert_array_equal(plan.group_sizes, np.bincount(np.ravel(ids), minlength=num_groups))
  sorted_ids = np.sort(np.ravel(ids), kind="stable")
  if plan.perm is not None:
    np.testing.assert_array_equal(np.ravel(ids)[np.asarray(plan.perm)], sorted_ids)
  np.testing.assert_array_equal(plan.unsort(rows, (3, 7)), x)


def test_grouped_dense_matches_per_token_weights():
  num_groups, d_in, d_out = 3, 4, 6
  ids = jnp.array([[2, 0, 1, 1, 0, 2, 2, 0]])
  x = jax.random.normal(jax.random.key(2), (1, 8, d_in))
  layer = dispatch.GroupedDense(d_out, num_groups=num_groups, use_bias=True)
  plan = dispatch.make_plan(ids, num_groups)
  params = layer.init(jax.random.key(3), plan.sort(x), plan)
  params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero bias
  y = plan.unsort(jax.jit(layer.apply)(params, plan.sort(x), plan), (1, 8))
  w, b = params["params"]["kernel"].unbox(), params["params"]["bias"].unbox()
  expected = jnp.einsum("ld,ldo->lo", x[0], w[ids[0]]) + b[ids[0]]
  np.testing.assert_allclose(y[0], expected, rtol=1e-5, atol=1e-5)


def test_one_group_is_plain_dense():
  x = jax.random.normal(jax.random.key(4), (2, 5, 4))
  plan = dispatch.make_plan(jnp.zeros((2, 5), jnp.int32), 1)
  assert plan.perm is None
  layer = dispatch.GroupedDense((2, 3), out_axes=("heads", "kv"))
  params = layer.init(jax.random.key(5), plan.sort(x), plan)
  kernel = params["params"]["kernel"].unbox()
  assert kernel.shape == (4, 2, 3)
  y = plan.unsort(layer.apply(params, plan.sort(x), plan), (2, 5))
  np.testing.assert_allclose(y, jnp.einsum("bld,dhk->blhk", x, kernel), rtol=1e-5, atol=1e-5)
