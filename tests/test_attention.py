"""Every attention impl against the xla twin (outputs and gradients), block skipping, memory, bad config."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma import sharding
from moma.layers import attention
from moma.layers import attention_kernels
from moma.layers import blockwise_attention as bw
from moma.models import decoder


def _row(rng, length, max_doc, images, padding):
  """Documents of 1..max_doc tokens, maybe padding (segment 0) at the end, maybe an image inside each."""
  segment, image_block, doc, pos = np.zeros(length, np.int32), np.zeros(length, np.int32), 0, 0
  end = length - (int(rng.integers(1, length // 4 + 1)) if padding else 0)
  while pos < end:
    n = min(int(rng.integers(1, max_doc + 1)), end - pos)
    doc += 1
    segment[pos:pos + n] = doc
    if images and n > 4:
      image_block[pos + 1:pos + n - 1] = doc  # an image inside the document: keys after the query too
    pos += n
  return segment, image_block


def _inputs(seed, batch, length, heads, kv_heads, *, max_doc, images=False, padding=True, dim=8,
            dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  rows = [_row(rng, length, max_doc, images, padding) for _ in range(batch)]
  segment = jnp.asarray(np.stack([r[0] for r in rows]))
  image_block = jnp.asarray(np.stack([r[1] for r in rows])) if images else None
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, length, heads, dim), dtype)
  k, v = (jax.random.normal(key, (batch, length, kv_heads, dim), dtype) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
  return (q, k, v), segment, image_block, cotangent


def _value_and_grads(fn, qkv, cotangent):
  def run(qkv, cotangent):
    out, vjp = jax.vjp(fn, *qkv)
    return (out, *vjp(cotangent.astype(out.dtype)))
  return jax.jit(run)(qkv, cotangent)


def _xla(segment, image_block):
  return lambda q, k, v: attention.attend(q, k, v, segment, image_block, impl="xla")


CASES = {  # name: (_inputs args, block)
    "packed_padding_gqa": (dict(batch=2, length=45, heads=4, kv_heads=2, max_doc=12), 16),
    "image_blocks": (dict(batch=2, length=40, heads=2, kv_heads=1, max_doc=20, images=True), 8),
    "one_document_no_padding": (dict(batch=1, length=32, heads=2, kv_heads=2, max_doc=32, padding=False), 8),
    "one_token_rows": (dict(batch=3, length=1, heads=2, kv_heads=1, max_doc=1, padding=False), 8),
    "short_documents": (dict(batch=2, length=64, heads=2, kv_heads=2, max_doc=3), 8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_equals_xla_in_outputs_and_gradients(case):
  args, block = CASES[case]
  qkv, segment, image_block, cotangent = _inputs(len(case), **args)
  want = _value_and_grads(_xla(segment, image_block), qkv, cotangent)
  got = _value_and_grads(lambda q, k, v: bw.blockwise_attention(q, k, v, segment, image_block, block=block),
                         qkv, cotangent)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("images", [False, True])
def test_blockwise_with_a_span_equals_xla_on_packed_rows(images):
  """MoD's packed row: documents ≤ span tokens, so blocks farther than span are skipped unread. Padding
  queries break the promise (padding spreads over the row): their outputs are discarded, so not compared."""
  span = 12
  qkv, segment, image_block, cotangent = _inputs(7, 1, 70, 4, 2, max_doc=span, images=images)
  cotangent = cotangent * (segment != 0)[..., None, None]
  want = _value_and_grads(_xla(segment, image_block), qkv, cotangent)
  fn = lambda q, k, v: bw.blockwise_attention(q, k, v, segment, image_block, span=span, block=8)
  got = _value_and_grads(fn, qkv, cotangent)
  real = np.asarray(segment[0]) != 0
  np.testing.assert_allclose(got[0][:, real], want[0][:, real], rtol=1e-5, atol=1e-5)
  for g, w in zip(got[1:], want[1:]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_blockwise_bfloat16_keeps_float32_statistics():
  """bf16 inputs: blockwise is as close to the float32 result as xla's bf16 path is (statistics in fp32)."""
  qkv, segment, image_block, cotangent = _inputs(3, 2, 96, 4, 2, max_doc=40, images=True)
  exact = _value_and_grads(_xla(segment, image_block), qkv, cotangent)
  half = [x.astype(jnp.bfloat16) for x in qkv]
  xla = _value_and_grads(_xla(segment, image_block), half, cotangent)
  got = _value_and_grads(lambda q, k, v: bw.blockwise_attention(q, k, v, segment, image_block, block=16),
                         half, cotangent)
  for g, x, e in zip(got, xla, exact):
    assert g.dtype == jnp.bfloat16
    err = lambda a: float(jnp.max(jnp.abs(a.astype(jnp.float32) - e)))
    assert err(g) <= 2 * err(x) + 1e-3, (err(g), err(x))


def test_blocks_wholly_masked_are_not_visited():
  """Key blocks visited per query block (8 blocks of 8 positions)."""
  block, one_doc = 8, jnp.ones((1, 64), jnp.int32)
  visits = lambda segment, image=None, span=None: np.asarray(
      bw._visits(segment, image, bw._Static(block, span, image is not None))[1])
  np.testing.assert_array_equal(visits(one_doc), np.arange(1, 9))  # the diagonal and below
  four_docs = jnp.repeat(jnp.arange(1, 5), 2 * block)[None]  # documents of two blocks each
  np.testing.assert_array_equal(visits(four_docs), [1, 2] * 4)
  np.testing.assert_array_equal(visits(one_doc, span=2 * block), [1, 2, 3, 3, 3, 3, 3, 3])  # 2 back at most
  image = jnp.zeros((1, 64), jnp.int32).at[0, 4:20].set(1)  # blocks 0-2 see each other both ways
  np.testing.assert_array_equal(visits(one_doc, image), [3, 3, 3, 4, 5, 6, 7, 8])


def test_blockwise_train_step_memory_is_linear_in_length():
  """No [L, L] array: the compiled gradient's temp memory is a fraction of xla's and grows ~linearly."""
  def temp_bytes(impl, length):
    x = jnp.zeros((1, length, 2, 16))
    segment = jnp.ones((1, length), jnp.int32)
    loss = lambda q, k, v: jnp.sum(attention.attend(q, k, v, segment, impl=impl, block=64) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  blockwise = [temp_bytes("blockwise", n) for n in (512, 1024)]
  assert blockwise[1] < temp_bytes("xla", 1024) / 4
  assert blockwise[1] < 2.3 * blockwise[0]


def test_blockwise_partitions_over_batch_and_heads_without_gathering():
  """On a (data, tensor) mesh GSPMD keeps blockwise sharded: no all-gather; only the visit lists are reduced."""
  mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  qkv, segment, _, _ = _inputs(13, 4, 64, 2, 2, max_doc=24)
  spec = jax.sharding.PartitionSpec("data", None, "tensor", None)
  qkv = [jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)) for x in qkv]
  loss = lambda q, k, v, segment: jnp.sum(bw.blockwise_attention(q, k, v, segment, block=16) ** 2)
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  assert "all-gather" not in step.lower(*qkv, segment).compile().as_text()
  want = jax.value_and_grad(lambda *qkv: jnp.sum(_xla(segment, None)(*qkv) ** 2), argnums=(0, 1, 2))(*qkv)
  for g, w in zip(jax.tree.leaves(step(*qkv, segment)), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


KERNEL_CASE = dict(batch=2, length=40, heads=4, kv_heads=2, max_doc=16)


@pytest.mark.parametrize("impl,asked", [("pallas_gpu", "flag"), ("splash", "flag"), ("splash", "context")])
def test_kernels_equal_xla_in_interpret_mode(impl, asked):
  """The accelerator kernels, run by the Pallas interpreter on CPU (not timed: no GPU/TPU here), asked for
  by `interpret=True` or by `attention_kernels.interpreted()` (how experiments.lower compiles them)."""
  qkv, segment, _, cotangent = _inputs(11, **KERNEL_CASE)
  want = _value_and_grads(_xla(segment, None), qkv, cotangent)
  flag = asked == "flag"
  with contextlib.nullcontext() if flag else attention_kernels.interpreted():
    got = _value_and_grads(lambda q, k, v: attention.attend(q, k, v, segment, impl=impl, interpret=flag),
                           qkv, cotangent)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", [pytest.param("pallas_gpu", marks=pytest.mark.slow), "splash"])  # 12-28 s
def test_kernels_run_per_device_on_a_data_tensor_mesh(impl):
  """On a mesh each device runs the kernel on its rows and heads (GSPMD cannot split a Pallas call): the
  same values and gradients as XLA on one device, and no operand gathered."""
  mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:4])
  qkv, segment, _, cotangent = _inputs(11, **KERNEL_CASE)
  want = _value_and_grads(_xla(segment, None), qkv, cotangent)
  with sharding.activate(mesh, sharding.default_rules(mesh.axis_names)):
    fn = lambda q, k, v: attention.attend(q, k, v, segment, impl=impl, interpret=True)
    step = jax.jit(lambda *qkv: _value_and_grads(fn, qkv, cotangent))
    assert "all-gather" not in step.lower(*qkv).compile().as_text()
    got = step(*qkv)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_kernels_refuse_image_blocks():
  qkv, segment, image_block, _ = _inputs(5, 1, 16, 2, 2, max_doc=16, images=True)
  with pytest.raises(ValueError, match="model.attention_impl='splash' cannot express image blocks"):
    attention.attend(*qkv, segment, image_block, impl="splash", interpret=True)


def test_auto_is_xla_for_one_block_and_blockwise_beyond():
  assert attention.resolve_impl("auto", 128, 128) == "xla"
  assert attention.resolve_impl("auto", 129, 128) == "blockwise"
  assert attention.resolve_impl("splash", 4096, 128) == "splash"


def test_decoding_after_a_blockwise_prefill_equals_the_full_forward():
  """Prefill attends blockwise (10 tokens, blocks of 8), decode steps over the cache; both documents."""
  from tests.test_decode import MOT
  from tests.test_decoder import make_batch
  from tests.test_mamba_decoder import Compiled, decode_in_steps
  m = Compiled(**MOT, attention_impl="blockwise", attention_block=8)
  batch = make_batch(seed=1, l=12)
  decoded, _ = decode_in_steps(m, batch, 10)
  xla = m.model.clone(config=dataclasses.replace(m.model.config, attention_impl="xla"))
  full = jax.jit(xla.apply)(m.variables, batch)
  np.testing.assert_allclose(decoded, full, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("field,value,message", [
    ("attention_impl", "flash", r"config.model.attention_impl='flash': expected one of"),
    ("attention_impl", "splash", r"config.model.attention_impl='splash' needs a tpu backend"),
    ("attention_impl", "pallas_gpu", r"config.model.attention_impl='pallas_gpu' needs a gpu backend"),
    ("attention_block", 12, r"config.model.attention_block=12: must be a positive multiple of 8"),
    ("attention_block", 0, r"config.model.attention_block=0"),
])
def test_bad_attention_config_names_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    decoder.as_model(dict(vocab_size=16, **{field: value}))


def test_interpreted_kernels_pass_the_backend_check():
  with attention_kernels.interpreted():
    decoder.as_model(dict(vocab_size=16, attention_impl="splash"))
  with pytest.raises(ValueError, match="needs a tpu backend"):
    decoder.as_model(dict(vocab_size=16, attention_impl="splash"))
