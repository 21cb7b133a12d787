"""MoT, MoMa, MoE and MoD vs dense: one layer and the whole model (train step), plus compile time.

MoT unties every component (qkv, o, ffn, norm, qk_norm); dense has the same shapes, so both do the
same matmul FLOPs per token. MoMa 4t4i and the 8-shared MoE (expert choice, capacity factor 1,
full-size experts) do the dense FFN's expert FLOPs plus a router; Mixture-of-Depths (25% capacity,
every other layer) does fewer. Those rows print the FLOPs ratio (`moma.flops`) next to the time ratio
and run on text + image batches of interleaved documents (text runs of 32–320 tokens, 128-token
images: about a third image tokens); their "ffn" row times the FFN layer alone, "layer" one decoder
block (for MoD: a block behind a MoD router).

Defaults are a realistic small layer (d_model 256, d_ff = 4 d_model, batch × seq_len = 4096 rows per
step): with tiny shapes the per-group gather/loop overhead dominates, which is not what users run.
Ratios are variant / dense in the same run, timed interleaved; the primary time is the process CPU time
of a step (all threads, min over repeats), which a shared, loaded machine disturbs far less than wall
time (also printed). The last line is JSON.

  python -m experiments.bench_layers [--rows mot,moma,compile] [--d_model 512 --d_ff 2048 ...]
"""

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moma import cli
from moma import dispatch
from moma import flops
from moma.models import blocks
from moma.models import decoder
from moma.models.model_config import UNTIE_COMPONENTS
MODALITIES = ("text", "image", "audio")
# config.model overrides of the sparse variants; MoE at the defaults: expert choice, capacity factor 1.
SPARSE = {"moma_4t4i": dict(ffn="moe", moe=dict(layout="4t4i")),
          "moe_8shared": dict(ffn="moe", moe=dict(layout="8shared")),
          "mod25": dict(mod=dict(enabled=True, capacity=0.25, every=2)),
          "moma_4t4i_mod25": dict(ffn="moe", moe=dict(layout="4t4i"),
                                  mod=dict(enabled=True, capacity=0.25, every=2))}
IMAGE_TOKENS = 128


def model_config(args, num_modalities, num_layers, untie=(), **overrides):
  return dict(modalities=MODALITIES[:num_modalities], vocab_size=args.vocab_size, d_model=args.d_model,
              num_layers=num_layers, num_heads=args.num_heads, d_ff=args.d_ff, untie=untie,
              qk_norm=True, max_seq_len=args.seq_len, **overrides)


def batch_from(args, modality_BL):
  rng = np.random.default_rng(0)
  shape = modality_BL.shape
  tokens = rng.integers(0, args.vocab_size, shape)
  return dict(tokens=jnp.asarray(tokens, jnp.int32), modality=jnp.asarray(modality_BL, jnp.int32),
              segment=jnp.ones(shape, jnp.int32),
              position=jnp.broadcast_to(jnp.arange(args.seq_len, dtype=jnp.int32), shape),
              targets=jnp.asarray(np.roll(tokens, -1, 1), jnp.int32), loss_mask=jnp.ones(shape))


def make_batch(args, num_modalities):
  """Modality runs of 16 tokens in random order (the MoT rows)."""
  rng = np.random.default_rng(0)
  runs = rng.integers(0, num_modalities, (args.batch_size, args.seq_len // 16 + 1)).repeat(16, axis=1)
  return batch_from(args, runs[:, :args.seq_len])


def interleaved_batch(args):
  """Text + image documents: text runs of 32–320 tokens between 128-token images (~1/3 image tokens)."""
  rng = np.random.default_rng(1)
  rows = []
  for _ in range(args.batch_size):
    row = []
    while len(row) < args.seq_len:
      row += [0] * int(rng.integers(32, 321)) + [1] * IMAGE_TOKENS
    rows.append(row[:args.seq_len])
  return batch_from(args, np.asarray(rows))


def best_times(calls, repeats):
  """{name: (min CPU seconds, min wall seconds)} per call, interleaved so that load hits all alike."""
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))  # compile + warm up
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (fn, args) in calls.items():
      cpu, wall = time.process_time(), time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
  return {name: tuple(min(c) for c in zip(*t)) for name, t in times.items()}


def sum_losses(state):
  return sum(jnp.sum(v) for v in jax.tree.leaves(state.get("losses", {})))


def model_step(cfg, batch):
  """(jitted value_and_grad of the LM loss plus aux losses, (params, batch))."""
  model = decoder.as_model(cfg)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch))["params"]

  def loss(p, batch):
    logits, state = model.apply({"params": p}, batch, mutable=["losses", "metrics"])
    return decoder.loss_fn(logits, batch, model.config.modalities)[0] + sum_losses(state)

  return jax.jit(jax.value_and_grad(loss)), (params, batch)


def unit_step(cfg, batch, unit="layer"):
  """(jitted value_and_grad of one unit's summed output w.r.t. its params and input, args).

  unit "layer": a decoder block (a MoD group of one routed block when MoD is on); "ffn": the FFN alone.
  """
  cfg = decoder.as_model(cfg).config
  # As in the decoder: a modality expert layout reads its groups off a one-group-per-modality plan.
  moe_by_modality = cfg.ffn == "moe" and not cfg.moe_layout().shared
  num_groups = cfg.num_modalities if cfg.untie or moe_by_modality else 1
  x = jax.random.normal(jax.random.key(1), (*batch["tokens"].shape, cfg.d_model))
  ctx = (batch["modality"], batch["segment"], batch["position"])
  if unit == "ffn":
    module = blocks.make_ffn(cfg, "ffn")
    kw = dict(segment=batch["segment"]) if cfg.ffn == "moe" else {}
    apply = lambda p, x, plan, *ctx: module.apply({"params": p}, x, plan, mutable=["losses", "metrics"],
                                                  **kw)
  else:
    module = (blocks.ModGroup if cfg.mod.enabled else blocks.Block)(cfg)
    apply = lambda p, x, plan, *ctx: module.apply({"params": p}, x, plan, *ctx, None,
                                                  mutable=["losses", "metrics"])

  def loss(p, x, modality, segment, position):
    plan = dispatch.partition(modality, num_groups)  # built once per forward, as in the decoder
    y, state = apply(p, x, plan, modality, segment, position)
    return jnp.sum(y.astype(jnp.float32) ** 2) + sum_losses(state)

  plan = dispatch.partition(batch["modality"], num_groups)
  init = (lambda k: module.init(k, x, plan, **kw)) if unit == "ffn" else (
      lambda k: module.init(k, x, plan, *ctx, None))
  params = nn.meta.unbox(jax.jit(init)(jax.random.key(0)))["params"]
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (params, x, *ctx)


def flops_ratio(cfg, dense_cfg, seq_len, unit):
  """Training FLOPs per token, variant / dense, of the timed unit (from `moma.flops`)."""
  if unit == "ffn":
    part = lambda c: flops.forward_per_token(c, seq_len)["ffn"]
  else:
    part = lambda c: flops.per_token(c, seq_len)["total"]
  return part(cfg) / part(dense_cfg)


def compare(args, batch, num_modalities, variants, units, result, flops_rows=False):
  """Times every variant against dense (same batch, interleaved) per unit; fills `result`."""
  for unit in units:
    layers = args.num_layers if unit == "model" else 1
    dense_cfg = model_config(args, num_modalities, layers)
    calls, ratios = {}, {}
    for name, overrides in variants.items():
      if unit == "ffn" and (overrides.get("ffn") != "moe" or "mod" in overrides):
        continue  # FFN rows: the MoE layers alone
      if unit == "layer" and "mod" in overrides:
        overrides = dict(overrides, mod=dict(overrides["mod"], every=1))  # one routed block
      cfg = model_config(args, num_modalities, layers, **overrides)
      step = model_step if unit == "model" else lambda c, b: unit_step(c, b, unit)
      calls[name] = step(cfg, batch)
      ratios[name] = flops_ratio(cfg, dense_cfg, args.seq_len, unit)
    step = model_step if unit == "model" else lambda c, b: unit_step(c, b, unit)
    calls = {"dense": step(dense_cfg, batch), **calls}
    times = best_times(calls, args.repeats)
    dense_cpu, dense_wall = times.pop("dense")
    for name, (cpu, wall) in times.items():
      key = f"{unit}_{name}_over_dense_{num_modalities}mod"
      result[key], result[key + "_wall"] = round(cpu / dense_cpu, 3), round(wall / dense_wall, 3)
      line = (f"{unit:5s} train step, {num_modalities} mod., {name:16s} CPU time dense {dense_cpu * 1e3:8.1f}"
              f" ms, {name} {cpu * 1e3:8.1f} ms, ratio {cpu / dense_cpu:.3f}")
      if flops_rows:
        result[key.replace("_over_dense", "_flops_over_dense")] = round(ratios[name], 3)
        line += f"  FLOPs ratio {ratios[name]:.3f}  time per FLOP {cpu / dense_cpu / ratios[name]:.3f}"
      print(line + f"  (wall ratio {wall / dense_wall:.3f})")


def compile_seconds(cfg, batch):
  step, (params, batch) = model_step(cfg, batch)
  start = time.perf_counter()
  step.lower(params, batch).compile()
  return time.perf_counter() - start


def shape_parser(doc: str) -> argparse.ArgumentParser:
  """The model and batch shape flags every layer benchmark takes (a realistic small layer by default)."""
  parser = cli.ArgumentParser(description=doc.splitlines()[0])
  for name, default in dict(d_model=256, d_ff=1024, num_heads=4, vocab_size=512, batch_size=8,
                            seq_len=512, num_layers=2, repeats=7).items():
    parser.add_argument(f"--{name}", type=int, default=default)
  return parser


def main():
  parser = shape_parser(__doc__)
  parser.add_argument("--rows", default="mot,moma,compile", help="comma list of mot, moma, compile")
  args = parser.parse_args()
  rows = args.rows.split(",")
  if args.d_model < 256 or args.batch_size * args.seq_len < 4096:
    print(f"warning: d_model={args.d_model}, {args.batch_size * args.seq_len} rows per step are below "
          "realistic sizes (d_model >= 256, >= 4096 rows): per-group overhead will dominate")
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {vars(args)}")
  result = {}
  if "mot" in rows:
    for num_modalities in (2, 3):
      compare(args, make_batch(args, num_modalities), num_modalities,
              {"mot": dict(untie=UNTIE_COMPONENTS["transformer"])}, ("layer", "model"), result)
  if "moma" in rows:
    batch = interleaved_batch(args)
    image_share = float(jnp.mean(batch["modality"] == 1))
    result["image_token_share"] = round(image_share, 3)
    print(f"MoMa / MoE / MoD rows: text + image documents, {image_share:.1%} image tokens")
    compare(args, batch, 2, SPARSE, ("ffn", "layer", "model"), result, flops_rows=True)
  if "compile" in rows:
    batch = make_batch(args, 3)
    for arch, untie in (("dense", ()), ("mot", UNTIE_COMPONENTS["transformer"])):
      seconds = {n: compile_seconds(model_config(args, 3, n, untie), batch) for n in (2, 24)}
      ratio = seconds[24] / seconds[2]
      result[f"compile_24_over_2_layers_{arch}"] = round(ratio, 3)
      print(f"compile {arch}: 2 layers {seconds[2]:.2f} s  24 layers {seconds[24]:.2f} s  ratio {ratio:.3f}")
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run_argparse(main)
