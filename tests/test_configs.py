"""configs/*.py: argument parsing, size presets, untie presets, CLI overrides, clear errors."""

from absl import flags
from ml_collections import config_flags
import pytest

from configs import common
from configs import dense
from configs import mamba
from configs import mom
from configs import mot
from moma import flops
from moma import steps
from moma import train


@pytest.mark.parametrize("size", list(common.SIZES))
@pytest.mark.parametrize("family", [dense, mot])
def test_every_preset_builds_a_valid_model(family, size):
  config = train.resolve_config(family.get_config(f"size={size}"))
  model = steps.build_model(config)  # Validates config.model (no parameters built).
  assert model.config.max_seq_len >= config.train.seq_len
  for key in ("train.steps", "train.batch_size", "train.seed", "train.log_every",
              "checkpoint.every_steps", "mesh.shape", "mesh.axes"):
    section, field = key.split(".")
    assert field in config[section], key


@pytest.mark.parametrize("size", list(mamba.NUM_LAYERS))
def test_mamba_presets_match_dense_flops(size):
  dense_config = train.resolve_config(dense.get_config(f"size={size}"))
  dense_flops = flops.per_token(dense_config.model, dense_config.train.seq_len)["total"]
  for family in (mamba, mom):
    config = train.resolve_config(family.get_config(f"size={size}"))
    model = steps.build_model(config)
    cfg = model.config
    assert (cfg.block, cfg.d_ff, cfg.mamba.d_state, cfg.mamba.expand) == ("mamba", 0, 16, 2)
    assert cfg.max_seq_len >= config.train.seq_len
    assert flops.per_token(config.model, config.train.seq_len)["total"] == pytest.approx(dense_flops,
                                                                                        rel=0.1)


def test_mom_untie_presets():
  assert mamba.get_config().model.untie == ()
  assert mom.get_config().model.untie == ("in_proj", "x_proj", "dt_proj", "out_proj")
  assert mom.get_config("untie=all_conv").model.untie[-1] == "conv"
  assert mom.get_config("untie=in_proj+norm").model.untie == ("in_proj", "norm")
  assert mom.get_config("untie=none").model.untie == ()
  with pytest.raises(ValueError, match="unknown component 'qkv'"):
    mom.get_config("untie=qkv")
  with pytest.raises(ValueError, match="size='7B' is unknown"):
    mamba.get_config("size=7B")


def test_paper_sizes():
  m = mot.get_config("size=1.4B").model
  assert (m.num_layers, m.d_model, m.d_ff, m.num_heads) == (24, 2048, 8192, 16)
  m = dense.get_config("size=7B").model
  assert (m.num_layers, m.d_model, m.d_ff, m.num_heads, m.qk_norm) == (32, 4096, 11008, 32, True)
  assert (m.qk_norm_kind, m.norm_eps, m.tie_embeddings) == ("layer", 1e-5, False)  # Chameleon-7B


def test_untie_presets_and_components():
  assert dense.get_config().model.untie == ()
  # "all" unties what the model has: QK-norm only where the preset has one (7B).
  assert mot.get_config().model.untie == ("qkv", "o", "ffn", "norm")
  assert mot.get_config("size=7B").model.untie == ("qkv", "o", "ffn", "norm", "qk_norm")
  assert mot.get_config("untie=ffn+qkv").model.untie == ("ffn", "qkv")
  assert mot.get_config("size=tiny,untie=attn").model.untie == ("qkv", "o")
  assert mot.get_config("untie=none").model.untie == ()


@pytest.mark.parametrize("arg, match", [
    ("size=huge", "size='huge' is unknown"),
    ("sise=tiny", "'sise' is unknown"),
    ("size", "expected key=value"),
    ("untie=ffn+mlp", "unknown component 'mlp'"),
])
def test_bad_arguments_name_the_field(arg, match):
  with pytest.raises(ValueError, match=match):
    mot.get_config(arg)


def test_dense_takes_no_untie():
  with pytest.raises(ValueError, match="'untie' is unknown"):
    dense.get_config("untie=ffn")


def test_parse_arg_types():
  args = common.parse_arg("n=3,x=0.5,flag=true,name=a", n=1, x=1.0, flag=False, name="")
  assert (args.n, args.x, args.flag, args.name) == (3, 0.5, True, "a")
  with pytest.raises(ValueError, match="n='three': expected int"):
    common.parse_arg("n=three", n=1)


def test_command_line_overrides():
  argv = ["main", "--config=configs/mot.py:size=tiny,untie=ffn", "--config.model.num_layers=4",
          "--config.train.lr=0.01", "--config.mesh.shape=(2,4)"]
  flag_values = flags.FlagValues()
  # config_flags finds the override flags in the command line it is given (sys.argv by default).
  config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  assert config.model.num_layers == 4 and config.model.untie == ("ffn",)
  assert config.train.lr == 0.01 and tuple(config.mesh.shape) == (2, 4)


def test_unknown_config_file_is_an_error():
  argv = ["main", "--config=configs/nosuch.py"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  with pytest.raises(Exception, match="nosuch"):  # config_flags defers the error to first use.
    flag_values.config.model  # noqa: B018


def test_unknown_model_name():
  config = dense.get_config()
  config.model.name = "nosuch"
  with pytest.raises(ValueError, match="config.model.name='nosuch'"):
    steps.model_module(config)


@pytest.mark.parametrize("arg,modalities,layout", [
    ("experts=4t4i", ("text", "image"), "4t4i"), ("experts=1t1i,routing=topk", ("text", "image"), "1t1i"),
    ("experts=6t2i,mod=true", ("text", "image"), "6t2i"), ("experts=7t1i", ("text", "image"), "7t1i"),
    ("experts=8shared", ("text", "image"), "8shared"),
    ("experts=3t3i2a", ("text", "image", "audio"), "3t3i2a"), ("size=1.4B,mod=true", ("text", "image"), "4t4i")])
def test_moma_presets_build(arg, modalities, layout):
  from configs import moma  # pylint: disable=g-import-not-at-top
  config = train.resolve_config(moma.get_config(arg))
  model = steps.build_model(config)
  assert tuple(config.data.modalities) == modalities and model.config.moe.layout == layout
  assert model.config.mod.enabled == ("mod=true" in arg)


@pytest.mark.parametrize("arg,match", [("experts=4t4x", "letter 'x'"), ("routing=hash", "routing='hash'")])
def test_moma_bad_arguments(arg, match):
  from configs import moma  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=match):
    moma.get_config(arg)


def test_modalities_argument_sets_model_and_data():
  from configs import dense, mamba, mom, mot

  for module in (dense, mot, mamba, mom):
    config = module.get_config("modalities=image+text")
    assert config.model.modalities == ("text", "image")
    assert config.data.modalities == ("text", "image")
  with pytest.raises(ValueError, match="modalities="):
    dense.get_config("modalities=text+video")


@pytest.mark.parametrize("family,arg", [
    ("dense", ""), ("mot", ""), ("moma", ",experts=8shared"), ("mamba", ""), ("mom", ""), ("agd", ""),
    ("transfusion", ",arch=mom")])
def test_small_preset_in_every_family(family, arg):
  """size=small (the CPU studies' preset) is accepted by every config with sizes, at one shape."""
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{family}").get_config(f"size=small{arg}")
  assert (config.model.d_model, config.train.seq_len, config.train.batch_size, config.train.steps) == (
      96, 256, 16, 2500)
  assert config.model.dtype == "float32" and not config.model.remat
