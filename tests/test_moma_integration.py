"""MoMa / MoE / MoD inside the decoder and the trainer: FLOPs, gradients, causality, upcycling, stages."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dense as dense_configs
from configs import moma as moma_configs
from experiments import eval_sources
from moma import checkpoint
from moma import flops
from moma import metrics as metrics_lib
from moma import studies
from moma import steps
from moma import train
from moma.models import decoder
from moma.models import model_config

MODS = ("text", "image")
BASE = dict(modalities=MODS, vocab_size=40, d_model=16, num_layers=2, num_heads=2, d_ff=32)


def make_batch(b=2, length=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 40, (b, length))
  segment = np.ones((b, length), np.int32)
  segment[:, length // 2:] = 2
  position = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)])[None].repeat(b, 0)
  return dict(tokens=jnp.asarray(tokens, jnp.int32),
              modality=jnp.asarray((np.arange(length) // 4 % 2)[None].repeat(b, 0), jnp.int32),
              segment=jnp.asarray(segment), position=jnp.asarray(position, jnp.int32),
              targets=jnp.asarray(np.roll(tokens, -1, 1), jnp.int32), loss_mask=jnp.ones((b, length)))


def init(model, batch):
  return jax.jit(model.init)(jax.random.key(0), batch)


def apply(model, variables, batch, **kw):
  return model.apply(variables, batch, mutable=["losses", "metrics"], **kw)[0]


@functools.lru_cache
def _train_step_flops(ffn):
  cfg = dict(BASE, d_model=32, d_ff=128, num_layers=1, vocab_size=64, ffn=ffn)
  model = decoder.as_model(cfg)
  batch = make_batch(4, 64)
  params = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]  # shapes are all the compile needs

  def loss(p):
    return decoder.loss_fn(apply(model, {"params": p}, batch), batch, MODS)[0]

  cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
  return (cost if isinstance(cost, dict) else cost[0])["flops"], cfg


def test_4t4i_at_capacity_one_costs_the_dense_model():
  dense_flops, dense_cfg = _train_step_flops("dense")
  moe_flops, moe_cfg = _train_step_flops("moe")
  router = 2 * 32 * 8  # forward FLOPs per token of the [d, E] router logits
  analytic_dense = flops.per_token(dense_cfg, 64)
  analytic_moe = flops.per_token(moe_cfg, 64)
  for key in ("total", *MODS):
    assert analytic_moe[key] - analytic_dense[key] == flops.TRAIN_MULTIPLIER * router
  tokens = 4 * 64
  # XLA counts elementwise work too; the matmul FLOPs dominate and differ only by the router.
  assert abs((moe_flops - dense_flops) / tokens - flops.TRAIN_MULTIPLIER * router) < 0.02 * dense_flops / tokens
  params = flops.ffn_params(moe_cfg)
  assert params["active"] == 3 * 32 * 128 + 32 * 8 and params["total"] == 8 * 3 * 32 * 128 + 32 * 8


# MoE (expert choice) and MoD together check both kinds of router in one compilation: the default twin of
# each alone (slow).
@pytest.mark.parametrize("kw", [pytest.param(dict(ffn="moe"), marks=pytest.mark.slow),
                                dict(ffn="moe", moe=dict(routing="topk")),
                                pytest.param(dict(mod=dict(enabled=True)), marks=pytest.mark.slow),
                                dict(ffn="moe", mod=dict(enabled=True))])
def test_gradients_reach_the_routers_through_the_decoder(kw):
  model = decoder.as_model(dict(BASE, **kw))
  batch = make_batch()
  loss = lambda p: decoder.loss_fn(apply(model, {"params": p}, batch), batch, MODS)[0]
  # Init and gradient in one compiled function (one compilation per config).
  grads = nn.meta.unbox(jax.jit(lambda b: jax.grad(loss)(model.init(jax.random.key(0), b)["params"]))(batch))
  routers = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_leaves_with_path(grads)
             if "'router'" in jax.tree_util.keystr(p)}
  assert routers and all(float(jnp.abs(g).sum()) > 0 for g in routers.values()), routers.keys()


def test_aux_router_generation_path_is_causal():
  model = decoder.as_model(dict(BASE, ffn="moe", moe=dict(aux_router=True),
                                mod=dict(enabled=True, aux_router=True, capacity=0.5)))
  batch = make_batch()
  variables = init(model, batch)
  causal_model = model.clone(config=dataclasses.replace(model.config, aux_routing=True))
  causal = jax.jit(functools.partial(apply, causal_model))  # one compilation, two batches
  logits = causal(variables, batch)
  t = 11
  future = dict(batch, tokens=batch["tokens"].at[:, t:].set(7), modality=batch["modality"].at[:, t:].set(1))
  logits_future = causal(variables, future)
  np.testing.assert_allclose(logits[:, :t], logits_future[:, :t], rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits[:, t:], logits_future[:, t:])
  # The batch-level routing of training does look ahead: the same check would not hold there.
  with pytest.raises(ValueError, match="moe.aux_router=True"):
    decoder.as_model(dict(BASE, ffn="moe", aux_routing=True))


def test_upcycled_model_first_forward_equals_the_1t1i_model():
  """Token choice over identical copies: 1t1i top-1 has gate 1; 4t4i top-4 with zero routers has four gates
  of 1/4 that sum to 1. So the upcycled model computes exactly the 1t1i model's function."""
  batch = make_batch()
  moe = lambda layout, k: dict(BASE, ffn="moe", moe=dict(layout=layout, routing="topk", top_k=k, dropless=True))
  src_model, dst_model = decoder.as_model(moe("1t1i", 1)), decoder.as_model(moe("4t4i", 4))
  src = init(src_model, batch)["params"]
  fresh = jax.eval_shape(dst_model.init, jax.random.key(0), batch)["params"]  # all but the router come from src
  from moma import upcycle  # pylint: disable=g-import-not-at-top
  up = nn.meta.unbox(upcycle.upcycle(src, fresh, layout="4t4i", modalities=MODS))
  router = up["layers"]["ffn"]["router"]
  up["layers"]["ffn"]["router"] = jnp.zeros(router.shape, router.dtype)
  forward = lambda model, params: jax.jit(functools.partial(apply, model))({"params": params}, batch)
  np.testing.assert_allclose(forward(dst_model, up), forward(src_model, src), rtol=1e-5, atol=1e-5)
  # A MoT source: its untied FFN has the experts' kernel layout, one group per modality.
  mot = decoder.as_model(dict(BASE, untie=("ffn",)))
  mot_params = init(mot, batch)["params"]
  up = nn.meta.unbox(upcycle.upcycle(mot_params, fresh, layout="4t4i", modalities=MODS))
  wi = nn.meta.unbox(mot_params)["layers"]["ffn"]["wi"]["kernel"]  # [layers, modality, d, 2, F]
  np.testing.assert_array_equal(up["layers"]["ffn"]["wi"]["kernel"][:, 5], wi[:, 1])


@pytest.mark.parametrize("kw,match", [
    (dict(ffn="moe", modalities=("text", "image", "audio")), "no expert group for modalities \\['audio'\\]"),
    (dict(ffn="moe", moe=dict(capacity_factor=0.0)), "config.model.moe.capacity_factor"),
    (dict(ffn="moe", moe=dict(routing="topk", top_k=5)), "config.model.moe.top_k=5"),
    (dict(ffn="moe", moe=dict(capacity=1.0)), "config.model.moe has unknown keys \\['capacity'\\]"),
    (dict(mod=dict(enabled=True, capacity=0.0)), "config.model.mod.capacity"),
    (dict(mod=dict(enabled=True, every=3)), "config.model.mod.every=3"),
])
def test_bad_moe_and_mod_configs_name_the_field(kw, match):
  with pytest.raises(ValueError, match=match):
    decoder.as_model({**BASE, **kw})


def _config(arg, data_cache_dir, **train):
  config = moma_configs.get_config(arg)
  config.data.cache_dir = data_cache_dir
  # One layer: depth does not matter to what these runs check, and each step costs half.
  config.model.num_layers, config.model.d_model, config.model.d_ff = 1, 32, 64
  config.train.update(dict(progress_bar=False, batch_size=2, steps=MAIN_STEPS, log_every=MAIN_STEPS // 3,
                           eval_every=0, warmup_steps=2, lr=3e-2), **train)  # seq_len 256: the data's longest document
  return config


MAIN_STEPS = 12


def _params(workdir):
  return checkpoint.restore_params(workdir, "test")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache_dir):
  """The module's training runs, shared by its tests: a 2-step 1t1i run, and the 4t4i main run upcycled
  from it (sparse upcycling is the paper's way to start MoMa; fresh routers, reset schedule)."""
  root = tmp_path_factory.mktemp("moma_runs")
  source = str(root / "1t1i")
  train.train_and_evaluate(_config("experts=1t1i", data_cache_dir, steps=2, log_every=1), source)
  config = _config("experts=4t4i", data_cache_dir)
  config.init.upcycle_from = source
  workdir = str(root / "4t4i")
  final = train.train_and_evaluate(config, workdir)
  return dict(source=source, workdir=workdir, final=final, root=root)


def test_moma_4t4i_upcycled_from_1t1i_trains_and_logs_routing_metrics(runs):
  rows = [r for r in metrics_lib.read(runs["workdir"]) if "loss" in r]
  assert rows[0]["step"] == MAIN_STEPS // 3  # the schedule starts over after upcycling
  assert rows[-1]["step"] == runs["final"]["step"] == MAIN_STEPS and np.isfinite(rows[-1]["loss"])
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.3, [r["loss"] for r in rows]
  for key in ("routing/no_expert/text", "routing/no_expert/image", "routing/expert_load_max/text",
              "routing/router_entropy", "routing/capacity_overflow"):
    assert key in runs["final"] and np.isfinite(runs["final"][key]), key


def test_upcycle_takes_the_sources_shape_and_a_missing_source_is_an_error(runs, data_cache_dir):
  bad = _config("experts=4t4i", data_cache_dir)
  bad.model.d_model = 16  # a grown model has its source's shape (steps.take_source_shape): 32 wins
  bad.init.upcycle_from = runs["source"]
  assert train.resolve_config(bad).model.d_model == 32
  bad.init.upcycle_from = str(runs["root"] / "nothing")
  with pytest.raises(ValueError, match="config.init.upcycle_from=.*no config.json"):
    train.train_and_evaluate(bad, str(runs["root"] / "bad2"))


def test_aux_router_stage_changes_only_aux_routers(runs, data_cache_dir, tmp_path):
  source = runs["workdir"]
  config = _config("experts=4t4i", data_cache_dir, stage="aux_routers", steps=2, log_every=1)
  config.model.moe.aux_router = True
  config.init.params_from = source
  final = train.train_and_evaluate(config, str(tmp_path))
  assert "routing/aux_router_acc" in final and final["aux_loss"] > 0
  before = dict(jax.tree_util.tree_leaves_with_path(_params(source)))
  after = jax.tree_util.tree_leaves_with_path(_params(str(tmp_path)))
  aux = [p for p, _ in after if "aux_router" in jax.tree_util.keystr(p)]
  assert aux and len(after) == len(before) + len(aux)
  for path, value in after:
    if path not in aux:
      np.testing.assert_array_equal(value, before[path], err_msg=jax.tree_util.keystr(path))
  # Inference with the trained aux routers (experiments/eval_sources.py --aux_routing): per-token decisions
  # replace expert choice, so the losses move, and each source reports the experts its tokens used.
  with pytest.raises(ValueError, match="aux_router=True"):  # expert choice without trained aux routers
    eval_sources.source_losses(studies.load_run(source), 1, aux_routing=True)
  run = studies.load_run(tmp_path)
  per_token = eval_sources.source_losses(run, 1, aux_routing=True)
  chosen = eval_sources.source_losses(run, 1)
  assert set(per_token) == set(chosen) and "scene_caption" in per_token
  present = [s for s in per_token if "experts_per_token" in per_token[s]]  # sources with positions in a batch
  assert present and all("experts_per_token" in chosen[s] for s in present)
  for source in present:
    assert 0 <= per_token[source]["experts_per_token"] <= 4 and 0 <= chosen[source]["experts_per_token"] <= 4
    assert all(np.isfinite(v) for v in per_token[source].values()), source
  assert any(per_token[s]["loss/image"] != chosen[s]["loss/image"] for s in per_token
             if "loss/image" in per_token[s])


def test_aux_router_stage_needs_aux_routers(data_cache_dir):
  config = _config("experts=4t4i", data_cache_dir, stage="aux_routers")
  with pytest.raises(ValueError, match="moe.aux_router=True"):
    train.resolve_config(config)


def test_dense_config_still_has_no_moe():
  config = steps.build_model(train.resolve_config(dense_configs.get_config())).config
  assert config.ffn == "dense" and config.moe == model_config.MoeConfig()
