"""Benchmark: cached decoding (`moma.models.generate`) against re-running the full forward for every token.

  python -m experiments.bench_decode [--prompt_len 128] [--new_tokens 128] [--batch 4] [--reps 3]

For each decoder (dense transformer, MoT with every weight untied, MoMa 4t4i expert choice decoding with
its aux routers, Mamba, Mixture-of-Mamba), both ways produce the same greedy tokens (checked here):
- `cached`: `generate.generate`: one prefill, then one `lax.scan` of single-token steps over the KV cache
  (attention) or the recurrent state (Mamba);
- `recompute`: a `lax.fori_loop` that re-applies the model to the whole `max_len` buffer for every new token
  and takes the argmax at the last filled position: the cost without a cache.
Printed: tokens/s of each and the speed-up (t_recompute / t_cached), median over interleaved reps, one
compile excluded. The last stdout line is a JSON object with every number.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from moma import cli
from moma.models import decoder
from moma.models import generate
from moma.models.model_config import MAMBA_PROJECTIONS

COMMON = dict(modalities=("text", "image"), vocab_size=512, d_model=256, num_layers=4, num_heads=4, d_ff=1024)
MODELS = {
    "dense": dict(COMMON),
    "mot": dict(COMMON, untie=("qkv", "o", "ffn", "norm")),
    "moma_4t4i_ec": dict(COMMON, ffn="moe", d_ff=256, aux_routing=True,
                         moe=dict(layout="4t4i", routing="ec", aux_router=True)),
    "mamba": dict(COMMON, block="mamba", d_ff=0, mamba=dict(d_state=16)),
    "mom": dict(COMMON, block="mamba", d_ff=0, mamba=dict(d_state=16),
                untie=MAMBA_PROJECTIONS),
}


def prompt(batch, length, vocab, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, length))
  return dict(tokens=jnp.asarray(tokens, jnp.int32), modality=jnp.asarray(tokens % 2, jnp.int32),
              segment=jnp.ones((batch, length), jnp.int32),
              position=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)))


def recompute_fn(model, prompt_len, new_tokens):
  """Greedy decoding by re-running the model on the whole [B, max_len] buffer for every new token."""
  total = prompt_len + new_tokens

  def run(variables, batch):
    b = batch["tokens"].shape[0]
    pad = lambda x: jnp.pad(x, ((0, 0), (0, new_tokens)))
    buf = dict(tokens=pad(batch["tokens"]), modality=pad(batch["modality"]),
               segment=jnp.ones((b, total), jnp.int32),
               position=jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (b, total)))

    def step(i, buf):
      logits = model.apply(variables, buf)
      token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, prompt_len + i - 1, 1, False), -1)
      tokens = jax.lax.dynamic_update_index_in_dim(buf["tokens"], token.astype(jnp.int32)[:, None],
                                                   prompt_len + i, 1)
      modality = jax.lax.dynamic_update_index_in_dim(buf["modality"], (token % 2).astype(jnp.int32)[:, None],
                                                     prompt_len + i, 1)
      return dict(buf, tokens=tokens, modality=modality)

    return jax.lax.fori_loop(0, new_tokens, step, buf)["tokens"][:, prompt_len:]

  return jax.jit(run)


def main():
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--models", default=",".join(MODELS))
  args = parser.parse_args()
  total = args.prompt_len + args.new_tokens
  batch = prompt(args.batch, args.prompt_len, COMMON["vocab_size"])
  table = jnp.arange(COMMON["vocab_size"], dtype=jnp.int32) % 2  # token id → modality, as in `prompt`
  results = {}
  for name in args.models.split(","):
    model = decoder.as_model(dict(MODELS[name], max_seq_len=total))
    variables = {"params": model.init(jax.random.key(0), batch)["params"]}
    cached = lambda: generate.generate(model, variables, batch, args.new_tokens, modality_table=table)[0]
    recompute = recompute_fn(model, args.prompt_len, args.new_tokens)
    np.testing.assert_array_equal(cached(), recompute(variables, batch))  # compiles both, same tokens
    times = {"cached": [], "recompute": []}
    for _ in range(args.reps):
      for kind, fn in (("cached", cached), ("recompute", lambda: recompute(variables, batch))):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times[kind].append(time.perf_counter() - start)
    t = {k: float(np.median(v)) for k, v in times.items()}
    new = args.batch * args.new_tokens
    results[name] = dict(cached_tok_s=new / t["cached"], recompute_tok_s=new / t["recompute"],
                         speedup=t["recompute"] / t["cached"])
    print(f"{name:14s} cached {new / t['cached']:9.1f} tok/s   recompute {new / t['recompute']:9.1f} tok/s"
          f"   speed-up {t['recompute'] / t['cached']:.1f}x", flush=True)
  print(json.dumps(dict(backend=jax.default_backend(), **vars(args), results=results)))


if __name__ == "__main__":
  cli.run_argparse(main)
