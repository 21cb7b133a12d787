"""Decoder invariants: MoT ≡ dense when copies are equal, causality, packing, losses, config errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moma.models import decoder

ALL = ("qkv", "o", "ffn", "norm", "qk_norm")
BASE = dict(modalities=("text", "image", "audio"), vocab_size=48, d_model=16, num_layers=2,
            num_heads=4, num_kv_heads=2, d_ff=32, qk_norm=True)


def make_batch(seed=0, b=2, l=12, num_modalities=3, vocab=48):
  rng = np.random.default_rng(seed)
  segment = np.ones((b, l), np.int32)
  segment[:, l // 2:] = 2  # two packed documents per row
  position = np.concatenate([np.arange(l // 2), np.arange(l - l // 2)])[None].repeat(b, 0)
  tokens = rng.integers(0, vocab, (b, l))
  return dict(tokens=jnp.asarray(tokens, jnp.int32),
              modality=jnp.asarray(rng.integers(0, num_modalities, (b, l)), jnp.int32),
              segment=jnp.asarray(segment), position=jnp.asarray(position, jnp.int32),
              targets=jnp.asarray(np.roll(tokens, -1, 1), jnp.int32),
              loss_mask=jnp.asarray(rng.random((b, l)) > 0.2, jnp.float32))


def random_variables(model, *args, seed=3, **kwargs):
  """Variables of `model.init(key, *args, **kwargs)` drawn on the host, N(0, 0.3²) (only shapes are traced;
  no init to compile). Nothing is ones, zeros or equal across modalities, so such inits cannot hide bugs."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *args, **kwargs))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


def _take_modality(boxed, values, m):
  """Modality m's copy of every parameter that `boxed` (the abstract init) marks with a modality axis."""
  flat = dict(jax.tree_util.tree_leaves_with_path(values))
  def visit(path, p):
    if isinstance(p, nn.LogicallyPartitioned) and "modality" in p.names:
      return np.take(np.asarray(flat[path]), m, axis=p.names.index("modality"))
    return flat[path]
  return jax.tree_util.tree_map_with_path(visit, boxed, is_leaf=lambda p: isinstance(p, nn.LogicallyPartitioned))


def tie_copies(mot_vars, dense_vars):
  """MoT variables whose every modality copy is the dense model's weight."""
  dense = nn.meta.unbox(dense_vars)
  flat_dense = dict(jax.tree_util.tree_leaves_with_path(dense))
  def visit(path, p):
    d = flat_dense[path]
    if isinstance(p, nn.LogicallyPartitioned) and "modality" in p.names:
      axis = p.names.index("modality")
      return jnp.broadcast_to(jnp.expand_dims(d, axis), p.value.shape)
    return d
  return jax.tree_util.tree_map_with_path(
      visit, mot_vars, is_leaf=lambda p: isinstance(p, nn.LogicallyPartitioned))


@pytest.mark.parametrize("placement,norm", [("pre", "rms"), ("swin", "layer")])
def test_untied_with_equal_copies_is_dense(placement, norm):
  batch = make_batch()
  dense = decoder.as_model(dict(BASE, norm=norm, norm_placement=placement))
  mot = decoder.as_model(dict(BASE, norm=norm, norm_placement=placement, untie=ALL))
  dense_vars = random_variables(dense, batch)
  mot_vars = tie_copies(jax.eval_shape(mot.init, jax.random.key(0), batch), dense_vars)
  np.testing.assert_allclose(jax.jit(mot.apply)(mot_vars, batch), jax.jit(dense.apply)(dense_vars, batch),
                             rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def mot_model():
  model = decoder.as_model(dict(BASE, untie=ALL))
  return model, random_variables(model, make_batch()), jax.jit(model.apply)


def test_one_modality_batch_is_dense_with_that_modalitys_weights(mot_model):
  mot, mot_vars, mot_apply = mot_model
  batch = make_batch()
  dense_apply = jax.jit(decoder.as_model(BASE).apply)
  boxed = jax.eval_shape(mot.init, jax.random.key(0), batch)
  for m in range(3):
    one = dict(batch, modality=jnp.full_like(batch["modality"], m))
    np.testing.assert_allclose(mot_apply(mot_vars, one), dense_apply(_take_modality(boxed, mot_vars, m), one),
                               rtol=1e-4, atol=1e-4)


def test_causal(mot_model):
  model, variables, apply = mot_model
  batch = make_batch()
  batch["segment"] = jnp.ones_like(batch["segment"])
  batch["position"] = jnp.broadcast_to(jnp.arange(12), (2, 12))
  k = 5
  changed = dict(batch, tokens=batch["tokens"].at[:, k + 1:].set(3),
                 modality=batch["modality"].at[:, k + 1:].set(2))
  a, b = apply(variables, batch), apply(variables, changed)
  np.testing.assert_allclose(a[:, :k + 1], b[:, :k + 1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[:, k + 1:], b[:, k + 1:])


def test_packed_documents_do_not_attend_to_each_other(mot_model):
  model, variables, apply = mot_model
  batch = make_batch()  # documents at [0, 6) and [6, 12)
  first_changed = dict(batch, tokens=batch["tokens"].at[:, :6].set(1))
  alone = {k: v[:, 6:] for k, v in batch.items()}
  full, other = apply(variables, batch), apply(variables, first_changed)
  np.testing.assert_allclose(full[:, 6:], other[:, 6:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(full[:, 6:], apply(variables, alone), rtol=1e-4, atol=1e-4)


def test_image_block_is_bidirectional():
  from moma.layers.attention import attention_mask
  segment = jnp.array([[1, 1, 1, 1, 1, 2]])
  image_block = jnp.array([[0, 1, 1, 1, 0, 0]])
  mask = np.asarray(attention_mask(segment, image_block))[0, 0]
  assert mask[1, 3] and mask[3, 1] and not mask[0, 1] and mask[4, 2] and not mask[5, 4]
  np.testing.assert_array_equal(np.asarray(attention_mask(segment))[0, 0],
                                np.tril(np.ones((6, 6), bool)) & (segment[0][:, None] == segment[0]))


def test_per_modality_losses_sum_to_total(mot_model):
  model, variables, apply = mot_model
  batch = make_batch(seed=3)
  loss, metrics = decoder.loss_fn(apply(variables, batch), batch, model.config.modalities)
  weights = np.array([metrics[f"tokens/{m}"] for m in model.config.modalities])
  losses = np.array([metrics[f"loss/{m}"] for m in model.config.modalities])
  assert weights.sum() == np.asarray(batch["loss_mask"]).sum()
  np.testing.assert_allclose((weights * losses).sum() / weights.sum(), loss, rtol=1e-5)


def test_target_modality_follows_next_token_in_document():
  batch = dict(modality=jnp.array([[0, 0, 1, 1, 2, 0]]), segment=jnp.array([[1, 1, 1, 1, 2, 2]]))
  np.testing.assert_array_equal(decoder.target_modality(batch), [[0, 1, 1, 1, 0, 0]])


# dense is slow: [untie1] takes the same remat + tied-embedding step through the untied model
@pytest.mark.parametrize("untie", [pytest.param((), marks=pytest.mark.slow), ALL])
def test_one_train_step_lowers_loss(untie):
  batch = make_batch(seed=4)
  model = decoder.as_model(dict(BASE, untie=untie, remat=True, tie_embeddings=True))
  params = random_variables(model, batch)["params"]
  opt = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      return decoder.loss_fn(model.apply({"params": p}, batch), batch, model.config.modalities)[0]
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  opt_state = opt.init(params)
  losses = []
  for _ in range(3):
    params, opt_state, value = step(params, opt_state)
    losses.append(float(value))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]


@pytest.mark.parametrize("override,field", [
    (dict(num_heads=3), "num_heads"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(untie=("qkv", "experts")), "untie"),
    (dict(untie="qkv,in_proj"), "untie"),
    (dict(norm="batch"), "norm"),
    (dict(norm_placement="post"), "norm_placement"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(block="rnn"), "block"),
    (dict(untie=("qkv", "qk_norm"), qk_norm=False), "qk_norm=False"),
    (dict(qk_norm=True, qk_norm_kind="batch"), "qk_norm_kind"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_bad_config_names_the_field(override, field):
  with pytest.raises(ValueError, match=field):
    decoder.as_model({**BASE, **override})


@pytest.mark.parametrize("key,value,field", [
    ("modality", 3, "modalities"), ("tokens", 48, "vocab_size"), ("targets", -1, "vocab_size")])
def test_validate_batch_names_the_field(key, value, field):
  model = decoder.as_model(BASE)
  batch = {k: np.asarray(v) for k, v in make_batch().items()}
  decoder.validate_batch(batch, model)
  batch[key] = batch[key].copy()
  batch[key][0, 3] = value
  with pytest.raises(ValueError, match=field):
    decoder.validate_batch(batch, model)


def test_validate_batch_refuses_continuous_patches():
  batch = dict(make_batch(), patches=np.zeros((2, 12, 4), np.float32))
  with pytest.raises(ValueError, match="data.image_form='discrete'"):
    decoder.validate_batch(batch, decoder.as_model(BASE))
