"""Multi-head attention with RoPE, GQA, optional QK-norm, and projections untied per modality (MoT).

Projections run on rows sorted by the modality plan (`moma.dispatch`); attention itself is one global
softmax over the whole packed sequence, whatever the modalities: MoT unties weights, never attention.

Decoding (a mutable "cache" collection, `moma.models.generate`): the first call (prefill) attends as in
training and stores its rotated keys, values and segment ids in a `max_len` cache; each later call writes
its tokens after the cached ones and attends over the cache, causally and within its own segment.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from moma import dispatch
from moma.layers.norms import Norm
from moma.layers.rope import apply_rope


def _allowed(query_pos, key_pos, query_segment, key_segment, query_image=None, key_image=None):
  """Broadcast [..., queries, keys] mask: causal inside a document, both ways inside one image block."""
  allowed = key_pos <= query_pos
  if query_image is not None:
    allowed = allowed | ((query_image == key_image) & (query_image > 0))
  return allowed & (query_segment == key_segment)


def attention_mask(segment_BL: jax.Array, image_block_BL: jax.Array | None = None) -> jax.Array:
  """Boolean [B, 1, L, L]: causal inside a packed document; bidirectional inside one image block.

  Padding (segment 0) attends causally to padding only, so no row of the softmax is empty.
  `image_block_BL` (Transfusion): positions with the same non-zero id see each other both ways.
  """
  idx = jnp.arange(segment_BL.shape[1])
  images = () if image_block_BL is None else (image_block_BL[:, :, None], image_block_BL[:, None, :])
  allowed_BLL = _allowed(idx[:, None], idx[None, :], segment_BL[:, :, None], segment_BL[:, None, :], *images)
  return allowed_BLL[:, None]


def banded_attention(q_BLHK, k_BLHK, v_BLHK, segment_BL, image_block_BL=None, *, span: int,
                     chunk: int = 128) -> jax.Array:
  """`dot_product_attention` with the `attention_mask(segment, image_block)` mask, for sequences where no
  query sees a key more than `span` positions away (a packed row of documents each ≤ span long).

  Queries go in chunks of `chunk`; each chunk attends to the keys of the chunks within `span` of it, so the
  cost is L·(span + chunk) instead of L². Mixture-of-Depths packs the batch's selected tokens into one row
  of c·B·L tokens whose documents come from rows of L tokens: full attention there would cost B× more.
  Padding (segment 0) queries see only the padding within reach: their outputs are for discarding.
  """
  b, length = segment_BL.shape
  n = -(-length // chunk)
  before = -(-span // chunk)
  after = before if image_block_BL is not None else 0  # an image block also sees its later positions
  width = (before + 1 + after) * chunk
  if width >= length:  # nothing to save: every key is in reach anyway
    return jax.nn.dot_product_attention(q_BLHK, k_BLHK, v_BLHK,
                                        mask=attention_mask(segment_BL, image_block_BL))

  def windows(x_BL, fill):  # [B, L, ...] → [B, n, width, ...]: chunk i sees chunks i - before … i + after
    pad = [(0, 0), (before * chunk, n * chunk - length + after * chunk)] + [(0, 0)] * (x_BL.ndim - 2)
    x = jnp.pad(x_BL, pad, constant_values=fill)
    parts = [x[:, j * chunk:(j + n) * chunk].reshape(b, n, chunk, *x.shape[2:])
             for j in range(before + 1 + after)]
    return jnp.concatenate(parts, axis=2)

  def chunks(x_BL, fill):  # [B, L, ...] → [B, n, chunk, ...]
    pad = [(0, 0), (0, n * chunk - length)] + [(0, 0)] * (x_BL.ndim - 2)
    return jnp.pad(x_BL, pad, constant_values=fill).reshape(b, n, chunk, *x_BL.shape[2:])

  query_nC = np.arange(n * chunk).reshape(n, chunk)
  key_nS = (np.arange(n)[:, None] - before) * chunk + np.arange(width)[None, :]
  images = () if image_block_BL is None else (chunks(image_block_BL, 0)[..., None],
                                               windows(image_block_BL, 0)[:, :, None, :])
  # Padding ids: -1 for the padded positions, so they only see each other (no empty softmax row).
  mask = _allowed(query_nC[:, :, None], key_nS[:, None, :], chunks(segment_BL, -1)[..., None],
                  windows(segment_BL, -1)[:, :, None, :], *images).reshape(b * n, 1, chunk, width)
  flat = lambda x: x.reshape(b * n, *x.shape[2:])
  out = jax.nn.dot_product_attention(flat(chunks(q_BLHK, 0)), flat(windows(k_BLHK, 0)),
                                     flat(windows(v_BLHK, 0)), mask=mask)
  return out.reshape(b, n * chunk, *out.shape[2:])[:, :length]


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

  @nn.compact
  def __call__(self, x_BLD: jax.Array, plan: dispatch.SortPlan, *, modality: jax.Array,
               segment: jax.Array, position: jax.Array, image_block: jax.Array | None = None,
               attention_span: int | None = None) -> jax.Array:
    """attention_span: no query sees a key farther than this (see `banded_attention`); None: unknown."""
    lead = x_BLD.shape[:-1]
    d_model = x_BLD.shape[-1]
    heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
    kernel = self._kernel

    # q and kv weights stay separate parameters but run as one grouped matmul: sort once, unsort once.
    in_plan = plan.use_if("qkv" in self.untie)
    w_qkv = jnp.concatenate([
        kernel("q", d_model, (heads, head_dim), "embed", ("heads", "kv"), "qkv"),
        kernel("kv", d_model, (2, kv_heads, head_dim), "embed", (None, "heads", "kv"), "qkv")], -1)
    qkv_MF = dispatch.grouped_matmul(in_plan.sort(x_BLD), w_qkv, in_plan, impl=self.gmm_impl,
                                     dtype=self.dtype)
    qkv_BLF = in_plan.unsort(qkv_MF, lead)
    q_BLHK = qkv_BLF[..., :heads * head_dim].reshape(*lead, heads, head_dim)
    kv_BL2HK = qkv_BLF[..., heads * head_dim:].reshape(*lead, 2, kv_heads, head_dim)
    k_BLHK, v_BLHK = kv_BL2HK[:, :, 0], kv_BL2HK[:, :, 1]
    if self.qk_norm:
      norm = lambda name: Norm("rms", self._groups("qk_norm"), feature_axis="kv", dtype=self.dtype,
                               param_dtype=self.param_dtype, name=name)
      q_BLHK, k_BLHK = norm("q_norm")(q_BLHK, modality), norm("k_norm")(k_BLHK, modality)
    q_BLHK = apply_rope(q_BLHK, position, self.rope_theta)
    k_BLHK = apply_rope(k_BLHK, position, self.rope_theta)

    if self.is_mutable_collection("cache") and not self.is_initializing():
      k_BSHK, v_BSHK, mask_B1LS = self._cached(k_BLHK, v_BLHK, segment, image_block)
      out_BLHK = jax.nn.dot_product_attention(q_BLHK, k_BSHK, v_BSHK, mask=mask_B1LS)
    elif attention_span is not None:
      out_BLHK = banded_attention(q_BLHK, k_BLHK, v_BLHK, segment, image_block, span=attention_span)
    else:
      out_BLHK = jax.nn.dot_product_attention(q_BLHK, k_BLHK, v_BLHK,
                                              mask=attention_mask(segment, image_block))
    out_BLF = out_BLHK.reshape(*lead, self.num_heads * self.head_dim)

    out_plan = plan.use_if("o" in self.untie)
    w_o = kernel("o", heads * head_dim, d_model, "heads", ("embed",), "o")
    y_MD = dispatch.grouped_matmul(out_plan.sort(out_BLF), w_o, out_plan, impl=self.gmm_impl,
                                   dtype=self.dtype)
    return out_plan.unsort(y_MD, lead)

  def _cached(self, k_BLHK, v_BLHK, segment_BL, image_block_BL):
    """(keys, values, mask) to attend over, keeping the decode cache up to date (module docstring)."""
    b, length = segment_BL.shape
    if not self.has_variable("cache", "length"):  # prefill: the prompt attends to itself
      if length > self.max_len:
        raise ValueError(f"decode: prompt length {length} exceeds max_len {self.max_len} "
                         "(config.model.max_seq_len)")
      pad = lambda x: jnp.pad(x, [(0, 0), (0, self.max_len - length)] + [(0, 0)] * (x.ndim - 2))
      for name, value in (("k_BSHK", k_BLHK), ("v_BSHK", v_BLHK), ("segment_BS", segment_BL)):
        self.put_variable("cache", name, pad(value))
      self.put_variable("cache", "length", jnp.int32(length))
      return k_BLHK, v_BLHK, attention_mask(segment_BL, image_block_BL)
    start = self.get_variable("cache", "length")
    cached = {}
    for name, value in (("k_BSHK", k_BLHK), ("v_BSHK", v_BLHK), ("segment_BS", segment_BL)):
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
    mask_BLS = _allowed(query_L[:, None], jnp.arange(self.max_len)[None, :], segment_BL[:, :, None],
                        cached["segment_BS"][:, None, :], *images)
    return cached["k_BSHK"], cached["v_BSHK"], mask_BLS[:, None]

  def _kernel(self, name, in_dim, features, in_axis, out_axes, component) -> jax.Array:
    """The weight `name` flattened for `grouped_matmul`: [in, out] tied, [G, in, out] untied."""
    groups = self._groups(component)
    w = dispatch.GroupedKernel(features, num_groups=groups, in_axis=in_axis, out_axes=out_axes,
                               param_dtype=self.param_dtype, name=name)(in_dim)
    return w.reshape(*w.shape[:w.ndim - (1 if isinstance(features, int) else len(features))], -1)

  def _groups(self, component: str) -> int:
    return self.num_modalities if component in self.untie else 1
