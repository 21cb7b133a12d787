"""Expert parallelism (shard_map + all_to_all) equals the single-device grouped computation, values and grads."""

import math

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moma import expert_parallel, kernels, sharding

NUM_GROUPS, D, F = 8, 6, 5


def loss(x_MD, w_GDF, group_M, impl="auto", gmm_impl="auto"):
  grouped_linear = lambda rows, plan, w_GDF: kernels.gmm(rows, w_GDF, plan.group_sizes, impl=gmm_impl)
  y = expert_parallel.grouped(grouped_linear, x_MD, group_M, w_GDF, num_groups=NUM_GROUPS, impl=impl)
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
                                                      ((8,), ("expert",), False, "auto"),
                                                      ((8,), ("expert",), True, "auto"),
                                                      ((8,), ("data",), False, "auto")])
def test_all_to_all_matches_single_device(shape, axes, skew, gmm_impl):
  """The default gmm (custom-vjp loops) and the plain-autodiff reference both type-check under shard_map."""
  mesh, args = mesh_and_args(shape, axes, skew)
  y_ref, (gx_ref, gw_ref) = expected(*args)
  with sharding.activate(*mesh):
    (_, y), (gx, gw) = jax.jit(jax.value_and_grad(
        lambda x, w, g: loss(x, w, g, "all_to_all", gmm_impl), (0, 1), has_aux=True))(*args)
    hlo = jax.jit(lambda x, w, g: loss(x, w, g, "all_to_all", gmm_impl)[1]).lower(*args).compile().as_text()
  # Rows move to their experts (or stay, without an expert axis); no token is gathered anywhere.
  assert ("all-to-all" in hlo) == ("expert" in axes) and "all-gather" not in hlo
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, gw_ref, rtol=1e-5, atol=1e-5)


def test_without_mesh_is_the_plain_computation():
  x, w, group = inputs()
  np.testing.assert_allclose(loss(x, w, group)[1], expected(x, w, group)[0], rtol=1e-5, atol=1e-5)


def test_ragged_transport_lowers_on_cpu():
  """XLA:CPU cannot compile ragged_all_to_all (jax issue 34755), but the program must trace and lower."""
  mesh, args = mesh_and_args((2, 4), ("data", "expert"))
  with sharding.activate(*mesh):
    text = jax.jit(jax.grad(lambda x, w, g: loss(x, w, g, "ragged")[0], (0, 1))).lower(*args).as_text()
  assert text.count("ragged_all_to_all") >= 4  # two forward, two transposed


@pytest.mark.gpu
@pytest.mark.parametrize("skew", [False, True])
def test_ragged_matches_all_to_all_on_accelerator(skew):
  n = min(len(jax.devices()), NUM_GROUPS)
  mesh, args = mesh_and_args((n,), ("expert",), skew)
  with sharding.activate(*mesh):
    run = lambda impl: jax.jit(jax.value_and_grad(lambda x, w, g: loss(x, w, g, impl), (0, 1), has_aux=True))(
        *args)
    (_, y_dense), g_dense = run("all_to_all")
    (_, y_ragged), g_ragged = run("ragged")
  np.testing.assert_allclose(y_ragged, y_dense, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g_ragged, g_dense)
