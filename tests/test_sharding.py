"""Meshes from config on 8 CPU devices: same losses and gradients as one device, shardings per the rules."""

import functools
import math

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moma import sharding
from tests.sharding_model import TinyLM, make_batch, make_train_fns

STEPS = 3
MESHES = {  # name: (shape, axes)
    "one": ((1,), ("data",)),
    "data": ((8,), ("data",)),
    "data_fsdp_tensor": ((2, 2, 2), ("data", "fsdp", "tensor")),
    "data_expert": ((2, 4), ("data", "expert")),
}


def mesh_config(shape, axes, rules=()):
  return ml_collections.ConfigDict({"shape": shape, "axes": axes, "rules": rules})


@functools.cache  # each mesh compiles once per test session
def setup(shape, axes, ep=False):
  """(mesh, rules, init_state, compiled step, sharded batch) for a mesh."""
  cfg = mesh_config(shape, axes)
  mesh = sharding.mesh_from_config(cfg, jax.devices()[:math.prod(shape)])
  rules = sharding.rules_from_config(cfg)
  init_state, train_step = make_train_fns(TinyLM(expert_parallel=ep))
  batch = sharding.shard_batch(make_batch(), mesh, rules)
  abstract = sharding.abstract_sharded(init_state, mesh, rules, jax.random.key(0), batch)
  state_sh = jax.tree.map(lambda a: a.sharding, abstract)
  with sharding.activate(mesh, rules):
    step = jax.jit(train_step, out_shardings=(state_sh, None, state_sh["params"]))
    step = step.lower(abstract, batch).compile()
  return mesh, rules, init_state, step, batch


def train(step, state, batch, steps):
  losses, grads = [], []
  for _ in range(steps):
    state, loss, g = step(state, batch)
    losses.append(float(loss))
    grads.append(jax.device_get(g))
  return losses, grads, state


@functools.cache
def run(shape, axes, ep=False):
  """Losses, per-step gradients and final state of STEPS SGD steps from the same init on the given mesh."""
  mesh, rules, init_state, step, batch = setup(shape, axes, ep)
  state, _ = sharding.init_sharded(init_state, mesh, rules, jax.random.key(0), batch)
  return train(step, state, batch, STEPS)


@pytest.mark.parametrize("name,ep", [("data", False), ("data_fsdp_tensor", False), ("data_expert", False),
                                     ("data_expert", True)])
def test_mesh_matches_single_device(name, ep):
  ref_losses, ref_grads, _ = run(*MESHES["one"])
  losses, grads, state = run(*MESHES[name], ep)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert losses[-1] < losses[0]  # it trains
  for g, ref in zip(grads, ref_grads):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, ref)
  assert len(state["params"]["up"].sharding.device_set) == 8


def test_parameter_shardings_follow_rules():
  *_, state = run(*MESHES["data_fsdp_tensor"])
  params = state["params"]
  assert params["embedding"].sharding.spec == P("tensor", "fsdp")  # (vocab, embed)
  assert params["q"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)  # (modality, embed, heads, kv)
  assert params["o"].sharding.spec == P("tensor", None, "fsdp")  # (heads, kv, embed)
  assert params["up"].sharding.spec == P(None, "fsdp", "tensor")  # (modality, embed, mlp)
  assert params["down"].sharding.spec == P(None, "tensor", "fsdp")  # (modality, mlp, embed)
  assert state["opt"][1][0].trace["up"].sharding.spec == P(None, "fsdp", "tensor")  # momentum too
  *_, state = run(*MESHES["data_expert"])
  assert state["params"]["up"].sharding.spec == P("expert", None, None)  # expert-parallel groups
  assert state["params"]["embedding"].sharding.spec == P(None, None)


def test_default_rules_drop_absent_axes_and_batch_takes_data_axes():
  rules = dict(sharding.default_rules(("data", "tensor")))
  assert rules["batch"] == "data" and rules["embed"] is None and rules["mlp"] == "tensor"
  cfg = mesh_config((2, 2, 2), ("data", "fsdp", "expert"))
  mesh, rules = sharding.mesh_from_config(cfg), sharding.rules_from_config(cfg)
  assert sharding.batch_sharding(mesh, rules).spec == P(("data", "fsdp", "expert"), None)
  assert sharding.batch_shards(mesh, rules) == 8


def test_mesh_minus_one_takes_remaining_devices():
  mesh = sharding.mesh_from_config(mesh_config((2, -1), ("data", "tensor")))
  assert dict(mesh.shape) == {"data": 2, "tensor": 4}


def test_error_mesh_size_differs_from_device_count():
  with pytest.raises(ValueError, match=r"needs 4 devices but 8"):
    sharding.mesh_from_config(mesh_config((2, 2), ("data", "tensor")))


def test_error_unknown_logical_axis_in_rules():
  with pytest.raises(ValueError, match=r"unknown logical axis 'hidden'"):
    sharding.rules_from_config(mesh_config((8,), ("data",), (("batch", "data"), ("hidden", "data"))))
  with pytest.raises(ValueError, match=r"mesh axis 'fsdp'.*not in config.mesh.axes"):
    sharding.rules_from_config(mesh_config((8,), ("data",), (("embed", "fsdp"),)))


def test_error_dimension_not_divisible_names_parameter_axis_and_sizes():
  cfg = mesh_config((2, 4), ("data", "expert"))
  mesh, rules = sharding.mesh_from_config(cfg), sharding.rules_from_config(cfg)
  with pytest.raises(ValueError, match=r"params/down: dimension 0 \(logical axis 'modality', size 3\) is "
                                       r"not divisible by mesh axis 'expert' \(size 4\)"):
    sharding.init_sharded(TinyLM(num_groups=3).init, mesh, rules, jax.random.key(0), make_batch(num_groups=3))


def test_error_batch_not_divisible():
  cfg = mesh_config((8,), ("data",))
  mesh, rules = sharding.mesh_from_config(cfg), sharding.rules_from_config(cfg)
  with pytest.raises(ValueError, match=r"global batch size 4 is not divisible by the 8 batch shards"):
    sharding.shard_batch(make_batch(batch_size=4), mesh, rules)


def test_orbax_checkpoint_restores_onto_a_different_mesh(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  _, _, saved = run(*MESHES["data_fsdp_tensor"])
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "state", saved)
  ckpt.wait_until_finished()
  mesh, rules, init_state, step, batch = setup(*MESHES["data_expert"])
  target = sharding.abstract_sharded(init_state, mesh, rules, jax.random.key(0), batch)
  restored = ckpt.restore(tmp_path / "state", target)
  assert restored["params"]["up"].sharding.spec == P("expert", None, None)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(saved))
  # Training continues identically on the new mesh and on the old one.
  *_, old_step, old_batch = setup(*MESHES["data_fsdp_tensor"])
  np.testing.assert_allclose(train(step, restored, batch, 2)[0], train(old_step, saved, old_batch, 2)[0],
                             rtol=1e-5)
