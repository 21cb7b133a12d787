"""Weight gradients of broadcast scales: `moma.layers.scale.scale_features` against a plain `x * w`.

  python -m experiments.bench_scale [--shapes=1x1024x1536,8x1024x768,16x256x96] [--reps=5]

Two layers whose weight multiplies every token: RMSNorm (`moma.layers.norms.Norm`, its scale) and Mamba's
tied depthwise conv (`moma.layers.mamba.causal_conv`, 4 taps over d_inner = the shape's last dim), each
forward + backward (grads of x and the weights) with scale_features (the code) and with the product
written as `x * w` (the baseline, patched in), timed in interleaved rounds. The last stdout line is JSON.
"""

import json
from unittest import mock

from absl import flags
import jax
import jax.numpy as jnp

from experiments.bench_mamba import interleaved_medians
from moma import cli
from moma.layers import mamba, norms

SHAPES = flags.DEFINE_list("shapes", ["1x1024x1536", "8x1024x768", "16x256x96"], "B x L x D")
REPS = flags.DEFINE_integer("reps", 5, "interleaved timing rounds (median)")


def layer_grads(layer, x):
  """{name: (jitted grad of sum(layer(x)²) wrt (x, weights), args)} for the norm or the conv."""
  if layer == "rms_norm":
    module = norms.Norm(kind="rms")
    params = module.init(jax.random.key(1), x)
    loss = lambda x, p: jnp.sum(module.apply(p, x) ** 2)
  else:
    d = x.shape[-1]
    params = (jax.random.normal(jax.random.key(1), (4, d)), jnp.zeros((d,)))
    loss = lambda x, p: jnp.sum(mamba.causal_conv(jnp.zeros_like(x[:, :3]), x, *p)[0] ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1))), (x, params)


def main(_):
  rows = []
  for shape in SHAPES.value:
    x = jax.random.normal(jax.random.key(0), tuple(int(n) for n in shape.split("x")))
    for layer in ("rms_norm", "tied_conv"):
      calls = {"scale_features": layer_grads(layer, x)}
      plain = lambda x, w: x * w
      with mock.patch.object(norms, "scale_features", plain), mock.patch.object(mamba, "scale_features", plain):
        fn, args = layer_grads(layer, x)
        jax.block_until_ready(fn(*args))  # traced (and compiled) with the plain product
      calls["x * w"] = (fn, args)
      seconds = interleaved_medians(calls, REPS.value)
      row = dict(shape=shape, layer=layer, plain_ms=1e3 * seconds["x * w"],
                 scale_features_ms=1e3 * seconds["scale_features"],
                 speedup=seconds["x * w"] / seconds["scale_features"])
      rows.append(row)
      print(f"{layer:9s} {shape:13s} x * w {row['plain_ms']:8.2f} ms   scale_features "
            f"{row['scale_features_ms']:8.2f} ms   {row['speedup']:.1f}x", flush=True)
  print(json.dumps({"backend": jax.default_backend(), "rows": rows}))


if __name__ == "__main__":
  cli.run(main)
