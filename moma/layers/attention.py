"""Multi-head attention with RoPE, GQA, optional QK-norm, and projections untied per modality (MoT).

Projections run on the rows of the modality plan (`moma.dispatch`); attention itself is one global
softmax over the whole packed sequence, whatever the modalities: MoT unties weights, never attention.

One mask rule (`blockwise_attention.allowed`: causal inside a document, both ways inside an image block,
nothing across documents) behind every `impl` (config.model.attention_impl) of `attend`:
  xla         `jax.nn.dot_product_attention` with a dense [B, 1, L, L] mask: the reference twin;
  blockwise   `moma.layers.blockwise_attention`: flash-style pure JAX, O(L) memory, skips masked blocks;
  pallas_gpu  Pallas Triton flash attention (GPU), splash: Pallas splash attention (TPU) — packed
              documents only, no image blocks (`moma.layers.attention_kernels`);
  auto        xla for rows of one block, else blockwise (`resolve_impl`).

Decoding (a mutable "cache" collection, `moma.models.generate`): the first call (prefill) attends as in
training and stores its rotated keys, values and segment ids in a `max_len` cache; each later call writes
its tokens after the cached ones and attends over the cache, causally and within its own segment.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from moma import dispatch
from moma.layers import attention_kernels as kernels
from moma.layers.blockwise_attention import allowed, blockwise_attention
from moma.layers.norms import Norm
from moma.layers.rope import apply_rope


IMPLS = ("auto", "xla", "blockwise", "pallas_gpu", "splash")
_KERNEL_BACKEND = {"pallas_gpu": "gpu", "splash": "tpu"}


def check_attention_config(impl: str, block: int, backend: str | None = None) -> None:
  """ValueError naming the config field for an unknown impl, a kernel the backend lacks (unless it is
  interpreted: `attention_kernels.interpreted`), a bad block."""
  if impl not in IMPLS:
    raise ValueError(f"config.model.attention_impl={impl!r}: expected one of {IMPLS}")
  backend = backend or jax.default_backend()
  if _KERNEL_BACKEND.get(impl, backend) != backend and not kernels.interpreting():
    raise ValueError(f"config.model.attention_impl={impl!r} needs a {_KERNEL_BACKEND[impl]} backend, this "
                     f"one is {backend}: use 'auto', 'blockwise' or 'xla'")
  if isinstance(block, bool) or not isinstance(block, int) or block <= 0 or block % 8:
    raise ValueError(f"config.model.attention_block={block!r}: must be a positive multiple of 8")


def resolve_impl(impl: str, length: int, block: int) -> str:
  """`auto`, on every backend: xla while the row fits in one block (nothing to skip, the mask is at most
  block²; measured 1.1× faster on CPU at L=128), else blockwise (measured 1.6× faster on CPU at L=256, 5-20×
  at 4096: BENCHMARKS.md). Blockwise is the one impl that takes image blocks and MoD's span, and the kernels
  are not timed on hardware yet (gmm's `auto` stays on xla too)."""
  if impl != "auto":
    return impl
  return "xla" if length <= block else "blockwise"


def attention_mask(segment_BL: jax.Array, image_block_BL: jax.Array | None = None) -> jax.Array:
  """Boolean [B, 1, L, L]: causal inside a packed document; bidirectional inside one image block.

  Padding (segment 0) attends causally to padding only, so no row of the softmax is empty.
  `image_block_BL` (Transfusion): positions with the same non-zero id see each other both ways.
  """
  idx = jnp.arange(segment_BL.shape[1])
  images = () if image_block_BL is None else (image_block_BL[:, :, None], image_block_BL[:, None, :])
  allowed_BLL = allowed(idx[:, None], idx[None, :], segment_BL[:, :, None], segment_BL[:, None, :], *images)
  return allowed_BLL[:, None]


def attend(q_BLHK, k_BLGK, v_BLGK, segment_BL, image_block_BL=None, *, impl: str = "auto",
           span: int | None = None, block: int = 128, interpret: bool = False) -> jax.Array:
  """Self-attention under the one mask rule with `impl` (module docstring); kv heads G divide H.

  span: no query sees a key `span` or more positions away (MoD's packed rows), so blockwise skips
  farther blocks. interpret: run a kernel impl in Pallas interpret mode (tests on CPU; also on inside
  `attention_kernels.interpreted()`).
  """
  interpret = interpret or kernels.interpreting()
  if not interpret:
    check_attention_config(impl, block)
  impl = resolve_impl(impl, q_BLHK.shape[1], block)
  if impl == "xla":
    mask = attention_mask(segment_BL, image_block_BL)
    return jax.nn.dot_product_attention(q_BLHK, k_BLGK, v_BLGK, mask=mask)
  if impl == "blockwise":
    return blockwise_attention(q_BLHK, k_BLGK, v_BLGK, segment_BL, image_block_BL, span=span, block=block)
  if image_block_BL is not None:
    raise ValueError(f"config.model.attention_impl={impl!r} cannot express image blocks (bidirectional "
                     "attention inside an image): use 'auto' or 'blockwise'")
  kernel = kernels.pallas_gpu_attention if impl == "pallas_gpu" else kernels.splash_attention
  return kernels.per_device(kernel, q_BLHK, k_BLGK, v_BLGK, segment_BL, interpret=interpret)


class Attention(nn.Module):
  """x_BLD → y_BLD. `untie` ⊆ {"qkv", "o", "qk_norm"} picks which weights are per modality."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  num_modalities: int = 1
  untie: Sequence[str] = ()
  qk_norm: bool = False
  rope_theta: float = 10_000.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  gmm_impl: str = "auto"
  max_len: int = 0  # decode cache length (config.model.max_seq_len)
  qk_norm_kind: str = "rms"  # "rms" (Qwen3) or "layer" (LayerNorm with bias over each head, Chameleon)
  norm_eps: float = 1e-6
  attention_impl: str = "auto"  # config.model.attention_impl: see `attend`
  attention_block: int = 128  # config.model.attention_block: blockwise's block length

  @nn.compact
  def __call__(self, x_BLD: jax.Array, plan: dispatch.Plan, *, modality: jax.Array,
               segment: jax.Array, position: jax.Array, image_block: jax.Array | None = None,
               attention_span: int | None = None) -> jax.Array:
    """attention_span: no query sees a key this far away or farther (see `attend`); None: unknown."""
    lead = x_BLD.shape[:-1]
    d_model = x_BLD.shape[-1]
    heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
    kernel = self._kernel

    # q and kv weights stay separate parameters but run as one grouped matmul: dispatch once, combine once.
    in_plan = plan.use_if("qkv" in self.untie)
    w_qkv = jnp.concatenate([
        kernel("q", d_model, (heads, head_dim), "embed", ("heads", "kv"), "qkv"),
        kernel("kv", d_model, (2, kv_heads, head_dim), "embed", (None, "heads", "kv"), "qkv")], -1)
    qkv_RF = dispatch.grouped_matmul(in_plan.dispatch(x_BLD), w_qkv, in_plan, impl=self.gmm_impl,
                                     dtype=self.dtype)
    qkv_BLF = in_plan.combine(qkv_RF, lead)
    q_BLHK = qkv_BLF[..., :heads * head_dim].reshape(*lead, heads, head_dim)
    kv_BL2GK = qkv_BLF[..., heads * head_dim:].reshape(*lead, 2, kv_heads, head_dim)
    k_BLGK, v_BLGK = kv_BL2GK[:, :, 0], kv_BL2GK[:, :, 1]
    if self.qk_norm:
      norm = lambda name: Norm(self.qk_norm_kind, self._groups("qk_norm"), self.norm_eps, feature_axis="kv",
                               dtype=self.dtype,
                               param_dtype=self.param_dtype, name=name)
      q_BLHK, k_BLGK = norm("q_norm")(q_BLHK, modality), norm("k_norm")(k_BLGK, modality)
    q_BLHK = apply_rope(q_BLHK, position, self.rope_theta)
    k_BLGK = apply_rope(k_BLGK, position, self.rope_theta)

    cached = (self._cached(k_BLGK, v_BLGK, segment, image_block)
              if self.is_mutable_collection("cache") and not self.is_initializing() else None)
    if cached is not None:  # a decode step: a few queries against the max_len cache slots
      k_BSGK, v_BSGK, mask_B1LS = cached
      out_BLHK = jax.nn.dot_product_attention(q_BLHK, k_BSGK, v_BSGK, mask=mask_B1LS)
    else:
      out_BLHK = attend(q_BLHK, k_BLGK, v_BLGK, segment, image_block, impl=self.attention_impl,
                        span=attention_span, block=self.attention_block)
    out_BLF = out_BLHK.reshape(*lead, self.num_heads * self.head_dim)

    out_plan = plan.use_if("o" in self.untie)
    w_o = kernel("o", heads * head_dim, d_model, "heads", ("embed",), "o")
    y_RD = dispatch.grouped_matmul(out_plan.dispatch(out_BLF), w_o, out_plan, impl=self.gmm_impl,
                                   dtype=self.dtype)
    return out_plan.combine(y_RD, lead)

  def _cached(self, k_BLGK, v_BLGK, segment_BL, image_block_BL=None):
    """Keeps the decode cache up to date (module docstring); returns (keys, values, mask=) to attend
    over at a decode step, None at prefill (the prompt attends to itself like a training forward)."""
    b, length = segment_BL.shape
    if not self.has_variable("cache", "length"):  # prefill: the prompt attends to itself
      if length > self.max_len:
        raise ValueError(f"decode: prompt length {length} exceeds max_len {self.max_len} "
                         "(config.model.max_seq_len)")
      pad = lambda x: jnp.pad(x, [(0, 0), (0, self.max_len - length)] + [(0, 0)] * (x.ndim - 2))
      for name, value in (("k_BSGK", k_BLGK), ("v_BSGK", v_BLGK), ("segment_BS", segment_BL)):
        self.put_variable("cache", name, pad(value))
      self.put_variable("cache", "length", jnp.int32(length))
      return None
    start = self.get_variable("cache", "length")
    cached = {}
    for name, value in (("k_BSGK", k_BLGK), ("v_BSGK", v_BLGK), ("segment_BS", segment_BL)):
      old = self.get_variable("cache", name)
      cached[name] = lax.dynamic_update_slice_in_dim(old, value.astype(old.dtype), start, axis=1)
      self.put_variable("cache", name, cached[name])
    self.put_variable("cache", "length", start + length)
    query_L = start + jnp.arange(length)
    images = ()
    if image_block_BL is not None:  # a fresh image block (Transfusion denoising) sees itself both ways
      key_image_BS = lax.dynamic_update_slice_in_dim(jnp.zeros_like(cached["segment_BS"]),
                                                     image_block_BL.astype(jnp.int32), start, axis=1)
      images = (image_block_BL[:, :, None], key_image_BS[:, None, :])
    mask_BLS = allowed(query_L[:, None], jnp.arange(self.max_len)[None, :], segment_BL[:, :, None],
                       cached["segment_BS"][:, None, :], *images)
    return cached["k_BSGK"], cached["v_BSGK"], mask_BLS[:, None]

  def _kernel(self, name, in_dim, features, in_axis, out_axes, component) -> jax.Array:
    """The weight `name` flattened for `grouped_matmul`: [in, out] tied, [G, in, out] untied."""
    groups = self._groups(component)
    w = dispatch.GroupedKernel(features, num_groups=groups, in_axis=in_axis, out_axes=out_axes,
                               param_dtype=self.param_dtype, name=name)(in_dim)
    return w.reshape(*w.shape[:w.ndim - (1 if isinstance(features, int) else len(features))], -1)

  def _groups(self, component: str) -> int:
    return self.num_modalities if component in self.untie else 1
