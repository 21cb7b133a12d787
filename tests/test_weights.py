"""moma.weights: Hugging Face checkpoints (tests/hf_fixtures.py) in and out.

Default: every family imports, exports and re-imports bit-identically, the imported run's forward runs,
and bad input is one line that writes nothing. With torch and transformers installed (not in any extra),
moma's logits equal `from_pretrained`'s (rel <= 1e-5, float32) and greedy generation gives the same tokens.
"""

import importlib.util
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moma import checkpoint
from moma import data
from moma import steps
from moma import train
from moma import weights
from tests import hf_fixtures


def _load_run(workdir):
  config = ml_collections.ConfigDict(checkpoint.read_config(workdir, "--workdir"))
  return config, steps.build_model(config), checkpoint.restore_params(workdir, "--workdir")


def _batch(hf_ids_BL):
  """A one-document batch of HF token ids, as moma ids (TEXT_OFFSET + id)."""
  tokens = jnp.asarray(hf_ids_BL, jnp.int32) + data.TEXT_OFFSET
  b, length = tokens.shape
  return dict(tokens=tokens, modality=jnp.zeros_like(tokens), segment=jnp.ones_like(tokens),
              position=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length)))


@pytest.mark.parametrize("family", hf_fixtures.FAMILIES)
def test_import_export_reimport_bit_identical(family, tmp_path):
  source = hf_fixtures.write(family, str(tmp_path / "hf"), shards=2 if family == "llama" else 1)
  weights.import_hf(source, str(tmp_path / "run"))
  weights.export_hf(str(tmp_path / "run"), str(tmp_path / "out"))
  original, exported = hf_fixtures.read(source), hf_fixtures.read(str(tmp_path / "out"))
  assert sorted(original) == sorted(exported)
  for name, value in original.items():
    assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
  weights.import_hf(str(tmp_path / "out"), str(tmp_path / "again"))
  config, model, params = _load_run(str(tmp_path / "run"))
  _, _, params_again = _load_run(str(tmp_path / "again"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params_again)
  cfg = model.config
  hf = hf_fixtures.hf_config(family)
  assert (cfg.d_model, cfg.num_layers, cfg.vocab_size) == (32, 2, data.TEXT_OFFSET + hf_fixtures.VOCAB)
  assert cfg.tie_embeddings == hf["tie_word_embeddings"]
  if family != "mamba":
    assert (cfg.norm_eps, cfg.rope_theta) == (hf["rms_norm_eps"], hf["rope_theta"])
    assert (cfg.qk_norm, cfg.qk_norm_kind) == {"llama": (False, "rms"), "qwen3": (True, "rms"),
                                               "chameleon": (True, "layer")}[family]
  logits = model.apply({"params": params}, _batch(np.arange(12)[None] % 50))
  assert logits.shape == (1, 12, cfg.vocab_size) and bool(jnp.isfinite(logits).all())
  assert os.path.exists(tmp_path / "run" / "config.py") and config.model.modalities == ["text"]


def test_special_rows_follow_bos_eos(tmp_path):
  """moma's BOS / EOS rows copy HF's bos / eos rows; the other specials start at the text rows' mean."""
  source = hf_fixtures.write("llama", str(tmp_path / "hf"))
  weights.import_hf(source, str(tmp_path / "run"))
  embed = np.asarray(_load_run(str(tmp_path / "run"))[2]["embed"]["embedding"])
  hf_embed = hf_fixtures.read(source)["model.embed_tokens.weight"]
  np.testing.assert_array_equal(embed[data.TEXT_OFFSET:], hf_embed)
  np.testing.assert_array_equal(embed[[data.BOS, data.EOS]], hf_embed[[1, 2]])
  np.testing.assert_allclose(embed[data.PAD], hf_embed.astype(np.float64).mean(0), atol=1e-7)
  assert weights.Layout.of(dict(bos_token_id=1, eos_token_id=[2, 3])) == weights.Layout(1, 2)  # Llama 3


def _import_bfloat16_mamba(tmp_path) -> str:
  source = hf_fixtures.write("mamba", str(tmp_path / "hf"))
  run = str(tmp_path / "run")
  weights.import_hf(source, run, dtype="bfloat16")
  return run


def test_bfloat16_import_restores_as_the_trainer_state(tmp_path):
  """--dtype=bfloat16 casts each tensor (A_log and D stay float32); the run's config.py gives a config the
  trainer accepts for this workdir, and the step-0 checkpoint restores into its abstract TrainState."""
  run = _import_bfloat16_mamba(tmp_path)
  spec = importlib.util.spec_from_file_location("run_config", os.path.join(run, "config.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = train.resolve_config(module.get_config())
  checkpoint.check_compatible(config, run)
  model, (mesh, rules) = steps.build_model(config), steps.make_mesh(config)
  batch = _batch(np.zeros((config.train.batch_size, config.train.seq_len), np.int32))
  mngr = checkpoint.manager(run, config)
  abstract = steps.abstract_state(config, model, batch, mesh, rules)
  state, step, window = checkpoint.restore_latest(mngr, abstract)
  mngr.close()
  assert step == 0 and window == dict(rows=[], seconds=0.0)
  assert state.params["layers"]["mixer"]["in_proj"]["kernel"].dtype == jnp.bfloat16
  assert state.params["layers"]["mixer"]["A_log"].dtype == jnp.float32
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state.params,
               _load_run(run)[2])


@pytest.mark.slow
def test_trainer_resumes_the_import(tmp_path):
  """`python -m moma.main --config=RUN/config.py --workdir=RUN` trains on from step 0 (~45 s on CPU)."""
  run = _import_bfloat16_mamba(tmp_path)
  code = (f"import sys; sys.argv = ['x', '--config={run}/config.py', '--workdir={run}', "
          "'--config.train.steps=1', '--config.train.eval_every=0']; "
          "from moma import main; from moma import cli; cli.run(main.main)")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert done.returncode == 0, done.stderr[-2000:]
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["0", "1"]


BAD = [
    ("missing tensor", dict(drop=("model.layers.1.mlp.up_proj.weight",)),
     "missing tensor model.layers.1.mlp.up_proj"),
    ("shape", dict(shapes={"model.layers.0.self_attn.o_proj.weight": (32, 16)}),
     "tensor model.layers.0.self_attn.o_proj.weight has shape (32, 16), config.json implies (32, 32)"),
    ("family", dict(config=dict(model_type="gpt2")), "model_type='gpt2'"),
    ("config key", dict(unsaid=("hidden_size",)), "config.json has no 'hidden_size'"),
    ("rope scaling", dict(config=dict(rope_scaling=dict(rope_type="llama3", factor=8.0))), "rope_scaling="),
    ("bias option", dict(config=dict(attention_bias=True)), "attention_bias=True"),
    ("bias tensor", dict(shapes={"model.layers.0.self_attn.q_proj.bias": (32,)}),
     "tensor model.layers.0.self_attn.q_proj.bias"),
    ("sliding window", dict(config=dict(sliding_window=16)), "sliding_window=16"),
    ("tie mismatch", dict(config=dict(tie_word_embeddings=True), shapes={"lm_head.weight": (300, 32)}),
     "lm_head.weight differs"),
    ("vocab", dict(shapes={"model.embed_tokens.weight": (310, 32)}),
     "has 310 rows, config.json vocab_size=300"),
]


@pytest.mark.parametrize("case,kwargs,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(case, kwargs, message, tmp_path):
  del case
  source = hf_fixtures.write("llama", str(tmp_path / "hf"), **kwargs)
  with pytest.raises(ValueError) as e:
    weights.import_hf(source, str(tmp_path / "run"))
  assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_per_head_qk_norm_refused(tmp_path):
  source = hf_fixtures.write("chameleon", str(tmp_path / "hf"),
                             shapes={"model.layers.0.self_attn.q_norm.weight": (4, 8)})
  with pytest.raises(ValueError, match="q_norm.weight holds a different QK-norm table per head"):
    weights.import_hf(source, str(tmp_path / "run"))
  assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_export_refuses_mot_by_name(tmp_path):
  source = hf_fixtures.write("llama", str(tmp_path / "hf"))
  run = tmp_path / "run"
  weights.import_hf(source, str(run))
  config = checkpoint.read_config(str(run), "--workdir")
  config["model"]["untie"] = ["ffn"]
  checkpoint.write_config(ml_collections.ConfigDict(config), str(run))
  with pytest.raises(ValueError, match=r"config.model.untie=\('ffn',\): exporting to Hugging Face"):
    weights.export_hf(str(run), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_export_of_a_moma_run_keeps_its_vocabulary(tmp_path):
  """A run without hf/ (trained in moma) exports its own ids: every row, moma's special ids."""
  run = tmp_path / "run"
  weights.import_hf(hf_fixtures.write("qwen3", str(tmp_path / "hf")), str(run))
  shutil.rmtree(run / "hf")
  weights.export_hf(str(run), str(tmp_path / "out"))
  exported = hf_fixtures.read(str(tmp_path / "out"))["model.embed_tokens.weight"]
  np.testing.assert_array_equal(exported, np.asarray(_load_run(str(run))[2]["embed"]["embedding"]))
  hf = checkpoint.read_config(str(tmp_path / "out"), "--hf")
  assert (hf["vocab_size"], hf["bos_token_id"], hf["eos_token_id"]) == (exported.shape[0], data.BOS, data.EOS)


def test_cli_one_line(tmp_path):
  done = subprocess.run([sys.executable, "-m", "moma.weights", "import", f"--hf={tmp_path}/none",
                         f"--workdir={tmp_path}/run"], capture_output=True, text=True, timeout=120,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert done.returncode == 1 and done.stderr.strip().count("\n") == 0, done.stderr
  assert "config.json" in done.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow  # ~70 s for the four (torch and transformers load); -m slow runs it
@pytest.mark.parametrize("family", hf_fixtures.FAMILIES)
def test_logits_and_greedy_equal_transformers(family, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from moma.models import generate  # pylint: disable=g-import-not-at-top
  source = hf_fixtures.write(family, str(tmp_path / "hf"))
  weights.import_hf(source, str(tmp_path / "run"))
  _, model, params = _load_run(str(tmp_path / "run"))
  ids = np.random.default_rng(1).integers(0, hf_fixtures.VOCAB, (2, 16))
  hf_cls = getattr(transformers, hf_fixtures.hf_config(family)["architectures"][0])
  hf_model = hf_cls.from_pretrained(source, torch_dtype=torch.float32).eval()
  with torch.no_grad():
    want = hf_model(torch.tensor(ids)).logits.numpy()
  got = np.asarray(model.apply({"params": params}, _batch(ids)))[..., data.TEXT_OFFSET:]
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert rel <= 1e-5, rel
  with torch.no_grad():
    hf_tokens = hf_model.generate(torch.tensor(ids[:, :8]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0).numpy()[:, 8:]
  tokens, _ = generate.generate(model, {"params": params}, _batch(ids[:, :8]), 8)
  np.testing.assert_array_equal(np.asarray(tokens) - data.TEXT_OFFSET, hf_tokens)
