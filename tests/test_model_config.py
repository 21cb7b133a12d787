"""ModelConfig: built once from config.model, frozen, hashable, equal across the config.json round trip."""

import dataclasses
import json

import ml_collections
import pytest

from moma.models import decoder
from moma.models import generate
from moma.models import model_config
from moma.models.model_config import ModelConfig, MoeConfig

MODEL = dict(modalities=("text", "image"), vocab_size=32, d_model=16, num_heads=4, d_ff=32, ffn="moe",
             moe=dict(layout="2t2i", token_fractions=(0.5, 0.5)))
MOD = dict(MODEL, ffn="dense", mod=dict(enabled=True))


def test_config_dict_and_its_json_round_trip_give_one_hashable_config():
  given = ml_collections.ConfigDict(MODEL)
  from_json = json.loads(json.dumps(given.to_dict()))  # lists where the ConfigDict had tuples
  cfg = ModelConfig.from_config(given)
  assert cfg == ModelConfig.from_config(from_json) and hash(cfg) == hash(ModelConfig.from_config(from_json))
  assert cfg.moe == MoeConfig(layout="2t2i", token_fractions=(0.5, 0.5))  # nested dict → typed, defaults filled
  assert (cfg.num_kv_heads, cfg.head_dim) == (4, 4)  # 0 → resolved
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.d_model = 8


@pytest.mark.parametrize("model,match", [
    (dict(MODEL, d_modle=16), r"config.model has unknown keys \['d_modle'\]"),
    (dict(MODEL, moe=dict(layuot="2t2i")), r"config.model.moe has unknown keys \['layuot'\]"),
    (dict(MODEL, moe=dict(layout="2t2x")), r"config.model.moe.layout='2t2x'"),
    (dict(MODEL, moe=dict(layout="2t2i", gate="relu")), r"config.model.moe.gate='relu'"),
    (dict(MODEL, moe=dict(layout="2t2i", token_fractions=(1.0,))), r"config.model.moe.token_fractions=\(1.0,\)"),
    (dict(MODEL, moe=dict(layout="2t2i", capacity_factor=0.0)), r"config.model.moe.capacity_factor=0.0"),
    (dict(MODEL, moe=dict(layout="2t2i", routing="hash")), r"config.model.moe.routing='hash'"),
    (dict(MODEL, moe=dict(layout="2t2i", routing="topk", top_k=3)), r"config.model.moe.top_k=3"),
    (dict(MODEL, moe=dict(layout="2t2i", routing_rows=-1)), r"config.model.moe.routing_rows=-1"),
    (dict(MODEL, aux_routing=True), r"config.model.moe.aux_router=True, trained by the aux_routers stage"),
    (dict(MOD, mod=dict(enabled=True, routing_rows=-1)), r"config.model.mod.routing_rows=-1"),
    (dict(MOD, mod=dict(enabled=True, capacity=1.5)), r"config.model.mod.capacity=1.5"),
    (dict(MOD, mod=dict(enabled=True, selection="row")), r"config.model.mod.selection='row'"),
    (dict(MOD, mod=dict(enabled=True, every=3)), r"config.model.mod.every=3"),
    (dict(MOD, aux_routing=True), r"config.model.mod.aux_router=True"),
])
def test_unknown_or_bad_fields_are_named(model, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig.from_config(model)


@pytest.mark.parametrize("model,match", [
    (dict(MOD, d_ff=0), r"config.model.d_ff=0 must be an integer >= 1 \(d_ff=0, no FFN, is for block='mamba'"),
    (dict(MODEL, d_ff=0), r"config.model.d_ff=0 must be an integer >= 1"),  # routed experts need a width
    (dict(MOD, d_model=0), r"config.model.d_model=0 must be an integer >= 1; set e.g. --config.model.d_model=256"),
    (dict(MOD, num_heads=0), r"config.model.num_heads=0 must be an integer >= 1"),
    (dict(MOD, num_kv_heads=-1), r"config.model.num_kv_heads=-1 must be an integer >= 0"),
    (dict(MOD, head_dim=-4), r"config.model.head_dim=-4 must be an integer >= 0"),
    (dict(MOD, max_seq_len=0), r"config.model.max_seq_len=0"),
    (dict(MOD, num_layers=1.5), r"config.model.num_layers=1.5 must be an integer"),
    (dict(MOD, moe=dict(top_k=0)), r"config.model.moe.top_k=0"),  # checked though ffn is dense
    (dict(MOD, mamba=dict(expand=0)), r"config.model.mamba.expand=0"),
    (dict(MOD, diffusion=dict(timesteps=0)), r"config.model.diffusion.timesteps=0"),
])
def test_every_size_field_is_at_least_one(model, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig.from_config(model)


def test_a_mamba_block_may_have_no_ffn():
  assert ModelConfig.from_config(dict(MOD, block="mamba", d_ff=0, mod=dict(enabled=False))).d_ff == 0


def test_equal_models_share_one_compiled_generate():
  """The compile cache keys on the model (its frozen config), not on the object's identity."""
  a, b = decoder.as_model(MODEL), decoder.as_model(ml_collections.ConfigDict(MODEL))
  assert a is not b and generate._compiled(a, 3) is generate._compiled(b, 3)  # pylint: disable=protected-access
  assert generate._compiled(a, 3) is not generate._compiled(a, 4)  # pylint: disable=protected-access


def test_aux_routing_of_token_choice_needs_no_aux_router():
  ModelConfig.from_config(dict(MODEL, aux_routing=True, moe=dict(layout="2t2i", routing="topk")))


def test_routing_rows_must_divide_each_devices_rows():
  assert model_config.routing_group("moe", 1, 6) == 1 and model_config.routing_group("moe", 3, 6) == 3
  assert model_config.routing_group("mod", 0, 6) == 6  # 0: each device's rows
  with pytest.raises(ValueError, match=r"config.model.mod.routing_rows=4 does not divide the 6 batch rows"):
    model_config.routing_group("mod", 4, 6)


def test_per_device_routing_is_recorded_and_a_resume_that_changes_it_is_refused(data_cache_dir, tmp_path):
  """routing_rows=0 (each device's rows) is resolved to the rows it stands for on the run's mesh, written
  to config.json; resuming on a mesh with other rows per device is refused, naming the field."""
  from configs import moma as moma_configs  # pylint: disable=g-import-not-at-top
  from moma import checkpoint, train  # pylint: disable=g-import-not-at-top

  def config(mesh, moe_rows=0, mod_rows=0):
    c = moma_configs.get_config("experts=4t4i,mod=true")
    c.data.cache_dir = data_cache_dir
    c.train.batch_size, c.mesh.shape = 8, mesh
    c.model.moe.routing_rows, c.model.mod.routing_rows = moe_rows, mod_rows
    return c

  first = train.resolve_config(config((2,)))
  assert (first.model.moe.routing_rows, first.model.mod.routing_rows) == (4, 4)
  checkpoint.write_config(first, str(tmp_path))
  checkpoint.check_compatible(train.resolve_config(config((2,))), str(tmp_path))  # same mesh: resumes
  with pytest.raises(ValueError, match=r"config\.model\.moe\.routing_rows: workdir has 4, config has 2"):
    checkpoint.check_compatible(train.resolve_config(config((4,))), str(tmp_path))
  assert train.resolve_config(config((8,), 1, 1)).model.moe.routing_rows == 1  # the default: any mesh
  # A group that does not divide each device's rows is refused before the run writes anything.
  workdir = tmp_path / "new"
  with pytest.raises(ValueError, match=r"config.model.mod.routing_rows=3 does not divide the 4 batch rows"):
    train.train_and_evaluate(config((2,), 1, 3), str(workdir))
  assert not workdir.exists()
