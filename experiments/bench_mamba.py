"""Benchmark: selective-scan implementations, and a Mixture-of-Mamba vs Mamba block train step.

  python -m experiments.bench_mamba [--lengths 512,2048,8192] [--scan_batch 1] [--reps 3] [--parts scan]

1. `selective_scan` forward + backward for each impl at each length: median wall time and the compiled
   program's temporary memory (XLA memory analysis), with ratios to "sequential". Baseline row
   "sequential_autodiff": the same token-by-token scan differentiated by JAX instead of "sequential"'s
   hand-written backward. `--scan_batch 16 --lengths 256 --d_inner 192` is the `small` preset's shape.
2. One train step (loss, grads, AdamW update) of a MambaBlock with untie=() and of the Mixture-of-Mamba
   block (the paper's four untied projections, and all five with the conv) at equal active FLOPs (same widths;
   each token uses one modality's weights). Goal: MoM / Mamba ≤ 1.15 on CPU.
3. The same comparison for the whole decoder (`block="mamba"`, embeddings, per-layer pre-norm, `nn.scan`
   over layers, LM head, cross-entropy, AdamW), where the sort plan is built once for all layers.
The last line of stdout is a JSON object with every number.
"""

import functools
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moma import cli
from moma import dispatch
from moma import flops
from moma.layers import mamba
from moma.models import decoder
from moma.models.model_config import MAMBA_PROJECTIONS, MambaConfig

VARIANTS = {"mamba": (), "mom": MAMBA_PROJECTIONS, "mom+conv": MAMBA_PROJECTIONS + ("conv",)}


def interleaved_medians(calls, reps):
  """{name: median seconds} of `fn(*args)` for {name: (fn, args)}, timed round-robin so that load from
  other processes on a shared machine hits every variant alike."""
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))  # compile + warm up
  times = {name: [] for name in calls}
  for _ in range(reps):
    for name, (fn, args) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def temp_bytes(fn, *args):
  analysis = fn.lower(*args).compile().memory_analysis()
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def autodiff_sequential_scan(u, delta, A, B, C):
  """Baseline: the softplus-Δ recurrence as a plain per-token `lax.scan`, differentiated by JAX."""
  dt = jax.nn.softplus(delta)

  def step(h_BDN, xs):
    dt_t, u_t, b_t, c_t = xs
    h_BDN = jnp.exp(dt_t[..., None] * A) * h_BDN + (dt_t * u_t)[..., None] * b_t[:, None, :]
    return h_BDN, jnp.sum(h_BDN * c_t[:, None, :], axis=-1)

  h0 = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]))
  _, y = jax.lax.scan(step, h0, tuple(jnp.moveaxis(t, 1, 0) for t in (dt, u, B, C)))
  return jnp.moveaxis(y, 0, 1)


def bench_scans(lengths, batch, d, n, chunk_size, reps):
  rows = []
  for length in lengths:
    ks = jax.random.split(jax.random.key(length), 5)
    u, delta = (jax.random.normal(k, (batch, length, d)) for k in ks[:2])
    B, C = (jax.random.normal(k, (batch, length, n)) for k in ks[2:4])
    A = -jnp.exp(jax.random.normal(ks[4], (d, n)))
    calls = {}
    for impl in ("sequential", "sequential_autodiff", "chunked", "associative"):
      scan = (autodiff_sequential_scan if impl == "sequential_autodiff" else functools.partial(
          mamba.selective_scan, delta_softplus=True, impl=impl, chunk_size=chunk_size))
      loss = lambda u, delta, A, B, C, scan=scan: jnp.sum(scan(u, delta, A, B, C) ** 2)
      calls[impl] = (jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))), (u, delta, A, B, C))
    seconds = interleaved_medians(calls, reps)
    base = None
    for impl, (fn, args) in calls.items():
      row = dict(L=length, impl=impl, seconds=seconds[impl], temp_mib=(temp_bytes(fn, *args) or 0) / 2**20)
      base = base or row
      row["time_vs_sequential"] = row["seconds"] / base["seconds"]
      row["mem_vs_sequential"] = row["temp_mib"] / max(base["temp_mib"], 1e-9)
      rows.append(row)
      print(f"scan L={length:5d} {impl:19s} {row['seconds'] * 1e3:9.1f} ms "
            f"({row['time_vs_sequential']:.2f}x)  temp {row['temp_mib']:8.1f} MiB "
            f"({row['mem_vs_sequential']:.2f}x)", flush=True)
  return rows


def bench_blocks(batch, length, d_model, num_modalities, reps):
  ks = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(ks[0], (batch, length, d_model))
  target = jax.random.normal(ks[1], (batch, length, d_model))
  modality = jax.random.randint(ks[2], (batch, length), 0, num_modalities)
  tx = optax.adamw(1e-3)
  calls = {}
  for name, untie in VARIANTS.items():
    block = mamba.MambaBlock(MambaConfig(), d_model=d_model, num_modalities=num_modalities, untie=untie)

    def loss_fn(params, x, modality, block=block):
      plan = dispatch.partition(modality, num_modalities)  # built once per pass, as in the decoder
      return jnp.mean((block.apply({"params": params}, x, plan) - target) ** 2)

    @jax.jit
    def train_step(params, opt_state, x, modality, loss_fn=loss_fn):
      loss, grads = jax.value_and_grad(loss_fn)(params, x, modality)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    params = block.init(jax.random.key(1), x, dispatch.partition(modality, num_modalities))["params"]
    calls[name] = (train_step, (params, tx.init(params), x, modality))
  out = interleaved_medians(calls, reps)
  for name, seconds in out.items():
    print(f"block {name:9s} train step {seconds * 1e3:9.1f} ms ({seconds / out['mamba']:.2f}x mamba)")
  return out


def bench_models(batch, length, d_model, num_layers, num_modalities, reps):
  """Whole-decoder train step per variant; returns ({name: seconds}, training FLOPs per token)."""
  config = dict(modalities=("text", "image", "audio")[:num_modalities], vocab_size=512, d_model=d_model,
                num_layers=num_layers, d_ff=0, block="mamba", max_seq_len=length)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 512, (batch, length + 1))
  data = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:],
              modality=rng.integers(0, num_modalities, (batch, length)),
              segment=np.ones((batch, length)), position=np.broadcast_to(np.arange(length), (batch, length)))
  data = {k: jnp.asarray(v, jnp.int32) for k, v in data.items()}
  data["loss_mask"] = jnp.ones((batch, length))
  tx = optax.adamw(1e-3)
  calls = {}
  for name, untie in VARIANTS.items():
    model = decoder.as_model(dict(config, untie=untie))

    @jax.jit
    def train_step(params, opt_state, data, model=model):
      loss_fn = lambda p: decoder.loss_fn(model.apply({"params": p}, data), data, model.config.modalities)[0]
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), data)["params"])
    calls[name] = (train_step, (params, tx.init(params), data))
  out = interleaved_medians(calls, reps)
  for name, seconds in out.items():
    print(f"model {name:9s} train step {seconds * 1e3:9.1f} ms ({seconds / out['mamba']:.2f}x mamba)")
  return out, flops.per_token(config, length)["total"]


def main():
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="512,2048,8192")
  parser.add_argument("--scan_batch", type=int, default=1)
  parser.add_argument("--d_inner", type=int, default=128)
  parser.add_argument("--d_state", type=int, default=16)
  parser.add_argument("--chunk_size", type=int, default=64)
  parser.add_argument("--block_batch", type=int, default=4)
  parser.add_argument("--block_len", type=int, default=512)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--model_layers", type=int, default=4)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--parts", default="scan,block,model", help="which of scan,block,model to run")
  args = parser.parse_args()
  parts = set(args.parts.split(","))
  if not parts <= {"scan", "block", "model"}:
    raise ValueError(f"--parts={args.parts!r}: expected a comma-separated subset of scan,block,model")
  print(f"backend={jax.default_backend()} devices={jax.devices()}")
  result = dict(backend=jax.default_backend())
  if "scan" in parts:
    lengths = [int(s) for s in args.lengths.split(",")]
    result["scan"] = bench_scans(lengths, args.scan_batch, args.d_inner, args.d_state, args.chunk_size,
                                 args.reps)
  if "block" in parts:
    blocks = bench_blocks(args.block_batch, args.block_len, args.d_model, 3, args.reps)
    result.update(block_seconds=blocks, mom_vs_mamba=blocks["mom"] / blocks["mamba"],
                  mom_conv_vs_mamba=blocks["mom+conv"] / blocks["mamba"],
                  flops_per_token=mamba.mamba_flops_per_token(MambaConfig(), args.d_model), goal_mom_vs_mamba=1.15)
  if "model" in parts:
    models, model_flops = bench_models(args.block_batch, args.block_len, args.d_model, args.model_layers, 3,
                                       args.reps)
    result.update(model_seconds=models, model_mom_vs_mamba=models["mom"] / models["mamba"],
                  model_mom_conv_vs_mamba=models["mom+conv"] / models["mamba"],
                  model_train_flops_per_token=model_flops)
  print(json.dumps(result))

if __name__ == "__main__":
  cli.run_argparse(main)
