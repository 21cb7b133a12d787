"""Cached decoding of the transformer decoders (dense, MoT, MoMa, MoD): a decode step equals the full
forward, generation is the full forward's argmax, padding and earlier documents stay invisible, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma.models import generate
from tests.test_decoder import make_batch
from tests.test_mamba_decoder import Compiled, decode_in_steps

L = 12  # make_batch: documents at [0, 6) and [6, 12) of each row
TRANSFORMER = dict(block="transformer", d_ff=32, mamba=None)
MOT = dict(TRANSFORMER, untie=("qkv", "o", "ffn", "norm", "qk_norm"), qk_norm=True, num_kv_heads=2)
MOMA = dict(TRANSFORMER, ffn="moe", d_ff=16,
            moe=dict(layout="2t1i1a", routing="ec", aux_router=True, capacity_factor=1.0))
MOD = dict(MOT, num_layers=2, mod=dict(enabled=True, every=2, capacity=0.5, aux_router=True))
MODELS = {"dense": TRANSFORMER, "mot": MOT, "moma_ec": MOMA, "mot_mod": MOD}


@functools.cache
def compiled_model(name):
  """MODELS[name] compiled once for the module's tests; `full`: its jitted aux-routed full forward."""
  m = Compiled(**MODELS[name])
  m.full = jax.jit(generate._aux_routed(m.model).apply)
  return m


@pytest.fixture(scope="module", params=list(MODELS))
def compiled(request):
  return compiled_model(request.param)


@pytest.mark.parametrize("split,chunk", [(8, 1), (3, 1), (4, 2)])
def test_prefill_then_decode_steps_equal_full_forward(compiled, split, chunk):
  """Decoding continues the last prompt document (split 8: the second; split 3: the first, with chunked
  steps crossing nothing); MoE / MoD models decode with their per-token aux routers (aux_routing=True)."""
  m = compiled
  batch = make_batch(seed=1, l=L)
  if split < 6:  # keep the decoded tokens in the prompt's document
    batch = dict(batch, segment=jnp.ones_like(batch["segment"]),
                 position=jnp.broadcast_to(jnp.arange(L), batch["tokens"].shape))
  full = m.full(m.variables, batch)
  decoded, cache = decode_in_steps(m, batch, split, chunk)
  np.testing.assert_allclose(decoded, full, rtol=2e-5, atol=2e-5)
  lengths = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(cache) if path[-1].key == "length"]
  assert lengths and all((np.asarray(n) == L).all() for n in lengths)


def test_bfloat16_cache_decodes_like_the_full_forward():
  m = Compiled(**dict(MOT, dtype="bfloat16"))
  batch = make_batch(seed=4, l=L)
  decoded, cache = decode_in_steps(m, batch, 8)
  assert cache["layers"]["mixer"]["k_BSGK"].dtype == jnp.bfloat16
  np.testing.assert_allclose(decoded, m.apply(m.variables, batch), rtol=2e-2, atol=2e-2)


def test_decoded_tokens_never_see_earlier_documents_or_padding():
  """A prompt whose first document (or left padding) changes decodes to the same logits."""
  m = compiled_model("mot")
  batch = make_batch(seed=2, l=L)
  other_first_doc = dict(batch, tokens=batch["tokens"].at[:, :6].set(7),
                         modality=batch["modality"].at[:, :6].set(2))
  a, _ = decode_in_steps(m, batch, 8)
  b, _ = decode_in_steps(m, other_first_doc, 8)
  np.testing.assert_allclose(a[:, 6:], b[:, 6:], rtol=1e-5, atol=1e-5)
  as_padding = dict(other_first_doc, segment=batch["segment"].at[:, :6].set(0))
  c, _ = decode_in_steps(m, as_padding, 8)
  np.testing.assert_allclose(a[:, 6:], c[:, 6:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mot", "moma_ec"])
def test_greedy_generate_is_argmax_of_the_full_forward(name):
  m, prompt_len, new = compiled_model(name), 8, 4
  prompt = {k: v[:, :prompt_len] for k, v in make_batch(seed=5, l=L).items()}
  table = jnp.arange(48, dtype=jnp.int32) % 3  # token id → modality
  tokens, modality = generate.generate(m.model, m.variables, prompt, new, modality_table=table)
  np.testing.assert_array_equal(modality, table[tokens])
  extend = lambda key, new_values: jnp.concatenate([prompt[key], new_values], 1)
  whole = dict(tokens=extend("tokens", tokens), modality=extend("modality", modality),
               segment=extend("segment", jnp.full((2, new), 2, jnp.int32)),
               position=extend("position", prompt["position"][:, -1:] + 1 + jnp.arange(new)))
  full = m.full(m.variables, whole)
  np.testing.assert_array_equal(tokens, jnp.argmax(full[:, prompt_len - 1:-1], -1))


def test_prompt_longer_than_the_cache_is_refused():
  m = compiled_model("dense")
  with pytest.raises(ValueError, match="prompt length 20 exceeds max_len 16"):
    generate.prefill(m.model, m.variables, make_batch(seed=3, l=20))
  with pytest.raises(ValueError, match="exceeds max_len 16"):
    generate.generate(m.model, m.variables, make_batch(seed=3, l=L), 5)


@pytest.mark.parametrize("name,field", [("moma_ec", "moe"), ("mot_mod", "mod")])
def test_batch_routing_without_aux_routers_is_refused(name, field):
  config = dict(MODELS[name], **{field: dict(MODELS[name][field], aux_router=False)})
  m = Compiled(**config)
  with pytest.raises(ValueError, match=f"config.model.{field}.aux_router=True, trained by the aux_routers"):
    generate.prefill(m.model, m.variables, make_batch(seed=3, l=L))
