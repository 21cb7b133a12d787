"""Lower the trainer's train and eval steps for TPU or GPU on a CPU-only machine (`jax.export`).

  python -m experiments.lower --platform=tpu|cuda --config=configs/mot.py:size=S \
      [--config.model.gmm_impl=pallas_tpu ...] [--mesh=4,2:data,tensor]

The steps are built as the trainer builds them (`train.resolve_config`, `steps.build_model`,
`steps.abstract_state` with its shardings, the first batch's shapes from `train.host_batches`, one
`jax.jit(..., out_shardings=(state shardings, None), donate_argnums=0)` inside `sharding.activate`, as
`loop.StepCache` does) and exported for `--platform`: a `pallas_call` becomes the platform's kernel custom
call (`tpu_custom_call` for Mosaic TPU, `__gpu$xla.gpu.triton` for Triton, `mosaic_gpu...` for Mosaic GPU).
The model's backend-dependent choices (a kernel's backend check, scan and expert-parallel `auto`) see the
target platform while tracing.

`--mesh=SHAPE:AXES` lays the mesh over that many CPU devices (this module sets
`--xla_force_host_platform_device_count` before JAX starts). GSPMD's collectives exist only after
compilation, which needs the platform, so `collectives.predicted_per_device` comes from compiling the same
train step on those CPU devices: the attention kernels in place inside their per-device shard_map, in
interpret mode (`attention_kernels.interpreted`), and the gmm kernels swapped for the XLA gmm, which runs in the
same shard_map (`CPU_TWINS`): a prediction.
`collectives.explicit_in_lowering` counts the shard_map collectives (all_to_all, psum, ...) the exported
module itself holds. Last stdout line: one JSON object. A step that does not lower is one line naming the
kernel or op and the config field to change (exit 1).
"""

import math
import os
import re
import sys


def _device_count(argv) -> int:
  """Devices --mesh asks for (1 without it); read before JAX is imported."""
  for arg, after in zip(argv, list(argv[1:]) + [""]):
    value = arg[len("--mesh="):] if arg.startswith("--mesh=") else after if arg == "--mesh" else None
    if value is not None:
      try:
        return max(1, math.prod(int(s) for s in value.split(":", 1)[0].split(",")))
      except ValueError:
        return 1  # parse_mesh reports it
  return 1


if __name__ == "__main__" and "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={_device_count(sys.argv)}"])

import collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import contextlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import functools  # pylint: disable=g-import-not-at-top,wrong-import-position
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import traceback  # pylint: disable=g-import-not-at-top,wrong-import-position
from unittest import mock  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from moma import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from moma import faults  # pylint: disable=g-import-not-at-top,wrong-import-position
from moma import loop  # pylint: disable=g-import-not-at-top,wrong-import-position
from moma import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from moma import steps  # pylint: disable=g-import-not-at-top,wrong-import-position
from moma import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from moma.layers import attention_kernels  # pylint: disable=g-import-not-at-top,wrong-import-position

PLATFORMS = {"tpu": "tpu", "cuda": "gpu"}  # jax.export platform → the backend name the model checks
# The gmm kernels' CPU stand-in for the predicted collectives: a gmm runs per device inside the dispatch's
# shard_map whatever its impl, so the XLA one partitions alike (tokamax has no interpret mode, and the TPU
# kernel's interpret mode fails on its varying scalar prefetch inside shard_map, jax 0.10). The attention
# kernels stay, interpreted inside their own per-device shard_map, whose reshards the prediction then holds.
CPU_TWINS = {"gmm_impl": {"pallas_tpu": "xla", "pallas_gpu": "xla", "tokamax": "xla"}}
# Where a failing frame lives → the config field that picks that code.
FIELDS = (("moma/kernels/", "gmm kernel", "config.model.gmm_impl"),
          ("moma/layers/attention", "attention kernel", "config.model.attention_impl"),
          ("moma/layers/selective_scan", "selective scan", "config.model.mamba.scan_impl"),
          ("moma/expert_parallel", "expert-parallel exchange", "config.mesh.axes"))
# XLA CPU's all-reduce promotion aborts the process on some bf16 all-reduces of a tensor-parallel step
# (jax 0.10.2, "Invalid binary instruction opcode copy" in CloneAllReduce); TPUs reduce bf16 as it is.
CPU_COMPILE_OPTIONS = {"xla_disable_hlo_passes": "all-reduce-promotion"}
# Kernel targets without JAX's serialization guarantee: nothing is serialized here, so export may hold them.
UNSTABLE_KERNEL_TARGETS = ("__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2")
_CUSTOM_CALL = re.compile(r'stablehlo\.custom_call @"?([\w$.]+)')
_EXPLICIT = re.compile(
    r'"?stablehlo\.(all_to_all|all_reduce|all_gather|reduce_scatter|collective_permute)"?\(')



def parse_mesh(value: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """'4,2:data,tensor' → ((4, 2), ('data', 'tensor'))."""
  shape, _, axes = value.partition(":")
  try:
    sizes = tuple(int(s) for s in shape.split(","))
  except ValueError:
    sizes = ()
  names = tuple(a for a in axes.split(",") if a)
  if not sizes or len(sizes) != len(names) or min(sizes) < 1:
    raise ValueError(f"--mesh={value!r}: write sizes and axis names, e.g. --mesh=4,2:data,tensor")
  return sizes, names


@contextlib.contextmanager
def target_backend(platform: str):
  """`jax.default_backend()` reads the target platform's backend while the model is built and traced."""
  with mock.patch.object(jax, "default_backend", lambda: PLATFORMS[platform]):
    yield


def custom_calls(mlir_text: str) -> dict[str, int]:
  """Custom-call target → count in a lowered module's MLIR text."""
  return dict(collections.Counter(_CUSTOM_CALL.findall(mlir_text)))


def explicit_collectives(mlir_text: str) -> dict[str, int]:
  """shard_map collective kind → count in a lowered module (ragged all-to-all is a custom call)."""
  found = collections.Counter(_EXPLICIT.findall(mlir_text))
  ragged = custom_calls(mlir_text).get("ragged_all_to_all", 0)
  return dict(found, **({"ragged_all_to_all": ragged} if ragged else {}))


def with_mesh(config: ml_collections.ConfigDict, mesh: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  if mesh:
    config.mesh.shape, config.mesh.axes = parse_mesh(mesh)
  return config


class Steps:
  """The train and eval steps of a resolved `config`, jitted as the trainer jits them, with abstract
  arguments (sharded state, the first batch's shapes on the batch sharding)."""

  def __init__(self, config: ml_collections.ConfigDict):
    tcfg = config.train
    module, model = steps.model_module(config), steps.build_model(config)
    self.mesh, self.rules = steps.make_mesh(config)
    with faults.damaged_data_cache(config.data.cache_dir):
      first_host = train.host_batches(config, "train")(0)
    first = loop.shard_batch(first_host, self.mesh, self.rules)  # the trainer's checks (batch divides)
    self.batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), first)
    self.state = steps.abstract_state(config, model, self.batch, self.mesh, self.rules)
    statics = dict(model=model, loss_fn=module.loss_fn, modalities=tuple(config.model.modalities))
    train_fn = functools.partial(steps.train_step, seed=tcfg.seed, stage=tcfg.stage,
                                 skip_nonfinite=tcfg.nan_policy == "skip", **statics)
    state_sh = jax.tree.map(lambda a: a.sharding, self.state)
    self.train = jax.jit(train_fn, out_shardings=(state_sh, None), donate_argnums=0)
    self.eval = jax.jit(functools.partial(steps.eval_step, **statics))

  def export(self, platform: str) -> dict[str, str]:
    """{"train": MLIR text, "eval": MLIR text} of both steps exported for `platform`."""
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in UNSTABLE_KERNEL_TARGETS]
    export = lambda fn, *args: jax.export.export(fn, platforms=(platform,), disabled_checks=checks)(
        *args).mlir_module()
    with sharding.activate(self.mesh, self.rules):
      return {"train": export(self.train, self.state, self.batch),
              "eval": export(self.eval, self.state.params, self.batch)}

  def compiled_collectives(self) -> dict[str, int]:
    """Collective kind → bytes per device of the train step compiled on this (CPU) backend."""
    with sharding.activate(self.mesh, self.rules):
      compiled = self.train.lower(self.state, self.batch).compile(compiler_options=CPU_COMPILE_OPTIONS)
    return sharding.collective_bytes(compiled.as_text())


def parameters_bytes_per_device(params) -> int:
  return sum(math.prod(p.sharding.shard_shape(p.shape)) * p.dtype.itemsize for p in jax.tree.leaves(params))


def cpu_twin(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, dict[str, str]]:
  """`config` with the gmm kernels replaced by their CPU twins (`CPU_TWINS`), and what was replaced."""
  config = ml_collections.ConfigDict(config.to_dict())
  swapped = {}
  for field, twins in CPU_TWINS.items():
    if config.model.get(field) in twins:
      swapped[field] = f"{config.model[field]}→{twins[config.model[field]]}"
      config.model[field] = twins[config.model[field]]
  return config, swapped


def failure(error: BaseException, platform: str) -> ValueError:
  """A lowering error as one line naming the kernel or op (from the deepest moma frame) and its field."""
  frames = [f.filename for f in traceback.extract_tb(error.__traceback__)]
  frames += [f.filename for e in (error.__cause__, error.__context__) if e for f in
             traceback.extract_tb(e.__traceback__)]
  message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  for path, what, field in FIELDS:
    if any(path in f for f in frames):
      return ValueError(f"lowering for {platform} failed in the {what}: {message}; change {field} "
                        "(or the shapes it is given)")
  return ValueError(f"lowering for {platform} failed: {message}")


def lower(config: ml_collections.ConfigDict, platform: str, *, predict: bool = True) -> dict:
  """The JSON report of `config`'s steps lowered for `platform` (module docstring)."""
  if platform not in PLATFORMS:
    raise ValueError(f"--platform={platform!r}: choose one of {list(PLATFORMS)}")
  with target_backend(platform):
    config = train.resolve_config(config)
    try:
      built = Steps(config)
      modules = built.export(platform)
    except Exception as e:  # pylint: disable=broad-except (re-raised as one line naming the field)
      raise failure(e, platform) from e
  report = {"platform": platform, "mesh": dict(built.mesh.shape),
            "custom_calls": {name: custom_calls(text) for name, text in modules.items()},
            "collectives": {"explicit_in_lowering": explicit_collectives(modules["train"])},
            "parameters_bytes_per_device": parameters_bytes_per_device(built.state.params)}
  if predict:
    twin, swapped = cpu_twin(config)
    with attention_kernels.interpreted():
      report["collectives"]["predicted_per_device"] = Steps(twin).compiled_collectives()
    report["collectives"]["prediction"] = (f"GSPMD collectives of the train step compiled on "
                                           f"{built.mesh.size} CPU devices, attention kernels interpreted in place"
                                           + (f", {swapped}" if swapped else ""))
  return report


def define_flags():
  """The program's flags, defined when it runs (not on import: tests import this module beside other
  programs whose absl flags, e.g. a required --config, share the one global flag registry)."""
  config = config_flags.DEFINE_config_file("config", None, "config file with its argument, e.g. "
                                           "configs/mot.py:size=S", lock_config=True)
  platform = flags.DEFINE_enum("platform", None, list(PLATFORMS), "platform to lower for")
  mesh = flags.DEFINE_string("mesh", "", "SHAPE:AXES over as many (CPU) devices, e.g. 4,2:data,tensor; "
                             "default: the config's mesh.shape / mesh.axes")
  flags.mark_flags_as_required(["config", "platform"])
  return lambda _: print(json.dumps(lower(with_mesh(config.value, mesh.value), platform.value)))


if __name__ == "__main__":
  cli.run(define_flags())
