"""The IMP encoder: the decoder's own parameters under "backbone", bidirectional attention, pooling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma.models import decoder
from moma.models import encoder

MODEL = dict(modalities=("text", "image"), vocab_size=40, d_model=16, num_layers=1, num_heads=2,
             d_ff=32, untie=("qkv", "o", "ffn", "norm"), max_seq_len=16)


def _seq(tokens, modality, length=8):
  """One-document rows right-padded to `length`, bidirectional (image_block = segment)."""
  b = len(tokens)
  tok = np.zeros((b, length), np.int32)
  seg = np.zeros((b, length), np.int32)
  for r, row in enumerate(tokens):
    tok[r, :len(row)], seg[r, :len(row)] = row, 1
  pos = np.where(seg > 0, np.arange(length), 0).astype(np.int32)
  return dict(tokens=tok, modality=np.where(seg > 0, modality, 0).astype(np.int32), segment=seg,
              position=pos, image_block=seg.copy())


@pytest.fixture(scope="module")
def setup():
  batch = {"image": _seq([[1, 2, 3, 4, 5], [6, 7, 8]], 1), "text": _seq([[9, 10], [11, 12, 13]], 0),
           "label": np.array([3, 7], np.int32)}
  model = encoder.Model(decoder.as_model(MODEL), "contrastive", num_classes=10, embed_dim=8)
  params = jax.jit(model.init)(jax.random.key(0), batch)["params"]
  return model, params, batch, jax.jit(model.apply)


def test_the_backbone_subtree_is_the_decoders_own_tree(setup):
  _, params, _, _ = setup
  dec = decoder.as_model(MODEL)
  dec_params = jax.eval_shape(dec.init, jax.random.key(0), _seq([[1, 2]], 0))["params"]
  assert jax.tree.structure(params["backbone"]) == jax.tree.structure(dec_params)
  assert set(params) == {"backbone", "contrastive_proj", "logit_scale", "classifier",
                         "classifier_bias"}
  # A decoder objective gives the decoder's logits from the same parameters.
  lm = encoder.Model(decoder.as_model(MODEL), "lm", embed_dim=8)
  seq = _seq([[1, 2, 3]], 0)
  np.testing.assert_allclose(jax.jit(lm.apply)({"params": params}, seq),
                             jax.jit(dec.apply)({"params": params["backbone"]}, seq), rtol=1e-6)


def test_encoder_attention_is_bidirectional_and_pooling_ignores_padding(setup):
  model, params, batch, apply = setup
  hidden = jax.jit(lambda p, b: model.apply({"params": p}, b["image"], True, method=_hidden))

  changed_last = jax.tree.map(np.copy, batch)
  changed_last["image"]["tokens"][0, 4] = 20  # the last real token of row 0
  h0, h1 = hidden(params, batch), hidden(params, changed_last)
  assert not np.allclose(h0[0, 0], h1[0, 0])  # position 0 sees a later token: bidirectional

  padded = jax.tree.map(np.copy, batch)
  padded["image"]["tokens"][1, 5:] = 30  # padding positions of row 1 (segment 0)
  out, out_padded = apply({"params": params}, batch), apply({"params": params}, padded)
  np.testing.assert_allclose(out["image"], out_padded["image"], rtol=1e-5, atol=1e-6)


def _hidden(module, seq, deterministic):
  return encoder.final_hidden(module.backbone, seq, deterministic)


def test_heads_shapes_and_temperature(setup):
  _, params, batch, apply = setup
  out = apply({"params": params}, batch)
  assert out["image"].shape == out["text"].shape == (2, 8)
  np.testing.assert_allclose(out["logit_scale"], np.log(1 / 0.07), rtol=1e-6)
  cls = encoder.Model(decoder.as_model(MODEL), "classification", num_classes=10, embed_dim=8)
  assert jax.eval_shape(cls.apply, {"params": params}, batch).shape == (2, 10)
  capped = jax.tree.map(lambda x: x, params)
  capped["logit_scale"] = jnp.float32(10.0)
  assert float(apply({"params": capped}, batch)["logit_scale"]) == pytest.approx(np.log(100.0))
