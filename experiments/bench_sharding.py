"""Train-step time of the real trainer step (`moma.train`) on device meshes vs one device, same global batch.

  python -m experiments.bench_sharding [--untie=none|all|ffn+qkv] [--steps=10]

The state is created sharded and the step compiled exactly as `train.train_and_evaluate` does
(`steps.init_or_restore`, `loop.shard_batch`, `loop.StepCache` inside `sharding.activate`). On CPU the
8 "devices" (XLA_FLAGS=--xla_force_host_platform_device_count=8) share the host cores, so the ratio measures
partitioning + collective overhead, not speed-up. Second part: one grouped (per-modality) FFN, fwd + bwd,
with the global GSPMD sort plan vs `moma.expert_parallel.grouped` (per-device sort, and expert parallelism
on an `expert` axis). Last stdout line: a JSON object.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import functools  # pylint: disable=g-import-not-at-top,wrong-import-position
import json
import math
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import mot
from moma import dispatch, expert_parallel, kernels, loop, sharding, steps
from moma.models import decoder

UNTIE = flags.DEFINE_string("untie", "none", "configs/mot.py untie= preset or components joined by '+'")
STEPS = flags.DEFINE_integer("steps", 10, "timed steps per mesh (after one compile + warm-up step)")
MESHES = (((1,), ("data",)), ((8,), ("data",)), ((2, 2, 2), ("data", "fsdp", "tensor")),
          ((2, 4), ("data", "expert")))


def bench_config(untie: str) -> ml_collections.ConfigDict:
  config = mot.get_config(f"size=tiny,untie={untie}")
  config.model.update(vocab_size=256, d_model=128, d_ff=512)
  config.mesh.rules = (("modality", None),)  # 3 modalities do not divide an expert axis of 4.
  return config


def host_batch(modalities, b=16, l=64, vocab=256, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, l + 1), dtype=np.int32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment": np.ones((b, l), np.int32),
          "position": np.arange(l, dtype=np.int32)[None].repeat(b, 0),
          "modality": rng.integers(0, len(modalities), (b, l), dtype=np.int32),
          "loss_mask": np.ones((b, l), np.float32)}


def time_mesh(config, shape, axes):
  """Seconds per trainer step and the last loss on a `shape` mesh (the first prod(shape) devices)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.shape, config.mesh.axes = shape, axes
  mesh, rules = steps.make_mesh(config)
  model = steps.build_model(config)
  modalities = tuple(config.model.modalities)
  batch = loop.shard_batch(host_batch(modalities, vocab=config.model.vocab_size), mesh, rules)
  state, state_sh, _, _ = steps.init_or_restore(config, model, None, batch, mesh, rules)
  step_fn = functools.partial(steps.train_step, model=model, loss_fn=decoder.loss_fn,
                              modalities=modalities, seed=config.train.seed)
  task = loop.Task("lm", step_fn, None, 0, 0.0)
  step = functools.partial(loop.StepCache(lambda t: t.step_fn, state_sh, (mesh, rules)), task)
  state, out = step(state, batch)  # warm-up (compiles)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(STEPS.value):
    state, out = step(state, batch)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / STEPS.value, float(out["loss"])


def time_grouped(shape, axes, mode, m=8192, d=128, f=512, groups=4):
  """Forward + backward of one grouped (per-modality) matmul pair: global GSPMD sort plan vs per-device."""
  cfg = ml_collections.ConfigDict({"shape": shape, "axes": axes, "rules": ()})
  mesh = sharding.mesh_from_config(cfg, jax.devices()[:math.prod(shape)])
  rules = sharding.rules_from_config(cfg)
  rng = np.random.default_rng(0)
  tok = sharding.batch_sharding(mesh, rules, 1)
  w_spec = jax.sharding.PartitionSpec("expert" if "expert" in axes else None)
  x = jax.device_put(rng.standard_normal((m, d), np.float32), jax.sharding.NamedSharding(mesh, tok.spec))
  ids = jax.device_put(rng.integers(0, groups, (m,), dtype=np.int32), tok)
  w = {k: jax.device_put(rng.standard_normal(s, np.float32) / 30, jax.sharding.NamedSharding(mesh, w_spec))
       for k, s in (("up", (groups, d, f)), ("down", (groups, f, d)))}

  def ffn(rows, plan, w):
    gmm = functools.partial(kernels.gmm, group_sizes=plan.group_sizes)
    return gmm(jax.nn.gelu(gmm(rows, w["up"])), w["down"])

  def loss(x, w):
    if mode == "gspmd":
      plan = dispatch.make_plan(ids, groups)
      y = plan.unsort(ffn(plan.sort(x), plan, w), (m,))
    else:
      y = expert_parallel.grouped(ffn, x, ids, w, num_groups=groups)
    return jnp.sum(y * y)

  with sharding.activate(mesh, rules):
    step = jax.jit(jax.grad(loss, (0, 1)))
    jax.block_until_ready(step(x, w))
    start = time.perf_counter()
    for _ in range(STEPS.value):
      out = step(x, w)
    jax.block_until_ready(out)
  return (time.perf_counter() - start) / STEPS.value


def main(_):
  config = bench_config(UNTIE.value)
  results = {}
  for shape, axes in MESHES:
    name = "x".join(map(str, shape)) + ":" + ",".join(axes)
    results[name], loss = time_mesh(config, shape, axes)
    print(f"{name:28s} {1e3 * results[name]:8.1f} ms/step  loss {loss:.6f}")
  base = results["1:data"]
  ratios = {k: v / base for k, v in results.items()}
  for k, r in ratios.items():
    print(f"{k:28s} {r:6.2f}x the one-device step time")
  grouped = {}
  for shape, axes in (((1,), ("data",)), ((8,), ("data",)), ((2, 4), ("data", "expert"))):
    for mode in ("gspmd", "grouped"):
      key = "x".join(map(str, shape)) + ":" + ",".join(axes) + ":" + mode
      grouped[key] = time_grouped(shape, axes, mode)
      print(f"grouped FFN fwd+bwd {key:34s} {1e3 * grouped[key]:8.1f} ms")
  print(json.dumps({"untie": tuple(config.model.untie), "backend": jax.default_backend(), "step_s": results,
                    "ratio_vs_one_device": ratios, "grouped_ffn_s": grouped}))


if __name__ == "__main__":
  app.run(main)
