"""Expert parallelism (shard_map + all_to_all) equals the single-device grouped computation, values and grads."""

import math

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moma import dispatch, expert_parallel, kernels, sharding

NUM_GROUPS, D, F = 8, 6, 5


def loss(x_MD, w_GDF, group_M, gmm_impl="auto"):
  plan = dispatch.partition(group_M, NUM_GROUPS)
  linear = lambda rows, sizes, w: kernels.gmm(rows, w, sizes, impl=gmm_impl)
  y = plan.combine(dispatch.run_grouped(linear, plan.dispatch(x_MD), plan, w_GDF, group_axis="expert"),
                   x_MD.shape[:1])
  return jnp.sum(jnp.sin(y)), y


def inputs(m=32, skew=False):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  group = jax.random.randint(kg, (m,), 0, NUM_GROUPS)
  if skew:  # every token of the first half goes to group 0: one device receives far more than its share
    group = group.at[: m // 2].set(0)
  return jax.random.normal(kx, (m, D)), jax.random.normal(kw, (NUM_GROUPS, D, F)), group


def expected(x, w, group):
  y = jnp.einsum("md,mdf->mf", x, w[group])
  return y, jax.grad(lambda x, w: jnp.sum(jnp.sin(jnp.einsum("md,mdf->mf", x, w[group]))), (0, 1))(x, w)


def mesh_and_args(shape, axes, skew=False):
  """((mesh, rules), (x, w, group)) with tokens sharded like a batch and groups over `expert`."""
  cfg = ml_collections.ConfigDict({"shape": shape, "axes": axes, "rules": ()})
  mesh, rules = sharding.mesh_from_config(cfg, jax.devices()[:math.prod(shape)]), sharding.rules_from_config(cfg)
  tok = sharding.batch_sharding(mesh, rules, 1)
  x, w, group = inputs(skew=skew)
  return (mesh, rules), (jax.device_put(x, NamedSharding(mesh, P(*tok.spec, None))),
                         jax.device_put(w, NamedSharding(mesh, P("expert" if "expert" in axes else None))),
                         jax.device_put(group, tok))


@pytest.mark.parametrize("shape,axes,skew,gmm_impl", [((2, 4), ("data", "expert"), False, "auto"),
                                                      ((2, 4), ("data", "expert"), False, "reference"),
                                                      ((8,), ("expert",), True, "auto"),
                                                      ((8,), ("data",), False, "auto")])
def test_all_to_all_matches_single_device(shape, axes, skew, gmm_impl):
  (mesh, rules), (x, w, group) = mesh_and_args(shape, axes, skew)
  with sharding.activate(mesh, rules):
    fn = jax.jit(jax.value_and_grad(lambda x, w: loss(x, w, group, gmm_impl), (0, 1), has_aux=True))
    (_, y), (gx, gw) = fn(x, w)
    hlo = fn.lower(x, w).compile().as_text()
  y_ref, (gx_ref, gw_ref) = expected(*inputs(skew=skew))
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, gw_ref, rtol=1e-5, atol=1e-5)
  assert ("all-to-all" in hlo) == ("expert" in axes)


def test_without_mesh_is_the_plain_computation():
  _, y = loss(*inputs())
  np.testing.assert_allclose(y, expected(*inputs())[0], rtol=1e-5, atol=1e-5)


def test_groups_that_do_not_divide_the_expert_axis_name_the_fix():
  (mesh, rules), (x, _, group) = mesh_and_args((2, 4), ("data", "expert"))
  w = jnp.ones((NUM_GROUPS, D, F))
  plan = dispatch.partition(jnp.zeros((32,), jnp.int32), 3)
  with sharding.activate(mesh, rules), pytest.raises(ValueError, match="config.mesh"):
    jax.jit(lambda x: dispatch.run_grouped(lambda r, s, w: r, x, plan, w[:3], group_axis="expert"))(x)


def test_ragged_transport_lowers_on_cpu():
  """The GPU/TPU transport traces and lowers here (XLA:CPU cannot run it: jax issue 34755)."""
  (mesh, rules), (x, w, group) = mesh_and_args((8,), ("expert",))
  body = lambda x, g, w: expert_parallel.exchange(
      lambda r, s, w: kernels.gmm(r, w, s), x, jnp.sort(g), (w,), num_groups=NUM_GROUPS, axis="expert",
      impl="ragged")
  fn = jax.shard_map(body, mesh=mesh, in_specs=(P("expert"), P("expert"), P("expert")), out_specs=P("expert"))
  assert "ragged-all-to-all" in jax.jit(fn).lower(x, group, w).as_text(dialect="hlo")
