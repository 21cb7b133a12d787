"""Growing a trained dense / Mamba run into MoT, MoMa and Mixture-of-Mamba (config.init.params_from), and
freezing parameters (config.train.freeze): docs/training.md, "Growing a pretrained model"."""

import functools

import jax
import numpy as np
import pytest

from configs import dense
from configs import mamba
from configs import mom
from configs import moma
from configs import mot
from moma import checkpoint
from moma import steps
from moma import train

MODALITIES = "text+image"


def _small(config, data_cache_dir, **model):
  """1 layer, d_model 16: what these tests check does not depend on the size."""
  config.model.update(d_model=16, num_layers=1, num_heads=2, d_ff=32)
  for key, value in model.items():
    config.model[key.split(".")[0]][key.split(".")[1]] = value
  config.data.cache_dir = data_cache_dir
  config.train.update(steps=2, log_every=1, eval_every=0, progress_bar=False)
  config.checkpoint.update(every_steps=2, async_save=False)
  return config


def _fresh_state(config):
  """(resolved config, model, host batch of step 0, the fresh state init_or_restore gives at step 0)."""
  config = train.resolve_config(config)
  model = steps.build_model(config)
  host = train.host_batches(config, "train")(0)
  mesh, rules = steps.make_mesh(config)
  state = steps.init_or_restore(config, model, None, host, mesh, rules)[0]
  return config, model, host, state


def _loss(config, model, params, host):
  from moma.models import decoder  # pylint: disable=g-import-not-at-top
  return float(steps.eval_step(params, host, model=model, loss_fn=decoder.loss_fn,
                               modalities=tuple(config.model.modalities))["loss"])


@pytest.fixture(scope="module")
def sources(tmp_path_factory, data_cache_dir):
  """Trained 2-step runs over text+image, made on first use: "dense" and "mamba" decoders."""
  root = tmp_path_factory.mktemp("grow")

  class Runs(dict):
    def __missing__(self, name):
      config = _small({"dense": dense, "mamba": mamba}[name].get_config(f"modalities={MODALITIES}"),
                      data_cache_dir)
      train.train_and_evaluate(config, str(root / name))
      self[name] = str(root / name)
      return self[name]

  return Runs()


def _source_loss(source, host):
  config = checkpoint.read_config(source, "source")
  config = train.resolve_config(__import__("ml_collections").ConfigDict(config))
  model = steps.build_model(config)
  return _loss(config, model, checkpoint.restore_params(source, "source"), host)


GROWN = {
    "mot": ("dense", lambda: mot.get_config(f"modalities={MODALITIES}"), {}, "mixer/q"),
    # One expert per group, token choice with a softmax gate: the gate over one expert is exactly 1 (and
    # dropless: a capacity of 1x the even share would drop the majority modality's extra tokens).
    "moma": ("dense", lambda: moma.get_config("experts=1t1i,routing=topk"), {"moe.dropless": True}, "ffn/wi"),
    "mom": ("mamba", lambda: mom.get_config(f"modalities={MODALITIES}"), {}, "mixer/in_proj"),
}


@pytest.mark.parametrize("target", [
    "mot", pytest.param("moma", marks=pytest.mark.slow), pytest.param("mom", marks=pytest.mark.slow)])
def test_grown_model_gives_the_source_loss_at_step_0(target, sources, data_cache_dir):
  source, make, model, copied = GROWN[target]
  config = _small(make(), data_cache_dir, **model)
  config.init.params_from = sources[source]
  config, net, host, state = _fresh_state(config)
  grown, dense_loss = _loss(config, net, state.params, host), _source_loss(sources[source], host)
  np.testing.assert_allclose(grown, dense_loss, rtol=1e-6)
  untied = _get(state.params, f"layers/{copied}/kernel")
  np.testing.assert_array_equal(untied[:, 0], untied[:, 1])  # every copy / expert is the source weight


def _get(tree, path):
  return functools.reduce(lambda t, k: t[k], path.split("/"), tree)


def test_a_grown_model_takes_its_sources_shape(sources, data_cache_dir):
  """The user names the architecture (here the MoT preset at its own size); the shape is the source's."""
  config = mot.get_config(f"modalities={MODALITIES}")
  config.data.cache_dir = data_cache_dir
  config.init.params_from = sources["dense"]
  resolved = train.resolve_config(config)
  source = checkpoint.read_config(sources["dense"], "source")["model"]
  for key in ("d_model", "num_layers", "num_heads", "d_ff", "norm_eps", "rope_theta", "max_seq_len"):
    assert resolved.model[key] == source[key], key
  assert resolved.model.untie == config.model.untie and resolved.model.d_model != config.model.d_model


def test_a_source_of_another_block_is_refused_naming_the_field(sources, data_cache_dir, tmp_path):
  config = _small(mom.get_config(f"modalities={MODALITIES}"), data_cache_dir)
  config.init.params_from = sources["dense"]
  with pytest.raises(ValueError, match=r"^config.init.params_from=.* has model.block=transformer, this config "
                                       r"mamba: a grown model keeps its source's block"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_grown_vocabulary_keeps_the_source_rows(sources, data_cache_dir):
  """The source's rows bit for bit, the new rows (image codebook, padding) their fresh init."""
  config = _small(mot.get_config(f"modalities={MODALITIES}"), data_cache_dir)
  src = checkpoint.restore_params(sources["dense"], "source")
  old = src["embed"]["embedding"].shape[0]
  config.model.vocab_size = old + 24
  fresh = _fresh_state(config)[3].params
  config.init.params_from = sources["dense"]
  grown = _fresh_state(config)[3].params
  for name, axis in (("embed/embedding", 0), ("lm_head/kernel", 1)):
    new_rows = lambda tree: np.take(_get(tree, name), range(old, old + 24), axis=axis)
    np.testing.assert_array_equal(np.take(_get(grown, name), range(old), axis=axis), _get(src, name))
    np.testing.assert_array_equal(new_rows(grown), new_rows(fresh))


def _train(config, state, host_at, num_steps):
  from moma.models import decoder  # pylint: disable=g-import-not-at-top
  step = jax.jit(functools.partial(steps.train_step, model=steps.build_model(config), loss_fn=decoder.loss_fn,
                                   modalities=tuple(config.model.modalities), seed=0))
  for i in range(num_steps):
    state = step(state, host_at(i))[0]
  return state


def _grown_frozen_config(sources, data_cache_dir):
  config = _small(mot.get_config(f"modalities={MODALITIES}"), data_cache_dir)
  config.init.params_from = sources["dense"]
  config.train.update(freeze=("text",), warmup_steps=0)
  return config


def _check_frozen_text(state, modalities, source):
  """The text copies are the dense weights bit for bit, the image copies moved, and Adam keeps moments for
  the image copies and the shared weights only."""
  src, text, frozen = checkpoint.restore_params(source, "source"), modalities.index("text"), 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
    name, leaf = "/".join(k.key for k in path), np.asarray(leaf)
    dense_weight = _get(src, name)
    if leaf.ndim > dense_weight.ndim:  # untied: the modality axis is the one the dense weight lacks
      axis = next(a for a in range(leaf.ndim) if list(np.delete(leaf.shape, a)) == list(dense_weight.shape))
      np.testing.assert_array_equal(np.take(leaf, text, axis), dense_weight, err_msg=name)
      assert not np.array_equal(np.take(leaf, 1 - text, axis), dense_weight), name
      frozen += dense_weight.size
  assert frozen
  adam = state.opt_state.inner_states["train"].inner_state[1][0]  # (clip, adamw(scale_by_adam, ...))
  total = sum(x.size for x in jax.tree.leaves(state.params))
  assert sum(x.size for x in jax.tree.leaves(adam.mu)) == total - frozen


def test_frozen_text_copies_stay_the_grown_weights(sources, data_cache_dir):
  """MoT grown from the dense run with text frozen, 5 steps of steps.train_step."""
  config, _, _, state = _fresh_state(_grown_frozen_config(sources, data_cache_dir))
  state = _train(config, state, train.host_batches(config, "train"), 5)
  _check_frozen_text(state, tuple(config.model.modalities), sources["dense"])


@pytest.mark.slow
def test_frozen_text_copies_stay_the_grown_weights_through_checkpoints_and_resume(sources, data_cache_dir,
                                                                                    tmp_path):
  """The same through the trainer: 25 steps, then a resume to 50; the step-50 checkpoint is checked."""
  config = _grown_frozen_config(sources, data_cache_dir)
  config.checkpoint.every_steps = 25
  for num_steps in (25, 50):
    config.train.steps = num_steps
    train.train_and_evaluate(config, str(tmp_path))
  config, model, host, _ = _fresh_state(config)
  mngr = checkpoint.manager(str(tmp_path), config)
  state = steps.init_or_restore(config, model, mngr, host, *steps.make_mesh(config))[0]
  assert int(state.step) == 50
  _check_frozen_text(state, tuple(config.model.modalities), sources["dense"])


def test_a_freeze_entry_matching_nothing_is_refused_naming_the_field(data_cache_dir, tmp_path):
  config = _small(dense.get_config(f"modalities={MODALITIES}"), data_cache_dir)
  config.train.freeze = ("text",)  # a dense model has no text copies
  with pytest.raises(ValueError, match=r"^config.train.freeze=\('text',\): 'text' matches no parameter"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
