"""Transfusion: schedules and noising against closed forms, the diffusion loss, attention inside image blocks,
MoT ≡ dense, every architecture, cached denoising ≡ the full forward, sampling by seed, clear errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import transfusion
from moma import data
from moma import diffusion
from moma import flops
from moma import transfusion_sample
from moma.layers import patches
from moma.models import decoder
from moma.models import generate
from tests.test_decoder import tie_copies
from tests.test_flops import CONFIG, xla_train_flops_per_token
from tests.test_mamba_decoder import random_variables

IMG = data.IMG
P = 4
BASE = dict(modalities=("text", "image"), vocab_size=300, d_model=16, num_layers=2, num_heads=2, d_ff=32,
            max_seq_len=32, patch_dim=P)
MOT = dict(BASE, untie=("qkv", "o", "ffn", "norm"))
ARCHS = {
    "dense": BASE, "mot": MOT,
    "moma": dict(BASE, ffn="moe", d_ff=16, moe=dict(layout="2t2i", routing="ec", aux_router=True)),
    "mod": dict(MOT, mod=dict(enabled=True, every=2, capacity=0.5, aux_router=True)),
    "mamba": dict(BASE, block="mamba", d_ff=0, mamba=dict(d_state=4)),
    "mom": dict(BASE, block="mamba", d_ff=0, mamba=dict(d_state=4),
                untie=("in_proj", "x_proj", "dt_proj", "out_proj")),
}
T = "t"  # a caption byte in the documents below


def documents_batch(seed=0):
  """Row 0: caption → image (BOS t t BOI 4 patches EOI EOS) then image → caption (BOS BOI 4 patches EOI t
  t EOS); row 1: the same two documents swapped. L = 20, image blocks numbered per row."""
  cap_img = ["bos", T, T, "boi", IMG, IMG, IMG, IMG, "eoi", "eos"]
  img_cap = ["bos", "boi", IMG, IMG, IMG, IMG, "eoi", T, T, "eos"]
  ids = {"bos": data.BOS, "eos": data.EOS, "boi": data.BOI, "eoi": data.EOI, T: 100, IMG: IMG}
  rows = [cap_img + img_cap, img_cap + cap_img]
  tokens = np.array([[ids[t] for t in row] for row in rows], np.int32)
  segment = np.repeat([[1] * 10 + [2] * 10], 2, axis=0).astype(np.int32)
  position = np.tile(np.arange(10), (2, 2)).astype(np.int32)
  image_block = np.zeros_like(tokens)
  for r in range(2):
    image_block[r, tokens[r] == IMG] = np.repeat([1, 2], 4)
  rng = np.random.default_rng(seed)
  patches = np.where((image_block > 0)[..., None], rng.uniform(-1, 1, (2, 20, P)), 0).astype(np.float32)
  targets = np.roll(tokens, -1, 1)
  loss_mask = ((np.roll(segment, -1, 1) == segment) & (targets != IMG)).astype(np.float32)
  loss_mask[:, -1] = 0
  return {k: jnp.asarray(v) for k, v in dict(
      tokens=tokens, modality=(tokens == IMG).astype(np.int32), segment=segment, position=position,
      targets=targets, loss_mask=loss_mask, patches=patches, image_block=image_block).items()}


SETTINGS = diffusion.DiffusionConfig()


def test_cosine_schedule_matches_its_closed_form():
  alpha_bar = diffusion.cosine_alpha_bar(1000)
  f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
  t = np.arange(990)
  np.testing.assert_allclose(alpha_bar[t], f(t) / f(0), rtol=1e-9)  # β is clipped only at the very end
  betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
  assert alpha_bar[0] == 1 and (np.diff(alpha_bar) < 0).all() and betas.max() <= 0.999 + 1e-12


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_add_noise_closed_form(objective):
  s = dataclasses.replace(SETTINGS, objective=objective)
  x0, eps = jnp.full((3, P), 0.5), jnp.full((3, P), -2.0)
  time = jnp.array([[0.0], [0.25], [1.0]])
  x_t, target = diffusion.add_noise(x0, eps, time, s)
  if objective == "flow":
    np.testing.assert_allclose(x_t, (1 - time) * x0 + time * eps, rtol=1e-6)
    np.testing.assert_allclose(target, eps - x0)
  else:
    ab = diffusion.cosine_alpha_bar(1000)[[0, 250, 1000]][:, None]
    np.testing.assert_allclose(x_t, np.broadcast_to(np.sqrt(ab) * 0.5 + np.sqrt(1 - ab) * -2.0, (3, P)),
                               rtol=1e-5)
    np.testing.assert_allclose(target, eps)


def test_model_predicting_the_true_noise_has_zero_diffusion_loss():
  batch = documents_batch()
  inputs = diffusion.inputs(batch, SETTINGS, jax.random.key(0))
  image = inputs.weight[..., None]
  ab = jnp.asarray(diffusion.cosine_alpha_bar(1000), jnp.float32)[jnp.rint(inputs.time * 1000).astype(int)]
  ab = jnp.where(inputs.weight > 0, ab, 0.5)[..., None]  # off image positions: anything but 1
  oracle = image * (inputs.patches - jnp.sqrt(ab) * batch["patches"]) / jnp.sqrt(1 - ab)  # the true ε
  logits = jax.random.normal(jax.random.key(1), (2, 20, 300))
  out = diffusion.Output(logits, oracle, inputs.target, inputs.weight, 5.0)
  loss, metrics = decoder.loss_fn(out, batch, ("text", "image"))
  lm_loss, _ = decoder.loss_fn(logits, batch, ("text", "image"))
  assert float(metrics["loss/image_diffusion"]) < 1e-6 and float(metrics["tokens/image_diffusion"]) == 16
  np.testing.assert_allclose(loss, lm_loss, rtol=1e-6)
  wrong = diffusion.Output(logits, oracle + 0.1 * image, inputs.target, inputs.weight, 5.0)
  np.testing.assert_allclose(decoder.loss_fn(wrong, batch, ("text", "image"))[0], lm_loss + 5 * 0.01,
                             rtol=1e-4)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_noise_limiting_caps_images_that_precede_their_caption(objective):
  batch = documents_batch()
  limited = diffusion.noise_limited(batch["segment"], batch["position"], batch["image_block"])
  np.testing.assert_array_equal(limited[:, 1:3], [[False, True], [True, False]])
  s = dataclasses.replace(SETTINGS, objective=objective)
  times = np.stack([np.asarray(diffusion.inputs(batch, s, jax.random.key(i)).time) for i in range(200)])
  first = times[:, 0, 4]  # row 0's first image: caption → image, not limited
  second = times[:, 0, 12]  # row 0's second image precedes its caption
  assert second.max() <= 0.5 and first.max() > 0.5 and second.min() > 0
  if objective == "ddpm":  # integer steps 1 … T
    np.testing.assert_allclose(times * 1000, np.rint(times * 1000), atol=1e-3)
  block = batch["image_block"][0] == 1  # one time per image
  assert (times[:, 0, np.asarray(block)] == first[:, None]).all()


def test_caption_dropout_moves_only_captions_before_an_image():
  batch = documents_batch()
  args = (batch["segment"], batch["position"], batch["image_block"])
  np.testing.assert_array_equal(diffusion.drop_captions(jax.random.key(0), 0.0, *args), batch["segment"])
  dropped = np.asarray(diffusion.drop_captions(jax.random.key(0), 1.0, *args))
  moved = dropped != np.asarray(batch["segment"])
  np.testing.assert_array_equal(np.flatnonzero(moved[0]), [1, 2])  # row 0: the caption → image caption
  np.testing.assert_array_equal(np.flatnonzero(moved[1]), [11, 12])
  rate = np.mean([np.asarray(diffusion.drop_captions(jax.random.key(i), 0.1, *args))[0, 1] != 1
                  for i in range(300)])
  assert 0.05 < rate < 0.16


@pytest.fixture(scope="module")
def dense_model():
  model = decoder.as_model(BASE)
  return model, random_variables(model, documents_batch())


def _predict(model, variables, batch):
  """Deterministic forward (patches taken as x_t at a fixed time): the Output."""
  batch = dict(batch, timestep=jnp.full(batch["tokens"].shape, 0.3))
  return jax.jit(model.apply)(variables, batch)


def test_image_blocks_attend_both_ways_and_text_stays_causal(dense_model):
  model, variables = dense_model
  batch = documents_batch()
  base = _predict(model, variables, batch)
  later_patch = _predict(model, variables, dict(batch, patches=batch["patches"].at[:, 7].add(1.0)))
  row0 = lambda out: np.asarray(out.prediction[0])
  assert np.abs(row0(later_patch)[4:7] - row0(base)[4:7]).max() > 1e-3  # earlier patches of the block
  np.testing.assert_allclose(later_patch.logits[0, :4], base.logits[0, :4], atol=1e-6)  # text before it
  later_text = _predict(model, variables, dict(batch, tokens=batch["tokens"].at[:, 2].set(101)))
  np.testing.assert_allclose(later_text.logits[0, :2], base.logits[0, :2], atol=1e-6)
  assert np.abs(np.asarray(later_text.prediction[0, 4:8] - base.prediction[0, 4:8])).max() > 1e-3


def test_mot_with_equal_copies_is_dense(dense_model):
  model, variables = dense_model
  mot = decoder.as_model(MOT)
  batch = documents_batch()
  mot_vars = tie_copies(jax.eval_shape(mot.init, jax.random.key(0), batch), variables)
  rng = {"diffusion": jax.random.key(3)}
  want = jax.jit(lambda v, b: model.apply(v, b, rngs=rng))(variables, batch)
  got = jax.jit(lambda v, b: mot.apply(v, b, rngs=rng))(mot_vars, batch)
  np.testing.assert_allclose(got.prediction, want.prediction, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got.logits, want.logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got.target, want.target)


@pytest.mark.parametrize("arch", [a if a in ("mot", "mom") else pytest.param(a, marks=pytest.mark.slow)
                                  for a in ARCHS])
def test_every_architecture_trains_on_patches_and_decodes_images_from_its_cache(arch):
  """One gradient of L_LM + λ·L_diffusion reaches the patch projections; and denoising the second image of
  row 1 on top of its prefix cache (prefill, then the image block alone) equals the full forward there."""
  model = decoder.as_model(ARCHS[arch])
  batch = documents_batch()
  variables = random_variables(model, batch)

  def loss(params):
    out = model.apply({"params": params}, batch, rngs={"diffusion": jax.random.key(0)},
                      mutable=["losses", "metrics"])[0]
    return decoder.loss_fn(out, batch, ("text", "image"))[0]

  grads = jax.jit(jax.grad(loss))(variables["params"])
  for name in ("patch_in", "patch_out"):
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads[name]))
  # Row 1's second document is caption → image: prefix [0, 14), its image block [14, 18).
  predict = {k: v[1:, :18] for k, v in dict(batch, timestep=jnp.full((2, 20), 0.4)).items()}
  full = jax.jit(generate._aux_routed(model).apply)(variables, predict)
  prefix = {k: v[:, :14] for k, v in predict.items() if k not in ("patches", "timestep", "image_block")}
  _, cache = jax.jit(lambda v, b: generate.prefill(model, v, b))(variables, prefix)
  block = {k: predict[k][:, 14:] for k in ("patches", "timestep")}
  step = jax.jit(lambda v, c: generate.decode_step(
      model, v, c, predict["tokens"][:, 14:], predict["modality"][:, 14:], predict["position"][:, 14:],
      image_block=jnp.ones((1, 4), jnp.int32), **block)[0])
  cached = step(variables, cache)
  np.testing.assert_allclose(cached.prediction, full.prediction[:, 14:], rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(step(variables, cache).prediction, cached.prediction)  # the cache is reusable


@pytest.mark.parametrize("override,field", [
    (dict(diffusion=dict(loss_weight=-1.0)), "diffusion.loss_weight"),
    (dict(diffusion=dict(noise_limit=2000)), "diffusion.noise_limit"),
    (dict(diffusion=dict(objective="edm")), "diffusion.objective"),
    (dict(diffusion=dict(steps=3)), "config.model.diffusion has unknown keys"),
    (dict(patch_proj="conv"), "patch_proj"),
])
def test_bad_diffusion_config_names_the_field(override, field):
  with pytest.raises(ValueError, match=field):
    decoder.as_model({**BASE, **override})


def test_bad_patches_name_the_field():
  batch = {k: np.asarray(v) for k, v in documents_batch().items()}
  with pytest.raises(ValueError, match=r"config.model.patch_dim=4 expects \(2, 20, 4\)"):
    decoder.validate_batch(dict(batch, patches=np.zeros((2, 20, 12), np.float32)), decoder.as_model(BASE))
  with pytest.raises(ValueError, match="needs a patch projection: set config.model.patch_dim"):
    decoder.validate_batch(batch, decoder.as_model(dict(BASE, patch_dim=0)))
  decoder.validate_batch(batch, decoder.as_model(BASE))


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_a_sampler_step_with_the_true_prediction_recovers_the_image(objective):
  """DDIM (eta 0) from any time and an Euler step of the straight flow land on x_0 given the true ε / v;
  the sampled times run from noise (1) to clean (0)."""
  s = dataclasses.replace(SETTINGS, objective=objective, flow_shift=3.0)
  times = diffusion.sampling_times(s, 10)
  assert times[0] == 1 and times[-1] == 0 and (np.diff(times) < 0).all() and len(times) == 11
  x0 = jnp.linspace(-0.9, 0.9, 2 * P).reshape(2, P)
  eps = jax.random.normal(jax.random.key(0), x0.shape)
  for time in (float(times[3]), 0.5):
    x_t, target = diffusion.add_noise(x0, eps, time, s)
    np.testing.assert_allclose(diffusion.sampler_step(x_t, target, time, 0.0, s), x0, atol=2e-5)


def test_sampling_is_deterministic_given_a_seed_and_captioning_runs(data_cache_dir):
  config = transfusion.get_config("objective=ddpm")
  config.data.cache_dir = data_cache_dir
  config.model.update(vocab_size=data.vocab_size(config.data), d_model=16, num_heads=2, num_kv_heads=2,
                      d_ff=32)
  model = decoder.as_model(config.model)
  variables = random_variables(model, documents_batch())
  draw = lambda seed, eta: transfusion_sample.generate_patches(
      config, model, variables, ["the digit one.", "a handwritten two."], num_steps=3, cfg_scale=2.0,
      eta=eta, seed=seed)
  first = draw(0, 1.0)
  assert first.shape == (2, 16, P) and np.abs(first).max() <= 1
  np.testing.assert_array_equal(first, draw(0, 1.0))
  assert not np.array_equal(first, draw(1, 1.0))
  assert not np.array_equal(first, draw(0, 0.0))  # DDIM (eta 0) and ancestral sampling differ
  images = np.stack([data.vocab.unpatch(p, (8, 8, 1)) for p in first])
  captions = transfusion_sample.caption_images(config, model, variables, images, num_tokens=4)
  assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


@pytest.mark.parametrize("patch_proj", ["linear", "unet"])
def test_flops_count_the_patch_projections(patch_proj):
  """On a batch of image positions only, the "image" count matches XLA's cost analysis of a train step
  (patch projections and timestep MLP included); text tokens do not pay them."""
  config = dict(CONFIG, patch_dim=P, patch_proj=patch_proj)
  b, l = 2, 64
  batch = dict(tokens=jnp.full((b, l), IMG), modality=jnp.ones((b, l), jnp.int32),
               segment=jnp.ones((b, l), jnp.int32), position=jnp.broadcast_to(jnp.arange(l), (b, l)),
               targets=jnp.zeros((b, l), jnp.int32), loss_mask=jnp.ones((b, l)),
               patches=jnp.zeros((b, l, P)), image_block=jnp.ones((b, l), jnp.int32))
  analytic = flops.per_token(config, l)
  assert analytic["image"] - analytic["text"] == 3 * patches.flops_per_image_token(CONFIG["d_model"], P,
                                                                                  patch_proj)
  assert analytic["text"] == analytic["total"] == flops.per_token(CONFIG, l)["total"]
  measured = xla_train_flops_per_token(decoder.as_model(config), batch)  # noise from the fixed eval key
  assert analytic["image"] == pytest.approx(measured, rel=0.1)


@pytest.mark.parametrize("arch", transfusion.ARCHS)
def test_every_transfusion_config_builds(arch):
  from moma import steps, train  # pylint: disable=g-import-not-at-top
  config = train.resolve_config(transfusion.get_config(f"arch={arch},objective=flow,patch_proj=unet"))
  model = steps.build_model(config)
  assert model.config.patch_dim == 4 and model.config.patch_proj == "unet" and config.data.image_form == "patches"
  assert model.config.diffusion.objective == "flow" and model.config.modalities == ("text", "image")
  with pytest.raises(ValueError, match="arch='gpt'"):
    transfusion.get_config("arch=gpt")
