"""The decoder on 8-device meshes: cached decoding gives one device's tokens, and every parameter it can have
carries logical axes. Training on a mesh is tests/test_sharding_train.py's (the one mesh-equivalence module)."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from moma import sharding
from moma.models import decoder
from moma.models import encoder
from moma.models import generate
from tests import sharding_model as lib

MODALITIES = ("text", "image", "audio")
TINY = dict(modalities=MODALITIES, vocab_size=32, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
            d_ff=32, qk_norm=True)
UNTIE = {"dense": (), "mot": ("qkv", "o", "ffn", "norm", "qk_norm")}


def make_batch(b=8, l=8, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, TINY["vocab_size"], (b, l + 1), dtype=np.int32)
  segment = np.where(np.arange(l) < l // 2, 1, 2).astype(np.int32)[None].repeat(b, 0)
  position = np.concatenate([np.arange(l // 2), np.arange(l - l // 2)]).astype(np.int32)[None].repeat(b, 0)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment": segment, "position": position,
          "modality": rng.integers(0, len(MODALITIES), (b, l), dtype=np.int32),
          "loss_mask": (rng.random((b, l)) > 0.2).astype(np.float32)}


def test_cached_generation_on_mesh_matches_single_device():
  """Greedy decoding with MoT params sharded over (data, fsdp, tensor) and the prompt over the batch axes
  gives the single-device tokens (the KV cache follows the activations' sharding)."""
  model = decoder.as_model(dict(TINY, untie=UNTIE["mot"], max_seq_len=16))
  host = {k: v for k, v in make_batch().items() if k in ("tokens", "modality", "segment", "position")}
  table = jax.numpy.arange(TINY["vocab_size"], dtype=jax.numpy.int32) % len(MODALITIES)
  cfg = lib.mesh_config((2, 2, 2), ("data", "fsdp", "tensor"))
  mesh, rules = sharding.mesh_from_config(cfg, jax.devices()[:8]), sharding.rules_from_config(cfg)
  prompt = sharding.shard_batch(host, mesh, rules)
  variables, _ = sharding.init_sharded(model.init, mesh, rules, jax.random.key(0), prompt)
  with sharding.activate(mesh, rules):
    tokens, _ = generate.generate(model, variables, prompt, 6, modality_table=table)
  assert variables["params"]["layers"]["ffn"]["wo"]["kernel"].sharding.spec == P(None, None, "tensor", "fsdp")
  single = jax.device_get(variables)
  want, _ = generate.generate(model, single, host, 6, modality_table=table)
  np.testing.assert_array_equal(jax.device_get(tokens), want)


@pytest.mark.parametrize("routing_rows", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_routing_groups_make_the_mesh_invisible(routing_rows):
  """MoMa expert choice with Mixture-of-Depths on a (2, 4) data/expert mesh (one row per device): with the
  default routing group, one row, loss and gradients are one device's; routing among each device's rows
  (routing_rows=0: one row here, all 8 on one device) changes the model. The trainer's twin, every routed
  model on every mesh, is test_sharding_train's slow test_all_steps_match_single_device."""
  routed = dict(routing_rows=routing_rows)
  model = decoder.as_model(dict(TINY, ffn="moe", moe=dict(layout="2t1i1a", **routed),
                                mod=dict(enabled=True, capacity=0.5, **routed)))
  host = make_batch()

  def loss_and_grad_norm(params, batch):
    loss, grads = jax.value_and_grad(lambda p: decoder.loss_fn(
        model.apply({"params": p}, batch), batch, MODALITIES)[0])(params)
    return loss, optax.tree_utils.tree_norm(grads)

  cfg = lib.mesh_config((2, 4), ("data", "expert"), (("modality", None),))
  mesh, rules = sharding.mesh_from_config(cfg, jax.devices()[:8]), sharding.rules_from_config(cfg)
  batch = sharding.shard_batch(host, mesh, rules)
  variables, _ = sharding.init_sharded(model.init, mesh, rules, jax.random.key(0), batch)
  with sharding.activate(mesh, rules):
    on_mesh = jax.jit(loss_and_grad_norm)(variables["params"], batch)
  alone = jax.jit(loss_and_grad_norm)(jax.device_get(variables["params"]), host)
  if routing_rows:
    np.testing.assert_allclose(jax.device_get(on_mesh), alone, rtol=1e-5)
  else:
    assert not np.allclose(jax.device_get(on_mesh), alone, rtol=1e-3)


# Together these create every kind of parameter the decoder, its Transfusion patch layers and the AGD
# encoder heads have.
EVERY_PARAM = {
    "mot_layer_norms": dict(untie=UNTIE["mot"], norm="layer", qk_norm_kind="layer"),
    "moma_mod": dict(ffn="moe", moe=dict(layout="2t1i1a", aux_router=True), num_layers=2,
                     mod=dict(enabled=True, aux_router=True)),
    "mom": dict(block="mamba", d_ff=0, untie=("in_proj", "x_proj", "dt_proj", "out_proj", "conv", "norm")),
    "transfusion_unet": dict(modalities=("text", "image"), patch_dim=4, patch_proj="unet", tie_embeddings=True),
}


@pytest.mark.parametrize("kind", EVERY_PARAM)
def test_every_parameter_carries_logical_axes(kind):
  """Shardings come from the boxes alone: an unboxed parameter would be replicated, so there is none."""
  model = encoder.Model(decoder.as_model({**TINY, **EVERY_PARAM[kind]}), "lm")  # encoder heads too
  batch = make_batch(b=2)
  if model.backbone.config.patch_dim:
    batch["image_block"] = np.where(batch["modality"] == 1, batch["segment"], 0).astype(np.int32)
    batch["modality"] = (batch["image_block"] > 0).astype(np.int32)
    batch["patches"] = np.ones((*batch["tokens"].shape, 4), np.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=is_box)
  assert [jax.tree_util.keystr(p) for p, leaf in leaves if not is_box(leaf)] == []
  if kind == "transfusion_unet":
    assert any("patch_in" in jax.tree_util.keystr(p) for p, _ in leaves)


def test_an_unboxed_parameter_is_refused_naming_it():
  class Unboxed(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x @ self.param("w", nn.initializers.ones, (4, 4))

  mesh = sharding.mesh_from_config(lib.mesh_config((1,), ("data",)), jax.devices()[:1])
  abstract = jax.eval_shape(Unboxed().init, jax.random.key(0), np.ones((1, 4), np.float32))
  with pytest.raises(ValueError, match=r"params/w: a state leaf of shape \(4, 4\) has no logical axes"):
    sharding.logical_shardings(abstract, mesh, sharding.default_rules(("data",)), require_boxed=True)
