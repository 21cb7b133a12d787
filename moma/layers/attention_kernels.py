"""Accelerator attention kernels for packed causal documents (JAX's Pallas ops), same mask rule as xla.

* `pallas_gpu`: `jax.experimental.pallas.ops.gpu.attention.mha` (Triton flash attention with segment ids
  and a causal mask; Triton Pallas is deprecated from jax 0.11, where Mosaic GPU replaces it).
* `splash` (TPU): `splash_attention` with segment ids and a static causal mask (MaxText's kernel).

Neither expresses image blocks (bidirectional, data-dependent), so `image_block` is the caller's to refuse.
cuDNN through `jax.nn.dot_product_attention(implementation="cudnn")` is not offered: it takes sequence
lengths, not segment ids, so packed documents would need a dense [L, L] mask. Both kernels want whole
blocks: rows are padded with segment -1 (padding sees only padding), as in `blockwise_attention`.
GQA: key/value heads are repeated to the query heads (the kernels take one head count). On a mesh each
device runs the kernel on its own rows and heads (`per_device`): a Pallas kernel has no partitioning rule.
Inside `interpreted()` the kernels run in Pallas interpret mode on any backend (experiments/lower.py's
predicted collectives compile them so, on CPU devices, in place inside `per_device`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moma import sharding
from moma.kernels import layout


_INTERPRETED = contextvars.ContextVar("moma_attention_kernels_interpreted", default=False)


@contextlib.contextmanager
def interpreted():
  """Within it, the attention kernels are traced in interpret mode, whatever the backend."""
  token = _INTERPRETED.set(True)
  try:
    yield
  finally:
    _INTERPRETED.reset(token)


def interpreting() -> bool:
  return _INTERPRETED.get()


def per_device(kernel, q_BLHK, k_BLGK, v_BLGK, segment_BL, **kwargs) -> jax.Array:
  """kernel(q, k, v, segment) run by every device on its rows (batch mesh axes) and heads (the `heads`
  rule's axes), inside a shard_map over the whole mesh. GSPMD cannot split a Pallas call: it refuses a
  Mosaic one and would gather a Triton one's whole operands onto every device. An axis that does not divide
  the rows or the key/value heads stays whole (the kernel then sees all of them)."""
  mesh = jax.sharding.get_abstract_mesh()
  call = functools.partial(kernel, **kwargs)
  if mesh.empty or mesh.manual_axes:
    return call(q_BLHK, k_BLGK, v_BLGK, segment_BL)
  divides = lambda axes, n: axes if n % math.prod(mesh.shape[a] for a in axes) == 0 else ()
  rows = divides(sharding.batch_axes(), q_BLHK.shape[0]) or None
  heads = divides(sharding.mesh_axes("heads"), k_BLGK.shape[2]) or None
  spec = P(rows, None, heads, None)
  # check_vma off: the library kernels' own out_shapes do not state the varying mesh axes.
  return jax.shard_map(call, in_specs=(spec, spec, spec, P(rows, None)), out_specs=spec,
                       check_vma=False)(q_BLHK, k_BLGK, v_BLGK, segment_BL)


def _padded(q_BLHK, k_BLGK, v_BLGK, segment_BL, multiple):
  """Pad L to `multiple` (segment -1) and repeat kv heads to H; returns the inputs and a crop."""
  length, heads = q_BLHK.shape[1], q_BLHK.shape[2]
  pad = lambda x, fill: layout.pad_axis(x, 1, multiple, fill)
  rep = lambda x: jnp.repeat(x, heads // x.shape[2], axis=2)
  return (pad(q_BLHK, 0), pad(rep(k_BLGK), 0), pad(rep(v_BLGK), 0),
          pad(segment_BL.astype(jnp.int32), -1), lambda out: out[:, :length])


def pallas_gpu_attention(q_BLHK, k_BLGK, v_BLGK, segment_BL, *, interpret: bool = False) -> jax.Array:
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # GPU-only import cost

  block = min(128, -(-q_BLHK.shape[1] // 16) * 16)
  q, k, v, segment, crop = _padded(q_BLHK, k_BLGK, v_BLGK, segment_BL, block)
  sizes = gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=block, block_kv_dkv=block,
                                   block_q_dq=block, block_kv_dq=block)
  out = gpu_attention.mha(q, k, v, segment, sm_scale=q.shape[-1] ** -0.5, causal=True,
                          block_sizes=sizes, interpret=interpret)
  return crop(out)


def _splash_kernel(length: int, heads: int, block: int, interpret: bool):
  # Built afresh in each trace, not cached: a cached kernel holds the arrays of the trace that built it
  # (the abstract init's), which leak into the train step's trace as tracers.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  mask = masks.MultiHeadMask([masks.CausalMask((length, length))] * heads)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_q_dkv=block, block_kv_dkv=block,
                            block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret), splash


def splash_attention(q_BLHK, k_BLGK, v_BLGK, segment_BL, *, interpret: bool = False) -> jax.Array:
  q, k, v, segment, crop = _padded(q_BLHK, k_BLGK, v_BLGK, segment_BL, 128)
  length, heads, dim = q.shape[1:]
  block = next(b for b in (512, 256, 128) if length % b == 0)
  kernel, splash = _splash_kernel(length, heads, block, interpret)

  def one_row(q_LHK, k_LHK, v_LHK, segment_L):  # the kernel takes [H, L, K] and does not scale
    out_HLK = kernel((q_LHK * dim ** -0.5).swapaxes(0, 1), k_LHK.swapaxes(0, 1), v_LHK.swapaxes(0, 1),
                     segment_ids=splash.SegmentIds(segment_L, segment_L))
    return out_HLK.swapaxes(0, 1)

  return crop(jax.vmap(one_row)(q, k, v, segment))
