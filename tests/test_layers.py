"""Layers against per-token reference twins: untied norms, attention, SwiGLU; RoPE's relative property."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma import dispatch
from moma.layers.attention import Attention, attention_mask
from moma.layers.ffn import SwiGLU
from moma.layers.norms import Norm
from moma.layers.rope import apply_rope
from tests.test_decoder import random_variables

B, L, D, G = 2, 10, 16, 3


@pytest.fixture
def inputs():
  x = jax.random.normal(jax.random.key(0), (B, L, D))
  modality = jax.random.randint(jax.random.key(1), (B, L), 0, G)
  return x, modality, dispatch.partition(modality, G)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_untied_norm_uses_each_tokens_modality_scale(inputs, kind):
  x, modality, _ = inputs
  norm = Norm(kind, num_groups=G)
  params = random_variables(norm, x, modality)["params"]
  y = norm.apply({"params": params}, x, modality)
  xc = x - x.mean(-1, keepdims=True) if kind == "layer" else x
  ref = xc / jnp.sqrt(jnp.mean(xc**2, -1, keepdims=True) + 1e-6) * params["scale"][modality]
  if kind == "layer":
    ref = ref + params["bias"][modality]
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
  q = jax.random.normal(jax.random.key(4), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(5), (1, 1, 1, 8))
  score = lambda pq, pk: jnp.sum(apply_rope(q, jnp.array([[pq]]), 1e4) * apply_rope(k, jnp.array([[pk]]),
                                                                                      1e4))
  np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4)
  np.testing.assert_allclose(apply_rope(q, jnp.zeros((1, 1), jnp.int32), 1e4), q)


def reference_attention(params, x, modality, segment, position, heads, kv_heads, qk_norm):
  """Per-token weights W[modality] and a plain masked softmax with K/V heads repeated for GQA."""
  p = params
  q = jnp.einsum("bld,bldhk->blhk", x, p["q"]["kernel"][modality])
  kv = jnp.einsum("bld,bldchk->blchk", x, p["kv"]["kernel"][modality])
  k, v = kv[:, :, 0], kv[:, :, 1]
  if qk_norm == "rms":
    rms = lambda t, s: t / jnp.sqrt(jnp.mean(t**2, -1, keepdims=True) + 1e-6) * s[modality][:, :, None]
    q, k = rms(q, p["q_norm"]["scale"]), rms(k, p["k_norm"]["scale"])
  elif qk_norm == "layer":  # Chameleon: LayerNorm with bias over each head's channels, eps 1e-5
    ln = lambda t, n: ((t - t.mean(-1, keepdims=True)) / jnp.sqrt(t.var(-1, keepdims=True) + 1e-5)
                       * n["scale"][modality][:, :, None] + n["bias"][modality][:, :, None])
    q, k = ln(q, p["q_norm"]), ln(k, p["k_norm"])
  q, k = apply_rope(q, position, 1e4), apply_rope(k, position, 1e4)
  k, v = jnp.repeat(k, heads // kv_heads, axis=2), jnp.repeat(v, heads // kv_heads, axis=2)
  logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(attention_mask(segment), logits, -1e30)
  out = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(logits, -1), v).reshape(B, L, -1)
  return jnp.einsum("blf,blfd->bld", out, p["o"]["kernel"][modality])


@pytest.mark.parametrize("kv_heads,qk_norm", [(4, False), (2, "rms"), (2, "layer")])
def test_untied_attention_matches_per_token_reference(inputs, kv_heads, qk_norm):
  x, modality, plan = inputs
  segment = jnp.array([[1] * 6 + [2] * 4, [1] * 10])
  position = jnp.array([list(range(6)) + list(range(4)), list(range(10))])
  attn = Attention(4, kv_heads, 4, num_modalities=G, untie=("qkv", "o", "qk_norm"), qk_norm=bool(qk_norm),
                   qk_norm_kind=qk_norm or "rms", norm_eps=1e-5 if qk_norm == "layer" else 1e-6)
  kw = dict(modality=modality, segment=segment, position=position)
  params = random_variables(attn, x, plan, **kw)["params"]
  y = jax.jit(attn.apply)({"params": params}, x, plan, **kw)
  ref = reference_attention(params, x, modality, segment, position, 4, kv_heads, qk_norm)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_untied_swiglu_matches_per_token_reference(inputs):
  x, modality, plan = inputs
  ffn = SwiGLU(24, num_modalities=G, untie=("ffn",))
  params = random_variables(ffn, x, plan)["params"]
  y = jax.jit(ffn.apply)({"params": params}, x, plan)
  gate_up = jnp.einsum("bld,bldcf->blcf", x, params["wi"]["kernel"][modality])
  ref = jnp.einsum("blf,blfd->bld", nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :],
                   params["wo"]["kernel"][modality])
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_tied_layer_ignores_plan_and_keeps_dense_weights(inputs):
  x, _, plan = inputs
  ffn = SwiGLU(24, num_modalities=G, untie=())
  kernel = nn.meta.unbox(jax.eval_shape(ffn.init, jax.random.key(0), x, plan))["params"]["wi"]["kernel"]
  assert kernel.shape == (D, 2, 24)
  assert plan.use_if(False).is_identity and plan.use_if(True) is plan
