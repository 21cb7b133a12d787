"""Trainer step time and communication on device meshes: sparse models against dense, same global batch.

  python -m experiments.bench_sharding [--kinds=dense,mot,moma] [--steps=10] [--d_model=128 --batch=16
      --seq_len=64]

The state is created sharded and the step compiled exactly as `train.train_and_evaluate` does
(`steps.init_or_restore`, `loop.shard_batch`, one `jax.jit(...).lower().compile()` inside
`sharding.activate`, as `loop.StepCache` does). On CPU the
8 "devices" (XLA_FLAGS=--xla_force_host_platform_device_count=8) share the host cores, so the times measure
partitioning + collective overhead, not speed-up; the ratios that matter are each sparse model's step time
over the dense model's on the same mesh (goal ≤ 1.3×) and the bytes its collectives move per device
(`moma.sharding.collective_bytes` of the compiled step). Last stdout line: a JSON object.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import functools  # pylint: disable=g-import-not-at-top,wrong-import-position
import json

from absl import flags
import jax
import ml_collections
import numpy as np

from configs import dense, moma, mot
from experiments.bench_mamba import interleaved_medians
from moma import cli
from moma import loop, sharding, steps
from moma.models import decoder

KINDS = flags.DEFINE_list("kinds", ["dense", "mot", "moma"], "models to time: dense, mot, moma")
STEPS = flags.DEFINE_integer("steps", 10, "timed steps per model and mesh (after a warm-up step), taken "
                             "round-robin across the models; the median is reported")
D_MODEL = flags.DEFINE_integer("d_model", 128, "model width (d_ff = 4 d_model)")
BATCH = flags.DEFINE_integer("batch", 16, "global batch (rows)")
SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "row length")
MESHES = {"1": ((1,), ("data",), ()), "8": ((8,), ("data",), ()), "8fsdp": ((8,), ("fsdp",), ()),
          "2x2x2": ((2, 2, 2), ("data", "fsdp", "tensor"), ()),
          "2x4": ((2, 4), ("data", "expert"), (("modality", None),))}
MESH_NAMES = flags.DEFINE_list("meshes", list(MESHES), f"meshes to time, of {list(MESHES)}")


def bench_config(kind: str) -> ml_collections.ConfigDict:
  """The tiny preset at --d_model (MoMa: expert choice, 3t3i2a over text + image + audio)."""
  config = {"dense": dense, "mot": mot, "moma": moma}[kind].get_config(
      "size=tiny" + (",experts=3t3i2a" if kind == "moma" else ""))
  config.model.update(vocab_size=256, d_model=D_MODEL.value, d_ff=4 * D_MODEL.value,
                      max_seq_len=max(SEQ_LEN.value, config.model.max_seq_len))
  return config


def host_batch(modalities, b=16, l=64, vocab=256, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, l + 1), dtype=np.int32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment": np.ones((b, l), np.int32),
          "position": np.arange(l, dtype=np.int32)[None].repeat(b, 0),
          "modality": rng.integers(0, len(modalities), (b, l), dtype=np.int32),
          "loss_mask": np.ones((b, l), np.float32)}


def compile_step(config, shape, axes, rules):
  """(run one step, collective bytes per device) of the trainer step on a `shape` mesh."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.shape, config.mesh.axes, config.mesh.rules = shape, axes, rules
  mesh, rules = steps.make_mesh(config)
  model = steps.build_model(config)
  modalities = tuple(config.model.modalities)
  host = host_batch(modalities, b=BATCH.value, l=SEQ_LEN.value, vocab=config.model.vocab_size)
  batch = loop.shard_batch(host, mesh, rules)
  state, state_sh, _, _ = steps.init_or_restore(config, model, None, batch, mesh, rules)
  step_fn = functools.partial(steps.train_step, model=model, loss_fn=decoder.loss_fn,
                              modalities=modalities, seed=config.train.seed)
  with sharding.activate(mesh, rules):
    step = jax.jit(step_fn, out_shardings=(state_sh, None), donate_argnums=0).lower(state, batch).compile()
  holder = [state]

  def run_one():
    holder[0], out = step(holder[0], batch)
    return out

  return run_one, sum(sharding.collective_bytes(step.as_text()).values())


def main(_):
  times, comm = {}, {}
  for shape, axes, rules in (MESHES[m] for m in MESH_NAMES.value):
    name = "x".join(map(str, shape)) + ":" + ",".join(axes)
    runs = {}
    for kind in KINDS.value:
      runs[f"{kind}@{name}"], comm[f"{kind}@{name}"] = compile_step(bench_config(kind), shape, axes, rules)
    times.update(interleaved_medians({key: (run_one, ()) for key, run_one in runs.items()}, STEPS.value))
    for key in runs:
      print(f"{key.split('@')[0]:6s} {name:24s} {1e3 * times[key]:8.1f} ms/step "
            f"{comm[key] / 1e6:8.2f} MB collectives per device")
  ratios = {}
  for key, t in times.items():
    kind, name = key.split("@")
    if kind != "dense" and f"dense@{name}" in times:
      ratios[key] = t / times[f"dense@{name}"]
      print(f"{kind} / dense on {name:24s} {ratios[key]:6.2f}x step time")
  print(json.dumps({"backend": jax.default_backend(), "step_s": times, "collective_bytes": comm,
                    "ratio_vs_dense": ratios}))


if __name__ == "__main__":
  cli.run(main)
