"""ModelConfig: built once from config.model, frozen, hashable, equal across the config.json round trip."""

import dataclasses
import json

import ml_collections
import pytest

from moma.models import decoder
from moma.models import generate
from moma.models.model_config import ModelConfig, MoeConfig

MODEL = dict(modalities=("text", "image"), vocab_size=32, d_model=16, num_heads=4, d_ff=32, ffn="moe",
             moe=dict(layout="2t2i", token_fractions=(0.5, 0.5)))


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
    (dict(MODEL, mod=dict(enabled=True, routing_rows=-1)), r"config.model.mod.routing_rows=-1"),
])
def test_unknown_or_bad_fields_are_named(model, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig.from_config(model)


def test_equal_models_share_one_compiled_generate():
  """The compile cache keys on the model (its frozen config), not on the object's identity."""
  a, b = decoder.as_model(MODEL), decoder.as_model(ml_collections.ConfigDict(MODEL))
  assert a is not b and generate._compiled(a, 3) is generate._compiled(b, 3)  # pylint: disable=protected-access
  assert generate._compiled(a, 3) is not generate._compiled(a, 4)  # pylint: disable=protected-access
