"""MoT vs dense at equal active FLOPs: one layer and the whole model (train step), plus compile time.

MoT unties every component (qkv, o, ffn, norm, qk_norm); dense has the same shapes, so both do the
same matmul FLOPs per token. Ratios are MoT / dense time in the same run; the last line is JSON.

  python -m experiments.bench_layers [--d_model 256 --seq_len 256 ...]
"""

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moma import dispatch
from moma.models import decoder

UNTIE_ALL = ("qkv", "o", "ffn", "norm", "qk_norm")
MODALITIES = ("text", "image", "audio")


def model_config(args, num_modalities, untie, num_layers):
  return dict(modalities=MODALITIES[:num_modalities], vocab_size=args.vocab_size, d_model=args.d_model,
              num_layers=num_layers, num_heads=args.num_heads, d_ff=args.d_ff, untie=untie,
              qk_norm=True, max_seq_len=args.seq_len)


def make_batch(args, num_modalities):
  rng = np.random.default_rng(0)
  shape = (args.batch_size, args.seq_len)
  # modality runs of random length, as in interleaved documents
  runs = rng.integers(0, num_modalities, (args.batch_size, args.seq_len // 16 + 1)).repeat(16, axis=1)
  tokens = rng.integers(0, args.vocab_size, shape)
  return dict(tokens=jnp.asarray(tokens, jnp.int32),
              modality=jnp.asarray(runs[:, :args.seq_len], jnp.int32),
              segment=jnp.ones(shape, jnp.int32),
              position=jnp.broadcast_to(jnp.arange(args.seq_len, dtype=jnp.int32), shape),
              targets=jnp.asarray(np.roll(tokens, -1, 1), jnp.int32), loss_mask=jnp.ones(shape))


def best_times(calls, repeats):
  """Min seconds per call; calls are interleaved so that load from other processes hits both alike."""
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))  # compile + warm up
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (fn, args) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: min(t) for name, t in times.items()}


def model_step(cfg, batch):
  """(jitted value_and_grad of the LM loss, params)."""
  model = decoder.Model(**cfg)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch))["params"]

  def loss(p, batch):
    return decoder.loss_fn(model.apply({"params": p}, batch), batch, model.modalities)[0]

  return jax.jit(jax.value_and_grad(loss)), params


def layer_step(cfg, batch):
  """(jitted value_and_grad of one decoder block's summed output w.r.t. its params and input, args)."""
  model = decoder.Model(**cfg)
  spec = model.spec
  num_groups = spec.num_modalities if spec.untie else 1
  block = decoder.Block(spec)
  x = jax.random.normal(jax.random.key(1), (*batch["tokens"].shape, spec.d_model))
  ctx = (batch["modality"], batch["segment"], batch["position"], None)

  def loss(p, x, modality, segment, position):
    plan = dispatch.make_plan(modality, num_groups)  # built once per forward, as in the decoder
    y = block.apply({"params": p}, x, plan, modality, segment, position, None)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  plan = dispatch.make_plan(batch["modality"], num_groups)
  params = nn.meta.unbox(jax.jit(block.init)(jax.random.key(0), x, plan, *ctx))["params"]
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (params, x, *ctx[:3])


def compile_seconds(cfg, batch):
  step, params = model_step(cfg, batch)
  start = time.perf_counter()
  step.lower(params, batch).compile()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for name, default in dict(d_model=256, d_ff=768, num_heads=4, vocab_size=512, batch_size=4,
                            seq_len=256, num_layers=2, repeats=7).items():
    parser.add_argument(f"--{name}", type=int, default=default)
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {vars(args)}")
  result = {}
  for num_modalities in (2, 3):
    batch = make_batch(args, num_modalities)
    for what, make in (("layer", layer_step), ("model", model_step)):
      calls = {}
      for arch, untie in (("dense", ()), ("mot", UNTIE_ALL)):
        fn, fn_args = make(model_config(args, num_modalities, untie, args.num_layers), batch)
        calls[arch] = (fn, fn_args if isinstance(fn_args, tuple) else (fn_args, batch))
      times = best_times(calls, args.repeats)
      ratio = times["mot"] / times["dense"]
      result[f"{what}_mot_over_dense_{num_modalities}mod"] = round(ratio, 3)
      print(f"{what:5s} train step, {num_modalities} modalities: dense {times['dense'] * 1e3:8.1f} ms  "
            f"MoT {times['mot'] * 1e3:8.1f} ms  ratio {ratio:.3f}")
  batch = make_batch(args, 3)
  for arch, untie in (("dense", ()), ("mot", UNTIE_ALL)):
    seconds = {n: compile_seconds(model_config(args, 3, untie, n), batch) for n in (2, 24)}
    ratio = seconds[24] / seconds[2]
    result[f"compile_24_over_2_layers_{arch}"] = round(ratio, 3)
    print(f"compile {arch}: 2 layers {seconds[2]:.2f} s  24 layers {seconds[24]:.2f} s  ratio {ratio:.3f}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
