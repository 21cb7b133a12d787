"""Every family's train and eval steps lower for TPU and GPU on CPU (`experiments.lower`, issue 32).

The accelerator kernels are selected and must appear as the platform's custom calls, so a path that falls
back to XLA fails here, as does a Pallas TPU block shape Mosaic refuses. `WORKING` selects every kernel
(TPU: the pallas_tpu gmm and splash attention; cuda: the pallas_gpu gmm and flash attention).
"""

import functools

from absl import flags
import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import pytest

from configs import common, dense, mamba, moma, mom, mot, transfusion
from experiments import lower
from moma import kernels
from moma.models import model_config

TINY = dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, vocab_size=0)
TARGET = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
WORKING = {"tpu": dict(gmm_impl="pallas_tpu", attention_impl="splash"),
           "cuda": dict(gmm_impl="pallas_gpu", attention_impl="pallas_gpu")}


def _mod():
  config = common.base_config("tiny", ("text", "image"))
  config.model.mod = dict(model_config.defaults(model_config.ModConfig), enabled=True)
  return config


# family → (config, uses gmm, takes an attention kernel); Transfusion's image blocks take blockwise only.
FAMILIES = {
    "dense": (lambda: dense.get_config("size=tiny"), False, True),
    "mot": (lambda: mot.get_config("size=tiny,modalities=text+image"), True, True),
    # Expert choice: static equal groups take batched matmuls, never gmm (docs/design.md, dispatch).
    "moma_ec": (lambda: moma.get_config("size=tiny,experts=2t2i"), False, True),
    "moe_topk": (lambda: moma.get_config("size=tiny,experts=4shared,routing=topk"), True, True),
    "mod": (_mod, False, True),
    "mamba": (lambda: mamba.get_config("size=tiny,modalities=text+image"), False, False),
    "mom": (lambda: mom.get_config("size=tiny,modalities=text+image"), True, False),
    "transfusion_mot": (lambda: transfusion.get_config("arch=mot"), True, False),
}


def family_config(family, platform, batch_size=2, mesh="", **impls):
  make, _, attends = FAMILIES[family]
  config = make()
  config.model.update(TINY, **(impls or WORKING[platform]))
  if not attends and not impls:  # no attention kernel on this family's path
    config.model.attention_impl = "blockwise"
  if config.model.block == "mamba":
    config.model.mamba.scan_impl = "chunked"
  config.train.batch_size = batch_size  # rows of the tiny preset's 256 tokens (its longest document)
  return lower.with_mesh(config, mesh)


def expected_targets(family, platform, gmm_impl, attention_impl):
  """Kernel custom calls the train step must hold (the attention kernel also shows in eval)."""
  _, uses_gmm, attends = FAMILIES[family]
  wanted = set()
  if uses_gmm and gmm_impl.startswith("pallas"):
    wanted.add(TARGET[platform])
  if attends and attention_impl in ("splash", "pallas_gpu"):
    wanted.add(TARGET[platform])
  return wanted


def assert_kernels(report, family, platform, **impls):
  impls = impls or WORKING[platform]
  for target in expected_targets(family, platform, **impls):
    assert report["custom_calls"]["train"].get(target, 0) > 0, (
        f"{family} on {platform} with {impls}: no {target} in the train step: a kernel fell back to XLA "
        f"({report['custom_calls']})")


@functools.cache
def lowered(family, platform, predict=False, **kw):
  return lower.lower(family_config(family, platform, **kw), platform, predict=predict)


DEFAULT = {("mot", "tpu"), ("moma_ec", "cuda"), ("dense", "cuda")}


@pytest.mark.parametrize("family,platform", [
    (f, p) if (f, p) in DEFAULT else pytest.param(f, p, marks=pytest.mark.slow)
    for f in FAMILIES for p in ("tpu", "cuda")])
def test_family_lowers_with_its_kernels(family, platform):
  report = lowered(family, platform)
  assert report["platform"] == platform
  assert_kernels(report, family, platform)
  assert report["parameters_bytes_per_device"] > 0


def test_the_kernel_assertion_fails_when_gmm_falls_back_to_xla():
  report = lowered("mot", "tpu", gmm_impl="xla", attention_impl="blockwise")
  assert "tpu_custom_call" not in report["custom_calls"]["train"]
  with pytest.raises(AssertionError, match="fell back to XLA"):
    assert_kernels(report, "mot", "tpu", gmm_impl="pallas_tpu", attention_impl="blockwise")


@pytest.mark.parametrize("family,platform,impls", [
    # Splash once leaked a tracer from a cached kernel built in the abstract init's trace.
    ("dense", "tpu", dict(gmm_impl="xla", attention_impl="splash")),
    # pallas_gpu once lowered through Mosaic GPU (no compiler_params), whose shared memory overflowed.
    ("mot", "cuda", dict(gmm_impl="pallas_gpu", attention_impl="blockwise")),
])
def test_splash_and_pallas_gpu_gmm_lower_in_the_train_step(family, platform, impls):
  assert_kernels(lowered(family, platform, **impls), family, platform, **impls)


@functools.cache
def predicted(family, platform, mesh, batch_size):
  report = lowered(family, platform, predict=True, batch_size=batch_size, mesh=mesh)
  assert_kernels(report, family, platform)
  return report["collectives"]["predicted_per_device"]


# Every kernel on a batch-split mesh: each runs per device inside a shard_map (Mosaic refuses partitioning;
# GSPMD would gather a Triton call's whole operands). data/expert keeps the 2 modality groups whole.
BATCH_MESHES = {"4,2:data,fsdp": (), "2,4:data,expert": (("modality", None),)}


@pytest.mark.parametrize("platform", ["tpu", pytest.param("cuda", marks=pytest.mark.slow)])
@pytest.mark.parametrize("mesh", BATCH_MESHES)
def test_mot_with_every_kernel_lowers_on_batch_meshes(mesh, platform):
  config = family_config("mot", platform, batch_size=8, mesh=mesh)
  config.mesh.rules = BATCH_MESHES[mesh]
  assert_kernels(lower.lower(config, platform, predict=False), "mot", platform)


def test_data_expert_mesh_collectives_do_not_grow_with_the_global_batch():
  small, large = (predicted("dense", "cuda", "2,4:data,expert", b) for b in (8, 16))
  assert small == large, f"(2, 4) data/expert: {small} at 8 rows, {large} at 16"


@pytest.mark.slow  # 40 s; the data/expert twin above runs by default
def test_data_tensor_mesh_collectives_grow_only_with_the_tokens_a_device_holds():
  # Tensor parallelism moves activations, so its collectives follow each device's tokens (2x here); the
  # data axis adds only gradients, which do not grow.
  small, large = (predicted("dense", "tpu", "4,2:data,tensor", b) for b in (8, 16))
  assert small.keys() == large.keys() and all(large[k] <= 2 * small[k] for k in small), (small, large)


def test_a_pallas_gmm_on_a_tensor_axis_is_refused_by_name():
  # Tensor parallelism of grouped matmuls is the XLA impls' (docs/accelerators.md).
  with pytest.raises(ValueError, match=r"mesh axes \['tensor'\].*config\.model\.gmm_impl='xla'"):
    lowered("mot", "tpu", batch_size=8, mesh="4,2:data,tensor")


# Odd, tiny and S-sized FFN shapes (rows, d_model, d_ff, groups): Mosaic's block-shape rule (last two block
# dims multiples of (8, 128) or whole) runs in the TPU export, so a tile the hardware refuses fails here.
@pytest.mark.parametrize("m,k,n,g", [(64, 32, 48, 2), (100, 96, 200, 3), (24, 16, 8, 4), (256, 768, 3072, 2)])
def test_pallas_tpu_gmm_block_shapes_lower_for_tpu(m, k, n, g):
  loss = lambda x, w, sizes: jnp.sum(kernels.gmm(x, w, sizes, impl="pallas_tpu"))
  args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((g, k, n), jnp.bfloat16),
          jax.ShapeDtypeStruct((g,), jnp.int32))
  with lower.target_backend("tpu"):
    text = jax.export.export(jax.jit(jax.grad(loss, (0, 1))), platforms=("tpu",))(*args).mlir_module()
  assert lower.custom_calls(text) == {"tpu_custom_call": 2}  # d lhs (gmm) and d rhs (tgmm)


def test_tokamax_gmm_lowers_for_cuda():
  """gmm_impl=tokamax (the optional extra) reaches Triton. Its Mosaic TPU kernel cannot be lowered on CPU
  at all ("Unsupported TPU device kind: cpu"), nor its Mosaic GPU one, so only the cuda Triton path is here."""
  tokamax = pytest.importorskip("tokamax")
  if not flags.FLAGS.is_parsed():  # tokamax reads absl flags; under pytest they would parse pytest's argv
    flags.FLAGS.mark_as_parsed()
  config = family_config("mot", "cuda", gmm_impl="tokamax", attention_impl="blockwise")
  with tokamax.config.cross_compile(True):  # its kernels check the live device unless cross-compiling
    report = lower.lower(config, "cuda", predict=False)
  assert report["custom_calls"]["train"].get(TARGET["cuda"], 0) > 0, report["custom_calls"]


def _double(x_ref, o_ref):
  o_ref[...] = x_ref[...] * 2


def test_the_tpu_export_refuses_a_block_the_hardware_refuses():
  spec = pl.BlockSpec((8, 64), lambda i, j: (i, j))  # 64 columns: not a multiple of 128
  call = pl.pallas_call(_double, grid=(2, 4), in_specs=[spec], out_specs=spec,
                        out_shape=jax.ShapeDtypeStruct((16, 256), jnp.float32))
  with pytest.raises(Exception, match="divisible by 8 and 128"):
    jax.export.export(jax.jit(call), platforms=("tpu",))(jax.ShapeDtypeStruct((16, 256), jnp.float32))


def test_a_failed_lowering_names_the_field():
  config = family_config("transfusion_mot", "tpu", gmm_impl="xla", attention_impl="splash")
  with pytest.raises(ValueError, match=r"attention kernel.*image blocks.*config\.model\.attention_impl"):
    lower.lower(config, "tpu", predict=False)


def test_parse_mesh():
  assert lower.parse_mesh("4,2:data,tensor") == ((4, 2), ("data", "tensor"))
  with pytest.raises(ValueError, match="--mesh"):
    lower.parse_mesh("4,2:data")
