"""Mixture-of-Depths wrapper: selection, packing, causality, gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma import dispatch
from moma.layers import mod
from moma.layers import moe
from moma.models.model_config import ModConfig, MoeConfig

D = 8


class CausalMix(nn.Module):
  """Toy attention block: x + tanh(mean of earlier same-segment tokens @ W); segment 0 attends nowhere."""

  @nn.compact
  def __call__(self, x, plan, *, segment, position=None, deterministic=True):
    del plan, position, deterministic
    w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1], x.shape[-1]))
    n = x.shape[1]
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] != 0) & jnp.tri(n, dtype=bool)
    mix = jnp.einsum("bqk,bkd->bqd", same / jnp.maximum(same.sum(-1, keepdims=True), 1), x)
    return x + jnp.tanh(mix @ w)


def _mod(block, aux_routing=False, **kw):
  """MoD around `block`; `routing_rows` 0: "batch" selection over the whole (meshless) batch."""
  return mod.MixtureOfDepths(block, ModConfig(**{"routing_rows": 0, **kw}), aux_routing=aux_routing)


def _batch(b=2, length=16):
  x = jax.random.normal(jax.random.key(0), (b, length, D))
  segment = jnp.ones((b, length), jnp.int32).at[:, length // 2:].set(2)
  modality = jax.random.randint(jax.random.key(1), (b, length), 0, 2)
  return x, segment, dispatch.partition(modality, 2)


def _apply(layer, x, plan, variables=None, **kw):
  variables = variables or layer.init(jax.random.key(3), x, plan, **kw)
  y, st = layer.apply(variables, x, plan, mutable=["losses", "metrics"], **kw)
  return variables, y, st


@pytest.mark.parametrize("selection", ["batch", "sequence"])
def test_selected_tokens_see_only_selected_tokens_of_their_own_row(selection):
  x, segment, plan = _batch()
  layer = _mod(CausalMix(), capacity=0.25, selection=selection)
  variables, y, st = _apply(layer, x, plan, segment=segment)
  np.testing.assert_allclose(st["metrics"]["mod_skip_frac"][0], 0.75)
  p = nn.meta.unbox(variables)["params"]
  r = jax.nn.sigmoid(x @ p["router"])
  changed = np.any(np.asarray(y != x), axis=-1)
  if selection == "sequence":
    assert (changed.sum(1) == 4).all()
  for row in range(2):  # reference: run the block on this row's selected tokens alone
    sel = np.nonzero(changed[row])[0]
    ref = CausalMix().apply({"params": p["block"]}, x[row:row + 1, sel], None, segment=segment[row:row + 1, sel])
    expect = x[row, sel] + r[row, sel, None] * (ref[0] - x[row, sel])
    np.testing.assert_allclose(y[row, sel], expect, rtol=1e-5, atol=1e-6)
  top = np.sort(np.argsort(-np.ravel(r))[:8]) if selection == "batch" else None
  if top is not None:
    np.testing.assert_array_equal(np.nonzero(np.ravel(changed))[0], top)


def test_full_capacity_is_the_router_weighted_block():
  x, segment, plan = _batch()
  layer = _mod(CausalMix(), capacity=1.0, selection="sequence")
  variables, y, _ = _apply(layer, x, plan, segment=segment)
  p = nn.meta.unbox(variables)["params"]
  r = jax.nn.sigmoid(x @ p["router"])[..., None]
  full = CausalMix().apply({"params": p["block"]}, x, None, segment=segment)
  np.testing.assert_allclose(y, x + r * (full - x), rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_mod_router():
  x, segment, plan = _batch()
  layer = _mod(CausalMix())
  variables = layer.init(jax.random.key(3), x, plan, segment=segment)
  g = jax.grad(lambda v: jnp.sum(layer.apply(v, x, plan, segment=segment, mutable=["metrics"])[0] ** 2))(
      variables)
  assert float(jnp.abs(nn.meta.unbox(g)["params"]["router"]).sum()) > 0


def test_aux_routing_ignores_future_tokens():
  x, segment, plan = _batch()
  layer = _mod(CausalMix(), aux_router=True, aux_routing=True)
  variables, y, st = _apply(layer, x, plan, segment=segment)
  assert 0 < float(st["metrics"]["mod_skip_frac"][0]) < 1
  t = 11
  x2 = x.at[:, t:].set(jax.random.normal(jax.random.key(9), x[:, t:].shape))
  _, y2, _ = _apply(layer, x2, plan, variables, segment=segment)
  np.testing.assert_allclose(y[:, :t], y2[:, :t], rtol=1e-6, atol=1e-6)
  train = _mod(CausalMix(), aux_router=True)
  _, _, st = _apply(train, x, plan, variables, segment=segment)
  assert float(st["losses"]["mod_aux_router_bce"][0]) > 0 and "mod_aux_router_acc" in st["metrics"]


def test_mod_around_moma_experts():
  """MoD before the modality split: the wrapped MoE layer gets a plan over the selected tokens only."""
  x, segment, plan = _batch()
  layer = _mod(moe.MoE(MoeConfig(layout="2t2i"), d_ff=16, modalities=("text", "image")), capacity=0.5)
  _, y, st = _apply(layer, x, plan, segment=segment)
  assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()
  np.testing.assert_allclose(st["metrics"]["mod_skip_frac"][0], 0.5)
  assert "no_expert/text" in st["metrics"]["block"]


def test_aux_routing_needs_the_segment():
  x, _, plan = _batch()
  with pytest.raises(ValueError, match="segment="):
    _mod(CausalMix(), aux_router=True, aux_routing=True).init(jax.random.key(0), x, plan)


@pytest.mark.parametrize("rows", [1, 2])
def test_each_group_of_routing_rows_selects_alone(rows):
  """"batch" selection with routing_rows=r: a batch's output is that of its groups of r rows, each alone."""
  x, segment, plan = _batch(b=4)
  layer = _mod(CausalMix(), routing_rows=rows)
  variables, y, _ = _apply(layer, x, plan, segment=segment)
  modality = plan.group_of_token.reshape(4, -1)
  alone = [_apply(layer, x[i:i + rows], dispatch.partition(modality[i:i + rows], 2), variables,
                  segment=segment[i:i + rows])[1] for i in range(0, 4, rows)]
  np.testing.assert_allclose(y, jnp.concatenate(alone), rtol=1e-6, atol=1e-6)
  whole = _apply(_mod(CausalMix()), x, plan, variables, segment=segment)[1]
  assert not np.allclose(y, whole)


def test_packed_batch_attention_is_banded_and_exact():
  """A decoder MoD block over 8 rows of 64 tokens at capacity 0.75 packs 384 tokens into one row; with
  `block_attends` its attention is blockwise with span 64 (no [384, 384] array) and equals the xla twin."""
  from moma.models import blocks
  from moma.models.model_config import ModelConfig
  config = lambda impl: ModelConfig(modalities=("text", "image"), vocab_size=8, d_model=16, num_heads=2, d_ff=16,
                                    num_layers=1, max_seq_len=64, attention_impl=impl)
  b, length = 8, 64
  x = jax.random.normal(jax.random.key(0), (b, length, 16))
  segment = jnp.asarray(np.repeat(np.arange(1, 5), 16)[None].repeat(b, 0), jnp.int32)  # 4 docs per row
  position = jnp.broadcast_to(jnp.arange(length) % 16, (b, length))
  modality = jax.random.randint(jax.random.key(1), (b, length), 0, 2)
  plan = dispatch.partition(modality, 2)
  ctx = dict(modality=modality, segment=segment, position=position)
  make = lambda impl, attends: mod.MixtureOfDepths(blocks.Block(config(impl)), ModConfig(capacity=0.75, routing_rows=0),
                                                   block_attends=attends)
  variables = make("xla", False).init(jax.random.key(2), x, plan, **ctx)
  full = make("xla", False).apply(variables, x, plan, **ctx)
  banded = jax.jit(lambda v: make("blockwise", True).apply(v, x, plan, **ctx))
  np.testing.assert_allclose(banded(variables), full, rtol=1e-5, atol=1e-5)
  assert "384x384" not in banded.lower(variables).as_text().replace(",", "x")
