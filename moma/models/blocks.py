"""The layers the decoder stacks: `Block` (mixer then FFN sublayer) and `ModGroup` (Mixture-of-Depths).

Block slots: a block is `x + mixer(...)` then `x + ffn(...)` (norms placed by `norm_placement`).
`make_mixer` / `make_ffn` pick the modules for `block=` / `ffn=`. A mixer is called as
`mixer(h_BLD, plan, modality=, segment=, position=, image_block=)`, an FFN as `ffn(h_BLD, plan)` (MoE:
also `segment=`, `deterministic=`); both return y_BLD and may sow into "losses" / "metrics".

Decoding state lives in the Flax "cache" collection (stacked over layers by the decoder's `nn.scan`):
attention keeps its keys and values (`moma.layers.attention`), Mamba its recurrent state (`Block._recurrent`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from moma import sharding
from moma.layers.attention import Attention
from moma.layers.ffn import SwiGLU
from moma.layers import mamba as mamba_layer
from moma.layers.mod import MixtureOfDepths
from moma.layers.moe import MoE
from moma.layers.norms import Norm


@dataclasses.dataclass(frozen=True)
class Spec:
  """The resolved, hashable model settings the blocks read (built from `Model`'s fields)."""

  num_modalities: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  block: str
  ffn: str
  untie: tuple[str, ...]
  norm: str
  norm_placement: str
  qk_norm: bool
  rope_theta: float
  dtype: Any
  param_dtype: Any
  gmm_impl: str
  modalities: tuple[str, ...] = ()
  moe: tuple[tuple[str, Any], ...] = ()  # resolved config.model.moe items (ffn="moe")
  mod: tuple[tuple[str, Any], ...] = ()  # resolved config.model.mod items (MoD enabled)
  causal: bool = False
  num_layers: int = 1
  max_seq_len: int = 0
  mamba: tuple[tuple[str, Any], ...] = ()  # resolved config.model.mamba items (block="mamba")
  norm_eps: float = 1e-6
  qk_norm_kind: str = "rms"
  attention_impl: str = "auto"
  attention_block: int = 128

  def groups(self, component: str) -> int:
    return self.num_modalities if component in self.untie else 1


def make_mixer(spec: Spec, name: str) -> nn.Module:
  if spec.block == "transformer":
    return Attention(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.num_modalities, spec.untie,
                     spec.qk_norm, spec.rope_theta, spec.dtype, spec.param_dtype, spec.gmm_impl,
                     max_len=spec.max_seq_len, qk_norm_kind=spec.qk_norm_kind, norm_eps=spec.norm_eps,
                     attention_impl=spec.attention_impl, attention_block=spec.attention_block, name=name)
  if spec.block == "mamba":
    return mamba_layer.MambaBlock(
        spec.d_model, **dict(spec.mamba), num_modalities=spec.num_modalities,
        untie=tuple(c for c in spec.untie if c in mamba_layer.UNTIE_COMPONENTS),
        num_layers=spec.num_layers, max_len=spec.max_seq_len, dtype=spec.dtype,
        param_dtype=spec.param_dtype, gmm_impl=spec.gmm_impl, name=name)
  raise ValueError(f"config.model.block={spec.block!r} is not available (have: 'transformer', 'mamba')")


def make_ffn(spec: Spec, name: str) -> nn.Module:
  if spec.ffn == "dense":
    return SwiGLU(spec.d_ff, spec.num_modalities, spec.untie, spec.dtype, spec.param_dtype,
                  spec.gmm_impl, name=name)
  if spec.ffn == "moe":
    return MoE(spec.d_ff, spec.modalities, **dict(spec.moe), causal=spec.causal, dtype=spec.dtype,
               param_dtype=spec.param_dtype, gmm_impl=spec.gmm_impl, name=name)
  raise ValueError(f"config.model.ffn={spec.ffn!r} is not available yet (have: 'dense')")


class Block(nn.Module):
  """One layer: mixer sublayer then FFN sublayer, each `x + f(norm(x))` (pre) or `x + norm(f(x))` (swin)."""

  spec: Spec

  @nn.compact
  def __call__(self, x_BLD, plan, modality, segment, position, image_block=None, deterministic=True,
               attention_span=None):
    """attention_span: how far apart a query and its keys can be (MoD's packed rows; see Attention)."""
    s = self.spec
    norm = lambda name: Norm(s.norm, s.groups("norm"), s.norm_eps, dtype=s.dtype, param_dtype=s.param_dtype,
                             name=name)
    mixer = make_mixer(s, "mixer")
    ctx = dict(modality=modality, segment=segment, position=position, image_block=image_block,
               attention_span=attention_span)
    mix = ((lambda h: self._recurrent(mixer, h, plan, segment)) if s.block == "mamba"
           else (lambda h: mixer(h, plan, **ctx)))
    x_BLD = x_BLD + self._sublayer(norm("mixer_norm"), modality, mix, x_BLD)
    if s.d_ff:
      ffn = make_ffn(s, "ffn")
      ffn_ctx = dict(segment=segment, deterministic=deterministic) if s.ffn == "moe" else {}
      x_BLD = x_BLD + self._sublayer(norm("ffn_norm"), modality, lambda h: ffn(h, plan, **ffn_ctx), x_BLD)
    return sharding.constrain(x_BLD, ("batch", "length", "embed"))  # No-op outside sharding.activate.

  def _recurrent(self, mixer, h_BLD, plan, segment_BL):
    """A Mamba mixer; with a mutable "cache" collection it also keeps its recurrent state there.

    No cache yet: prefill (documents reset the state; the cache continues the last one). A cache: continue
    it token by token (decoding). Without a mutable "cache" (training, init): the plain forward.
    """
    if self.is_initializing() or not self.is_mutable_collection("cache"):
      return mixer(h_BLD, plan, segment_BL=segment_BL)
    fields = ("conv_BKD", "ssm_BDN", "length")
    if self.has_variable("cache", "length"):
      cache = mamba_layer.MambaCache(*(self.get_variable("cache", f) for f in fields))
      y_BLD, cache = mixer(h_BLD, plan, cache=cache, return_cache=True)
    else:
      y_BLD, cache = mixer(h_BLD, plan, segment_BL=segment_BL, return_cache=True)
    for f in fields:
      self.put_variable("cache", f, getattr(cache, f))
    return y_BLD

  def _sublayer(self, norm, modality_BL, layer, x_BLD):
    if self.spec.norm_placement == "pre":
      return layer(norm(x_BLD, modality_BL))
    return norm(layer(x_BLD), modality_BL)


class ModGroup(nn.Module):
  """`mod.every` layers: plain blocks `block_<i>`, then a block that only a `mod.capacity` share of the
  tokens (chosen by a router over the whole batch) goes through (`mod`)."""

  spec: Spec

  @nn.compact
  def __call__(self, x_BLD, plan, modality, segment, position, image_block=None, deterministic=True):
    s, mod = self.spec, dict(self.spec.mod)
    ctx = dict(modality=modality, segment=segment, position=position, image_block=image_block,
               deterministic=deterministic)
    for i in range(mod["every"] - 1):
      x_BLD = Block(s, name=f"block_{i}")(x_BLD, plan, **ctx)
    # parent=None: the block is adopted by the MoD wrapper (params under layers/mod/block).
    routed = MixtureOfDepths(Block(s, parent=None), capacity=mod["capacity"], selection=mod["selection"],
                             block_attends=s.block == "transformer",
                             router_noise=mod["router_noise"], aux_router=mod["aux_router"],
                             aux_loss_weight=mod["aux_loss_weight"], routing_rows=mod["routing_rows"],
                             causal=s.causal, dtype=s.dtype,
                             param_dtype=s.param_dtype, name="mod")
    return routed(x_BLD, plan, **ctx)
