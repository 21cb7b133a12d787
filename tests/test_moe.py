"""MoMa / MoE layer against the invariants that define it (tiny shapes, CPU)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moma import dispatch
from moma.layers import moe
from moma.layers import routing
from moma.models.model_config import MoeConfig

MODS = ("text", "image")
D, F = 8, 16
STEPS = 30  # optimisation steps of the two tests that train (compiled once, cheap per step)
LB_LR = 1e-1


def _moe(layout="4t4i", aux_routing=False, **kw):
  """An MoE layer over the test's modalities; `routing_rows` 0: it routes over the whole (meshless) batch."""
  return moe.MoE(MoeConfig(**{"layout": layout, "routing_rows": 0, **kw}), d_ff=F, modalities=MODS,
                 aux_routing=aux_routing)


def _batch(b=2, length=16, seed=0, num_modalities=2):
  # One shape for (almost) every test: eagerly applied layers then share their compiled ops.
  x = jax.random.normal(jax.random.key(seed), (b, length, D))
  modality = jax.random.randint(jax.random.key(seed + 1), (b, length), 0, num_modalities)
  return x, modality, dispatch.partition(modality, num_modalities)


def _run(layer, x, plan, variables=None, **kw):
  variables = variables or layer.init(jax.random.key(7), x, plan)
  y, state = layer.apply(variables, x, plan, mutable=["losses", "metrics", "intermediates"], **kw)
  return variables, y, state


def _params(variables):
  return nn.meta.unbox(variables)["params"]


def _expert_ffn(p, x_MD):
  """[M, E, d]: every expert applied to every token (the per-token reference)."""
  wi, wo = p["wi"]["kernel"], p["wo"]["kernel"]  # [E, d, 2, F], [E, F, d]
  h = nn.silu(jnp.einsum("md,edf->mef", x_MD, wi[..., 0, :])) * jnp.einsum("md,edf->mef", x_MD, wi[..., 1, :])
  return jnp.einsum("mef,efd->med", h, wo)


@pytest.mark.parametrize("layout,mods,sizes", [("4t4i", MODS, (4, 4)), ("6t2i", MODS, (6, 2)),
                                               ("3t3i2a", ("text", "image", "audio"), (3, 3, 2)),
                                               ("2i7t", MODS, (7, 2)), ("8shared", MODS, (8,))])
def test_parse_layout(layout, mods, sizes):
  lay = routing.parse_layout(layout, mods)
  assert lay.sizes == sizes and lay.num_experts == sum(sizes)
  np.testing.assert_array_equal(lay.expert_group, np.repeat(np.arange(len(sizes)), sizes))


@pytest.mark.parametrize("layout,match", [("4t4i", "no expert group for modalities \\['audio'\\]"),
                                          ("4t4x", "names no modality"), ("4t4t", "appears twice"),
                                          ("four", "not like"), ("0t1i1a", "at least one expert")])
def test_layout_errors(layout, match):
  with pytest.raises(ValueError, match=match):
    routing.parse_layout(layout, ("text", "image", "audio"))


def test_plan_without_modalities_is_an_error():
  x, modality, _ = _batch()
  with pytest.raises(ValueError, match="dispatch.partition"):
    _moe().init(jax.random.key(0), x, dispatch.partition(modality, 1))


# 6t2i is slow: [kw0] checks the same group mask on 4t4i
@pytest.mark.parametrize("kw", [dict(), pytest.param(dict(layout="6t2i"), marks=pytest.mark.slow), dict(routing="topk"),
                                dict(routing="topk", dropless=True, gate="sigmoid"),
                                dict(aux_router=True, aux_routing=True)])
def test_no_token_reaches_another_modalitys_expert(kw):
  x, modality, plan = _batch()
  layer = _moe(**kw)
  variables, y, state = _run(layer, x, plan)
  chosen = state["intermediates"]["chosen"][0]
  expert_group = routing.parse_layout(layer.config.layout, MODS).expert_group
  assert not np.any(np.asarray(chosen) & (modality.reshape(-1, 1) != expert_group[None]))
  # Perturbing the image experts must leave every text token's output bit-identical.
  p = _params(variables)
  image = lambda w: jnp.asarray(expert_group == 1).reshape(-1, *(1,) * (w.ndim - 1))
  p = {**p, **{k: {"kernel": jnp.where(image(p[k]["kernel"]), p[k]["kernel"] + 1.0, p[k]["kernel"])}
               for k in ("wi", "wo")}}
  _, y2, _ = _run(layer, x, plan, {"params": p})
  text = modality == 0
  np.testing.assert_array_equal(np.asarray(y)[text], np.asarray(y2)[text])
  assert not np.allclose(np.asarray(y)[~text], np.asarray(y2)[~text])


@pytest.mark.parametrize("layout,c", [("4t4i", 1.0), ("6t2i", 1.0), ("4t4i", 2.0), ("8shared", 0.5)])
def test_expert_choice_takes_exactly_its_capacity_and_matches_reference(layout, c):
  x, modality, plan = _batch()
  counts = np.bincount(np.ravel(modality), minlength=2)
  lay = routing.parse_layout(layout, MODS)
  fractions = None if lay.shared else tuple(counts / counts.sum())  # bounds that fit this batch
  layer = _moe(layout, capacity_factor=c, token_fractions=fractions)
  variables, y, state = _run(layer, x, plan)
  chosen = np.asarray(state["intermediates"]["chosen"][0])
  b = counts if not lay.shared else [counts.sum()]
  expected = np.repeat([np.ceil(c * b[g] / n) for g, n in enumerate(lay.sizes)], lay.sizes)
  np.testing.assert_array_equal(chosen.sum(0), expected)
  p = _params(variables)
  x_MD = x.reshape(-1, D)
  score = jax.nn.sigmoid(x_MD @ p["router"])
  ref = jnp.einsum("me,med->md", chosen * score, _expert_ffn(p, x_MD))
  np.testing.assert_allclose(y.reshape(-1, D), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(routing="topk", top_k=1)])
def test_each_group_of_routing_rows_routes_alone(kw):
  """routing_rows=r: the output of a batch is that of its groups of r rows, each routed alone (1, the
  default, routes every row on its own), so no device count can change what a token gets."""
  x, modality, plan = _batch(b=4)
  ys = {}
  for rows in (1, 2, 0):
    layer = _moe(routing_rows=rows, **kw)
    variables, ys[rows], _ = _run(layer, x, plan)
    if rows:
      alone = [_run(layer, x[i:i + rows], dispatch.partition(modality[i:i + rows], 2), variables)[1]
               for i in range(0, 4, rows)]
      np.testing.assert_allclose(ys[rows], jnp.concatenate(alone), rtol=1e-6, atol=1e-6)
  if not kw:  # expert choice ranks the tokens of its group of rows against each other
    assert not np.allclose(ys[1], ys[0]) and not np.allclose(ys[2], ys[0])


def test_expert_choice_picks_the_top_scores():
  x, modality, plan = _batch()
  variables, _, state = _run(_moe(token_fractions=(1.0, 1.0)), x, plan)
  chosen = np.asarray(state["intermediates"]["chosen"][0])
  score = np.asarray(jax.nn.sigmoid(x.reshape(-1, D) @ _params(variables)["router"]))
  for e in range(8):
    mine = np.ravel(modality) == e // 4
    assert score[chosen[:, e], e].min() >= score[mine & ~chosen[:, e], e].max()


def test_1t1i_full_capacity_equals_untied_swiglu():
  """Capacity covering every token: y = sigmoid(router score) · untied FFN of the token's modality."""
  x, modality, plan = _batch()
  layer = _moe("1t1i", token_fractions=(1.0, 1.0))
  variables, y, _ = _run(layer, x, plan)
  p = _params(variables)
  # Expert e of 1t1i is modality e's FFN: the per-token reference at each token's own modality.
  per_expert = _expert_ffn(p, x.reshape(-1, D))  # [M, 2, D]
  ffn = jnp.take_along_axis(per_expert, modality.reshape(-1, 1, 1), axis=1).reshape(x.shape)
  gate = jnp.take_along_axis(jax.nn.sigmoid(x @ p["router"]), modality[..., None], axis=-1)
  np.testing.assert_allclose(y, gate * ffn, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate,dropless", [("softmax", True), ("sigmoid", True), ("softmax", False)])
def test_token_choice_matches_reference(gate, dropless):
  x, modality, plan = _batch()
  layer = _moe(routing="topk", top_k=2, gate=gate, dropless=dropless)
  variables, y, state = _run(layer, x, plan)
  chosen = np.asarray(state["intermediates"]["chosen"][0])
  assert chosen.sum(1).max() <= 2
  if dropless:
    np.testing.assert_array_equal(chosen.sum(1), 2)
  else:  # capacity ceil(c·k·f·M/|E_g|) = ceil(2·0.5·32/4) = 8 rows per expert
    assert chosen.sum(0).max() <= 8
  p = _params(variables)
  x_MD = x.reshape(-1, D)
  logits = x_MD @ p["router"]
  allowed = np.ravel(modality)[:, None] == np.repeat([0, 1], 4)[None]
  probs = (jax.nn.softmax(jnp.where(allowed, logits, -1e9)) if gate == "softmax"
           else jax.nn.sigmoid(logits))
  ref = jnp.einsum("me,med->md", chosen * probs, _expert_ffn(p, x_MD))
  np.testing.assert_allclose(y.reshape(-1, D), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(routing="topk"), dict(routing="topk", gate="sigmoid")])
def test_gradients_reach_the_router(kw):
  x, _, plan = _batch()
  layer = _moe(**kw)
  variables = layer.init(jax.random.key(0), x, plan)

  def loss(params):
    y, state = layer.apply({"params": params}, x, plan, mutable=["losses", "metrics"])
    return jnp.sum(y ** 2) + sum(jnp.sum(v) for v in jax.tree.leaves(state.get("losses", {})))

  grads = nn.meta.unbox(jax.grad(loss)(variables["params"]))
  assert float(jnp.abs(grads["router"]).sum()) > 0
  assert all(float(jnp.abs(grads[k]["kernel"]).sum()) > 0 for k in ("wi", "wo"))


def test_aux_routing_ignores_future_tokens_and_main_grads():
  x, modality, plan = _batch(length=16)
  layer = _moe(aux_router=True, aux_routing=True)
  variables, y, state = _run(layer, x, plan)
  assert 0 < np.asarray(state["intermediates"]["chosen"][0]).mean() < 1  # aux router is actually deciding
  t = 9
  x2 = x.at[:, t:].set(jax.random.normal(jax.random.key(5), x[:, t:].shape))
  m2 = modality.at[:, t:].set(1 - modality[:, t:])
  _, y2, _ = _run(layer, x2, dispatch.partition(m2, 2), variables)
  np.testing.assert_allclose(y[:, :t], y2[:, :t], rtol=1e-6, atol=1e-6)
  # Training mode: the aux BCE only trains the aux router (stop-gradient inputs and targets).
  train = _moe(aux_router=True)

  def aux_loss(params):
    _, st = train.apply({"params": params}, x, plan, mutable=["losses", "metrics"])
    return st["losses"]["aux_router_bce"][0]

  grads = nn.meta.unbox(jax.grad(aux_loss)(variables["params"]))
  assert float(jnp.abs(grads["router"]).sum()) == 0 and float(jnp.abs(grads["wo"]["kernel"]).sum()) == 0
  assert float(jnp.abs(grads["aux_router"]["w1"]["kernel"]).sum()) > 0


def test_aux_router_learns_the_main_routers_choices():
  x, _, plan = _batch()
  layer = _moe(aux_router=True)
  params = layer.init(jax.random.key(0), x, plan)["params"]
  opt = optax.adam(1e-1)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    def loss(p):
      _, st = layer.apply({"params": p}, x, plan, mutable=["losses", "metrics"])
      return st["losses"]["aux_router_bce"][0], st["metrics"]["aux_router_acc"][0]
    (_, acc), g = jax.value_and_grad(loss, has_aux=True)(params)
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state, acc

  params, state, acc0 = step(params, state)
  for _ in range(STEPS):
    params, state, acc = step(params, state)
  assert float(acc) > max(0.9, float(acc0) + 0.1), (acc0, acc)


def test_top_k_load_balancing_spreads_a_skewed_batch():
  x = jax.random.normal(jax.random.key(0), (2, 32, D))
  x = x.at[..., 0].add(3.0)  # a shared direction every token carries
  plan = dispatch.partition(jnp.zeros((2, 32), jnp.int32), 2)
  layer = _moe("8shared", routing="topk", top_k=1, dropless=True, load_balance_weight=1.0)
  params = nn.meta.unbox(layer.init(jax.random.key(1), x, plan)["params"])
  params["router"] = params["router"].at[0, 0].set(5.0)  # everyone prefers expert 0

  def balance(router):
    _, st = layer.apply({"params": {**params, "router": router}}, x, plan, mutable=["losses", "metrics"])
    return st["losses"]["load_balance"][0], st["metrics"]["expert_load_max/shared"][0]

  opt = optax.adam(LB_LR)
  router, opt_state = params["router"], opt.init(params["router"])
  grad_fn = jax.jit(jax.value_and_grad(balance, has_aux=True))
  (_, load0), _ = grad_fn(router)
  for _ in range(STEPS):
    (_, load), g = grad_fn(router)  # load: before this update
    updates, opt_state = opt.update(g, opt_state)
    router = optax.apply_updates(router, updates)
  assert float(load0) > 6 and float(load) < 2, (load0, load)


def test_router_noise_only_in_training():
  x, _, plan = _batch()
  layer = _moe(router_noise=1.0)
  variables, y, _ = _run(layer, x, plan)
  _, y_eval, _ = _run(layer, x, plan, variables, deterministic=True)
  np.testing.assert_array_equal(y, y_eval)
  _, y_train, _ = _run(layer, x, plan, variables, deterministic=False, rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(y, y_train)


def test_padding_tokens_get_no_expert():
  x, modality, plan = _batch()
  segment = jnp.ones(modality.shape, jnp.int32).at[:, -4:].set(0)
  _, y, state = _run(_moe(), x, plan, segment=segment)
  assert not np.asarray(state["intermediates"]["chosen"][0]).reshape(2, 16, 8)[:, -4:].any()
  np.testing.assert_array_equal(y[:, -4:], 0)


@functools.lru_cache
def _compiled_flops(layout):
  x = jax.random.normal(jax.random.key(1), (4, 64, 64))
  plan = dispatch.partition((jnp.arange(64) // 8 % 2)[None].repeat(4, 0), 2)
  if layout == "dense":
    from experiments.bench_moe import DenseSwiGLU  # pylint: disable=g-import-not-at-top
    layer = DenseSwiGLU(256)
  else:
    layer = moe.MoE(MoeConfig(layout=layout), d_ff=256, modalities=MODS)
  variables = layer.init(jax.random.key(0), x, plan)
  fn = jax.jit(lambda v, x: layer.apply(v, x, plan, mutable=["losses", "metrics"])[0])
  cost = fn.lower(variables, x).compile().cost_analysis()
  return (cost if isinstance(cost, dict) else cost[0])["flops"]


def test_4t4i_at_capacity_one_costs_a_dense_ffn():
  analytic = moe.flops_per_token(MoeConfig(layout="4t4i"), 64, 256, MODS)
  assert analytic["expert_flops"] == 2 * 3 * 64 * 256  # exactly the dense SwiGLU's
  assert analytic["forward_flops"] - analytic["expert_flops"] == 2 * 64 * 8  # the router
  assert analytic["total_params"] == 8 * 3 * 64 * 256 + 64 * 8
  router = 2 * 64 * 8 * 4 * 64
  dense = _compiled_flops("dense")
  assert abs(_compiled_flops("4t4i") - router - dense) / dense < 0.01


def test_scan_over_layers_in_bfloat16():
  """The decoder's path: nn.scan over layers (plan broadcast), stacked losses / metrics, bf16 compute."""

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x, plan):
      layer = nn.scan(lambda mdl, c, p: (c + mdl(c, p), None),
                      variable_axes={"params": 0, "losses": 0, "metrics": 0}, split_rngs={"params": True},
                      in_axes=nn.broadcast, length=2, metadata_params={nn.PARTITION_NAME: "layers"})
      return layer(moe.MoE(MoeConfig(routing="topk"), d_ff=F, modalities=MODS, dtype=jnp.bfloat16), x, plan)[0]

  x, _, plan = _batch()
  # init_with_output: the forward pass and the stacked collections from one compiled function.
  y, state = jax.jit(lambda x, plan: Stack().init_with_output(jax.random.key(0), x, plan))(x, plan)
  (stacked,) = nn.meta.unbox(state)["params"].values()  # the one scanned MoE layer
  assert stacked["wi"]["kernel"].shape == (2, 8, D, 2, F)
  assert y.dtype == x.dtype and np.isfinite(np.asarray(y)).all()
  leaves = jax.tree.leaves(state["losses"])
  assert leaves and all(v.shape[0] == 2 for v in leaves)
