"""Mixture-of-Mamba's untied depthwise conv: per-token weight gather (what `MambaBlock` does) against one
conv per modality and a per-token select, at the presets' shapes, forward + backward.

  python -m experiments.bench_mamba_conv [--sizes=tiny,S,M,1.4B] [--groups=2,3] [--reps=5]

The conv mixes each token with its d_conv - 1 predecessors of any modality, so it cannot run on the
modality-sorted rows of `moma.dispatch`; the two ways to untie it are
  gather  w[group_of_token] → a [B, L, K, I] kernel, one conv (backward: a scatter-add into w's G rows);
  select  G convs of the whole sequence, each token keeping its modality's output (G× the conv FLOPs,
          backward: G masked reductions).
Both are timed against the tied conv (one [K, I] kernel) in the same interleaved rounds, one row of
d_inner = 2 d_model at the preset's seq_len. The last stdout line is a JSON object.
"""

import json

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from experiments.bench_mamba import interleaved_medians, temp_bytes
from moma import cli
from moma.layers import mamba

SIZES = flags.DEFINE_list("sizes", ["tiny", "S", "M", "1.4B"], "presets (configs/common.py SIZES)")
GROUPS = flags.DEFINE_list("groups", ["2", "3"], "modalities")
REPS = flags.DEFINE_integer("reps", 5, "interleaved timing rounds (median)")
D_CONV = 4


def conv_losses(num_groups):
  """{variant: jitted grad of sum(conv(x)²) wrt (x, w, b)} for the tied, gather and select convs."""

  def tied(x, w, b, group):
    del group
    return mamba.causal_conv(jnp.zeros_like(x[:, :D_CONV - 1]), x, w[0], b[0])[0]

  def gather(x, w, b, group):
    return mamba.causal_conv(jnp.zeros_like(x[:, :D_CONV - 1]), x, w[group], b[group])[0]

  def select(x, w, b, group):
    out = 0.0
    for g in range(num_groups):
      conv = mamba.causal_conv(jnp.zeros_like(x[:, :D_CONV - 1]), x, w[g], b[g])[0]
      out = out + jnp.where((group == g)[..., None], conv, 0)
    return out

  variants = {"tied": tied, "gather": gather, "select": select}
  return {name: jax.jit(jax.grad(lambda x, w, b, group, f=f: jnp.sum(f(x, w, b, group) ** 2),
                                 argnums=(0, 1, 2)))
          for name, f in variants.items()}


def main(_):
  rows = []
  for size in SIZES.value:
    d_inner, length = 2 * common.SIZES[size]["d_model"], common.SIZES[size]["seq_len"]
    for num_groups in map(int, GROUPS.value):
      ks = jax.random.split(jax.random.key(0), 4)
      x = jax.random.normal(ks[0], (1, length, d_inner))
      w = jax.random.normal(ks[1], (num_groups, D_CONV, d_inner))
      b = jax.random.normal(ks[2], (num_groups, d_inner))
      group = jax.random.randint(ks[3], (1, length), 0, num_groups)
      fns = conv_losses(num_groups)
      args = (x, w, b, group)
      seconds = interleaved_medians({name: (fn, args) for name, fn in fns.items()}, REPS.value)
      row = dict(size=size, groups=num_groups, d_inner=d_inner, length=length)
      for name, fn in fns.items():
        row[f"{name}_ms"] = 1e3 * seconds[name]
        row[f"{name}_temp_mib"] = (temp_bytes(fn, *args) or 0) / 2**20
      row["gather_vs_tied"] = seconds["gather"] / seconds["tied"]
      row["select_vs_tied"] = seconds["select"] / seconds["tied"]
      row["select_vs_gather"] = seconds["select"] / seconds["gather"]
      rows.append(row)
      print(f"{size:5s} G={num_groups} I={d_inner:5d} L={length:5d}  tied {row['tied_ms']:8.2f} ms  "
            f"gather {row['gather_ms']:8.2f} ms ({row['gather_vs_tied']:.2f}x, "
            f"temp {row['gather_temp_mib']:.1f} MiB)  select {row['select_ms']:8.2f} ms "
            f"({row['select_vs_tied']:.2f}x, temp {row['select_temp_mib']:.1f} MiB)", flush=True)
  print(json.dumps({"backend": jax.default_backend(), "rows": rows}))


if __name__ == "__main__":
  cli.run(main)
