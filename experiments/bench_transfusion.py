"""Transfusion train step: MoT vs dense (and Mixture-of-Mamba vs Mamba) at equal active FLOPs.

The batch is bench_layers' interleaved text + image documents (text runs of 32–320 tokens between
128-patch images, about a third image positions), with continuous patches (P = 4) and one image block per
image: the step is the jitted value_and_grad of L_LM + λ·L_diffusion, noise drawn from the "diffusion"
rng as the trainer does. MoT unties every component; its patch projections exist once either way (image
only). Ratios are variant / baseline CPU time (min over interleaved repeats); the last line is JSON.

  python -m experiments.bench_transfusion [--d_model 256 --d_ff 1024 --batch_size 8 --seq_len 512 ...]
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_layers
from moma import cli
from moma import flops
from moma.models import decoder
from moma.models.model_config import MAMBA_PROJECTIONS, UNTIE_COMPONENTS

PATCH_DIM = 4
# name: (variant overrides, baseline overrides)
PAIRS = {"mot": (dict(untie=UNTIE_COMPONENTS["transformer"]), {}),
         "mom": (dict(block="mamba", d_ff=0, untie=MAMBA_PROJECTIONS),
                 dict(block="mamba", d_ff=0))}


def transfusion_batch(args):
  batch = bench_layers.interleaved_batch(args)
  image_BL = np.asarray(batch["modality"]) == 1
  starts = image_BL & ~np.pad(image_BL, [(0, 0), (1, 0)])[:, :-1]
  image_block = np.where(image_BL, np.cumsum(starts, axis=1), 0).astype(np.int32)
  patches = np.random.default_rng(2).uniform(-1, 1, (*image_BL.shape, PATCH_DIM)).astype(np.float32)
  return dict(batch, image_block=jnp.asarray(image_block), patches=jnp.asarray(patches * image_BL[..., None]),
              loss_mask=jnp.asarray(~image_BL, jnp.float32))


def train_step(cfg, batch):
  model = decoder.as_model(cfg)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch))["params"]

  def loss(p, batch, rng):
    out, state = model.apply({"params": p}, batch, rngs={"diffusion": rng}, mutable=["losses", "metrics"])
    return decoder.loss_fn(out, batch, model.config.modalities)[0] + bench_layers.sum_losses(state)

  return jax.jit(jax.value_and_grad(loss)), (params, batch, jax.random.key(1))


def main():
  parser = bench_layers.shape_parser(__doc__)
  parser.add_argument("--pairs", default="mot,mom", help="comma list of mot, mom")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {vars(args)}")
  batch = transfusion_batch(args)
  result = {"image_share": round(float(jnp.mean(batch["image_block"] > 0)), 3)}
  for name in args.pairs.split(","):
    variant, baseline = PAIRS[name]
    base = bench_layers.model_config(args, 2, args.num_layers, patch_dim=PATCH_DIM)
    cfgs = {k: {**base, **o} for k, o in (("baseline", baseline), (name, variant))}
    times = bench_layers.best_times({k: train_step(c, batch) for k, c in cfgs.items()}, args.repeats)
    (base_cpu, base_wall), (cpu, wall) = times["baseline"], times[name]
    fl = {k: flops.per_token(c, args.seq_len)["total"] for k, c in cfgs.items()}
    result[f"{name}_over_baseline"] = round(cpu / base_cpu, 3)
    result[f"{name}_over_baseline_wall"] = round(wall / base_wall, 3)
    result[f"{name}_flops_over_baseline"] = round(fl[name] / fl["baseline"], 3)
    print(f"transfusion train step {name:4s}: baseline {base_cpu * 1e3:8.1f} ms CPU, {name} {cpu * 1e3:8.1f} ms,"
          f" ratio {cpu / base_cpu:.3f} (FLOPs ratio {fl[name] / fl['baseline']:.3f}, wall ratio "
          f"{wall / base_wall:.3f})")
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run_argparse(main)
