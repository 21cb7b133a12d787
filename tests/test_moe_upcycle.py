"""Sparse upcycling: experts start as exact copies of their modality's FFN."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma import dispatch
from moma import upcycle
from moma.layers import moe
from moma.models.model_config import MoeConfig

MODS = ("text", "image")
D, F = 8, 16


def test_upcycled_4t4i_layer_equals_1t1i_when_every_copy_is_selected():
  """Every expert takes every token of its modality: y_up = (Σ_e s_e)·FFN_m and y_1t1i = s·FFN_m."""
  x = jax.random.normal(jax.random.key(0), (2, 16, D))
  modality = jax.random.randint(jax.random.key(1), (2, 16), 0, 2)
  plan = dispatch.partition(modality, 2)
  src_layer = moe.MoE(MoeConfig(layout="1t1i", token_fractions=(1.0, 1.0)), d_ff=F, modalities=MODS)
  dst_layer = moe.MoE(MoeConfig(layout="4t4i", capacity_factor=4.0, token_fractions=(1.0, 1.0)), d_ff=F,
                      modalities=MODS)
  src = src_layer.init(jax.random.key(2), x, plan)["params"]
  dst = dst_layer.init(jax.random.key(3), x, plan)["params"]
  up = upcycle.upcycle(src, dst, layout="4t4i", modalities=MODS)
  assert isinstance(up["wi"]["kernel"], nn.Partitioned)  # boxes (logical axes) survive
  np.testing.assert_array_equal(nn.meta.unbox(up["router"]), nn.meta.unbox(dst["router"]))  # fresh
  y_src = src_layer.apply({"params": src}, x, plan, mutable=["metrics", "intermediates"])[0]
  y_up = dst_layer.apply({"params": up}, x, plan, mutable=["metrics", "intermediates"])[0]
  s_src = jax.nn.sigmoid(x @ nn.meta.unbox(src["router"]))  # [B, L, 2]
  s_up = jax.nn.sigmoid(x @ nn.meta.unbox(up["router"])).reshape(2, 16, 2, 4).sum(-1)
  pick = lambda s: jnp.take_along_axis(s, modality[..., None], axis=-1)
  np.testing.assert_allclose(y_up / pick(s_up), y_src / pick(s_src), rtol=1e-5, atol=1e-6)


def _ffn(lead, d=D):
  """An FFN's kernels with leading dims `lead` (layers, groups): fused gate/up [..., d, 2, F], down."""
  return {"wi": {"kernel": jax.random.normal(jax.random.key(0), (*lead, d, 2, F))},
          "wo": {"kernel": jnp.full((*lead, F, d), 3.0)}}


def _dst(lead=(), d=D):
  return {"ffn": {"router": jnp.zeros((*lead, d, 8)), **jax.tree.map(jnp.zeros_like, _ffn((*lead, 8), d))}}


def test_upcycle_tree_from_stacked_mot_ffn():
  """A MoT-style tree (nn.scan stack of 3 layers, per-modality FFN) → 6t2i experts."""
  layers, groups = 3, 2
  src = {"embed": jnp.ones((5, D)), "layers": {"ffn": _ffn((layers, groups)), "norm": jnp.full((layers, D), 2.0)}}
  dst = {"embed": jnp.zeros((5, D)), "layers": {**_dst((layers,)), "norm": jnp.zeros((layers, D))}}
  up = upcycle.upcycle(src, dst, layout="6t2i", modalities=MODS)
  for name in ("wi", "wo"):
    w, s = up["layers"]["ffn"][name]["kernel"], src["layers"]["ffn"][name]["kernel"]
    for e in range(8):
      np.testing.assert_array_equal(w[:, e], s[:, 0 if e < 6 else 1])
  np.testing.assert_array_equal(up["embed"], 1.0)
  np.testing.assert_array_equal(up["layers"]["norm"], 2.0)
  np.testing.assert_array_equal(up["layers"]["ffn"]["router"], 0.0)


def test_upcycle_from_dense_ffn_to_shared_experts():
  src = {"ffn": _ffn(())}
  up = upcycle.upcycle(src, _dst(), layout="8shared", modalities=MODS)
  np.testing.assert_array_equal(up["ffn"]["wo"]["kernel"], 3.0)
  for e in range(8):
    np.testing.assert_array_equal(up["ffn"]["wi"]["kernel"][e], src["ffn"]["wi"]["kernel"])


@pytest.mark.parametrize("src,match", [
    ({"ffn": _ffn((2,), d=4)}, "different d_model or d_ff"),
    ({"ffn": {"attn": jnp.ones((D, D))}}, "no FFN weight 'wi/kernel'"),
    ({"ffn": _ffn((3,))}, "3 groups"),
])
def test_upcycle_errors(src, match):
  with pytest.raises(ValueError, match=match):
    upcycle.upcycle(src, _dst(), layout="4t4i", modalities=MODS)
