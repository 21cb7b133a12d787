"""Meshes from config on 8 CPU devices: shardings per the rules, errors that name the fix, restores onto
another mesh. Nothing here trains: that a sharded run computes what one device does is
tests/test_sharding_train.py's (the one mesh-equivalence module)."""

import functools

import flax.linen as nn
import jax
import numpy as np
import optax
from flax.training.train_state import TrainState
import pytest
from jax.sharding import PartitionSpec as P

from moma import sharding
from tests.sharding_model import TinyLM, make_batch, make_train_fns, mesh_config

MESHES = {  # name: (shape, axes)
    "data_fsdp_tensor": ((2, 2, 2), ("data", "fsdp", "tensor")),
    "data_expert": ((2, 4), ("data", "expert")),
}


@functools.cache
def sharded(shape, axes):
  """(mesh, rules, init_state, state, batch): TinyLM's {params, SGD momentum} on a mesh, abstract (shapes and
  the rules' shardings; `sharding.init_sharded` compiles the init with exactly these out_shardings)."""
  cfg = mesh_config(shape, axes)
  mesh, rules = sharding.mesh_from_config(cfg), sharding.rules_from_config(cfg)
  init_state, _ = make_train_fns(TinyLM())
  batch = sharding.shard_batch(make_batch(), mesh, rules)
  return mesh, rules, init_state, sharding.abstract_sharded(init_state, mesh, rules, jax.random.key(0), batch), batch


def test_parameter_shardings_follow_rules():
  *_, state, _ = sharded(*MESHES["data_fsdp_tensor"])
  params = state["params"]
  assert params["embedding"].sharding.spec == P("tensor", "fsdp")  # (vocab, embed)
  assert params["q"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)  # (modality, embed, heads, kv)
  assert params["o"].sharding.spec == P("tensor", None, "fsdp")  # (heads, kv, embed)
  assert params["up"].sharding.spec == P(None, "fsdp", "tensor")  # (modality, embed, mlp)
  assert params["down"].sharding.spec == P(None, "tensor", "fsdp")  # (modality, mlp, embed)
  assert state["opt"][1][0].trace["up"].sharding.spec == P(None, "fsdp", "tensor")  # momentum too
  *_, state, _ = sharded(*MESHES["data_expert"])
  assert state["params"]["up"].sharding.spec == P("expert", None, None)  # expert-parallel groups
  assert state["params"]["embedding"].sharding.spec == P(None, None)


def test_sharded_init_gives_the_one_device_values():
  """Each device creates only its shards of the init, and together they are one device's init (the trainer's
  runs on a mesh start from it: tests/test_sharding_train.py's slow twin trains from it on every mesh)."""
  mesh, rules, init_state, _, batch = sharded(*MESHES["data_fsdp_tensor"])
  state, _ = sharding.init_sharded(init_state, mesh, rules, jax.random.key(0), batch)
  assert state["params"]["up"].sharding.spec == P(None, "fsdp", "tensor")
  one = jax.jit(lambda key, b: nn.unbox(init_state(key, b)))(jax.random.key(0), make_batch())
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(one))


def test_train_state_from_boxed_params_shards_params_and_moments():
  """The trainer's path: a masked, multi-transform optax init over boxed params boxes the moments too."""
  model = TinyLM()
  mesh, rules, *_, batch = sharded(*MESHES["data_fsdp_tensor"])

  def create_state(batch):
    params = model.init(jax.random.key(0), batch)["params"]
    labels = lambda p: {k: "frozen" if k == "embedding" else "train" for k in p}
    decay = lambda p: jax.tree.map(lambda w: w.ndim > 1, p)
    tx = optax.multi_transform({"train": optax.adamw(1e-3, mask=decay), "frozen": optax.set_to_zero()},
                               labels)
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  state = sharding.abstract_sharded(create_state, mesh, rules, batch, require_boxed=True)
  up_spec = P(None, "fsdp", "tensor")  # (modality, embed, mlp)
  assert state.params["up"].sharding.spec == up_spec
  moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.shape == state.params["up"].shape]
  assert len(moments) == 2 and all(m.sharding.spec == up_spec for m in moments)  # Adam mu and nu
  assert state.step.sharding.spec == P()


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
  cfg = mesh_config((8,), ("data",), (("embed", "data"),))
  mesh, rules = sharding.mesh_from_config(cfg), sharding.rules_from_config(cfg)
  with pytest.raises(ValueError, match=r"params/RMSNorm_0/scale: dimension 0 \(logical axis 'embed', size 12\) is "
                                       r"not divisible by mesh axis 'data' \(size 8\)"):
    sharding.init_sharded(TinyLM(d_model=12, num_heads=3).init, mesh, rules, jax.random.key(0), make_batch())


def test_error_groups_not_divisible_by_the_expert_axis_names_the_config_fields():
  cfg = mesh_config((2, 4), ("data", "expert"))
  mesh, rules = sharding.mesh_from_config(cfg), sharding.rules_from_config(cfg)
  with pytest.raises(ValueError, match=r"3 groups \('modality'\) do not divide over mesh axis 'expert' of "
                                       r"size 4: change config.mesh.shape, or .*config.mesh.rules"):
    sharding.init_sharded(TinyLM(num_groups=3).init, mesh, rules, jax.random.key(0), make_batch(num_groups=3))


def test_error_batch_not_divisible():
  cfg = mesh_config((8,), ("data",))
  mesh, rules = sharding.mesh_from_config(cfg), sharding.rules_from_config(cfg)
  with pytest.raises(ValueError, match=r"global batch size 4 is not divisible by the 8 batch shards"):
    sharding.shard_batch(make_batch(batch_size=4), mesh, rules)


def test_orbax_checkpoint_restores_onto_a_different_mesh(tmp_path):
  """Saved on (data, fsdp, tensor), restored onto (data, expert) with the new mesh's shardings. That training
  then goes on as on one device is test_sharding_train's moved-checkpoint test, through the trainer."""
  ocp = pytest.importorskip("orbax.checkpoint")
  *_, abstract, _ = sharded(*MESHES["data_fsdp_tensor"])
  values = lambda a: np.arange(a.size, dtype=a.dtype).reshape(a.shape)  # every element tells where it went
  saved = jax.tree.map(lambda a: jax.device_put(values(a), a.sharding), abstract)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "state", saved)
  ckpt.wait_until_finished()
  mesh, rules, init_state, _, batch = sharded(*MESHES["data_expert"])
  target = sharding.abstract_sharded(init_state, mesh, rules, jax.random.key(0), batch)
  restored = ckpt.restore(tmp_path / "state", target)
  assert restored["params"]["up"].sharding.spec == P("expert", None, None)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(saved))


def test_maybe_initialize_distributed_from_env(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "MOMA_DISTRIBUTED"):
    monkeypatch.delenv(var, raising=False)
  assert not sharding.maybe_initialize_distributed(None) and not calls  # single process: nothing to do
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  assert sharding.maybe_initialize_distributed(None)
  assert calls == [{"coordinator_address": "host0:1234", "num_processes": 4, "process_id": 2}]
