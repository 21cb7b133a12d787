"""What a data-parallel train step communicates does not grow with the global batch, for every model.

Read off the optimized HLO of the compiled train step on an (8,) data mesh (`moma.sharding.collective_bytes`):
every sparse layer plans over each device's own tokens (`moma.sharding.on_shards`), so a step moves the
gradients (and a few scalars), as the dense model does, whatever the batch.
"""

import functools

import numpy as np
import pytest

from moma import sharding
from moma.models import decoder
from tests import sharding_model as lib
from tests.test_sharding_decoder import MODALITIES

TINY = dict(modalities=MODALITIES, vocab_size=32, d_model=16, num_layers=2, num_heads=4, d_ff=32)
MOE = dict(layout="3t3i2a", routing="ec", capacity_factor=1.0)
MODELS = {
    "dense": dict(),
    "mot": dict(untie=("qkv", "o", "ffn", "norm")),
    "moma": dict(ffn="moe", moe=MOE),
    "moe_topk": dict(ffn="moe", moe=dict(MOE, routing="topk", top_k=2)),
    "mod": dict(untie=("qkv", "o", "ffn", "norm"), mod=dict(enabled=True, capacity=0.5, every=2)),
    "mom": dict(block="mamba", d_ff=0, untie=("in_proj", "x_proj", "dt_proj", "out_proj")),
}


def make_batch(b, l=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, TINY["vocab_size"], (b, l + 1), dtype=np.int32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment": np.ones((b, l), np.int32),
          "position": np.arange(l, dtype=np.int32)[None].repeat(b, 0),
          "modality": rng.integers(0, len(MODALITIES), (b, l), dtype=np.int32),
          "loss_mask": np.ones((b, l), np.float32)}


@functools.cache
def step_collectives(kind, batch_size):
  model = decoder.as_model({**TINY, **MODELS[kind]})
  loss = lambda logits, batch: decoder.loss_fn(logits, batch, MODALITIES)[0]
  *_, step, _ = lib.setup(model, make_batch(batch_size), (8,), ("data",), loss=loss)
  return sharding.collective_bytes(step.as_text())


# The default suite keeps MoT (per-modality weights over each device's tokens, as MoM's untied projections
# and MoD's untied blocks are) and MoMa (expert choice within each device's rows); the rest run as `slow`.
@pytest.mark.parametrize("kind", [k if k in ("mot", "moma") else pytest.param(k, marks=pytest.mark.slow)
                                  for k in MODELS])
def test_collective_bytes_do_not_grow_with_the_global_batch(kind):
  small, large = step_collectives(kind, 16), step_collectives(kind, 64)
  assert small == large, f"{kind}: {small} at batch 16, {large} at batch 64"
  # Gradients of the sparse models cost what their parameters cost: nothing activation-sized is moved.
  assert small.get("all-gather", 0) == 0 and small.get("all-to-all", 0) == 0


def test_collective_bytes_reads_shapes_and_tuples():
  hlo = ("%a = f32[16,16]{1,0} all-reduce(%x), replica_groups={}\n"
         "%b = (f32[2,3]{1,0}, bf16[4]{0}) all-gather-start(%y, %z)\n"
         "%c = s32[8]{0} add(%p, %q)\n")
  assert sharding.collective_bytes(hlo) == {"all-reduce": 1024, "all-gather": 32}
