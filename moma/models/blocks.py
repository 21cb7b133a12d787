"""The layers the decoder stacks: `Block` (mixer then FFN sublayer) and `ModGroup` (Mixture-of-Depths).

Both read the decoder's `ModelConfig` (field `config`) and hand each layer its settings: the routed and
Mamba layers their typed sub-config (`cfg.moe`, `cfg.mod`, `cfg.mamba`), the others their fields by keyword.
Block slots: a block is `x + mixer(...)` then `x + ffn(...)` (norms placed by `norm_placement`).
`make_mixer` / `make_ffn` pick the modules for `block=` / `ffn=` (checked by `ModelConfig`). A mixer is called as
`mixer(h_BLD, plan, modality=, segment=, position=, image_block=)`, an FFN as `ffn(h_BLD, plan)` (MoE:
also `segment=`, `deterministic=`); both return y_BLD and may sow into "losses" / "metrics".

Decoding state lives in the Flax "cache" collection (stacked over layers by the decoder's `nn.scan`):
attention keeps its keys and values (`moma.layers.attention`), Mamba its recurrent state (`Block._recurrent`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from moma import sharding
from moma.layers.attention import Attention
from moma.layers.ffn import SwiGLU
from moma.layers import mamba as mamba_layer
from moma.layers.mod import MixtureOfDepths
from moma.layers.moe import MoE
from moma.layers.norms import Norm
from moma.models.model_config import ModelConfig


def _dtypes(cfg: ModelConfig) -> dict:
  return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def make_mixer(cfg: ModelConfig, name: str) -> nn.Module:
  if cfg.block == "mamba":
    return mamba_layer.MambaBlock(cfg.mamba, d_model=cfg.d_model, num_modalities=cfg.num_modalities,
                                  untie=cfg.untie, num_layers=cfg.num_layers, max_len=cfg.max_seq_len,
                                  gmm_impl=cfg.gmm_impl, **_dtypes(cfg), name=name)
  return Attention(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                   num_modalities=cfg.num_modalities, untie=cfg.untie, qk_norm=cfg.qk_norm,
                   rope_theta=cfg.rope_theta, gmm_impl=cfg.gmm_impl, max_len=cfg.max_seq_len,
                   qk_norm_kind=cfg.qk_norm_kind, norm_eps=cfg.norm_eps, attention_impl=cfg.attention_impl,
                   attention_block=cfg.attention_block, **_dtypes(cfg), name=name)


def make_ffn(cfg: ModelConfig, name: str) -> nn.Module:
  if cfg.ffn == "moe":
    return MoE(cfg.moe, d_ff=cfg.d_ff, modalities=cfg.modalities, aux_routing=cfg.aux_routing,
               gmm_impl=cfg.gmm_impl, **_dtypes(cfg), name=name)
  return SwiGLU(d_ff=cfg.d_ff, num_modalities=cfg.num_modalities, untie=cfg.untie, gmm_impl=cfg.gmm_impl,
                **_dtypes(cfg), name=name)


class Block(nn.Module):
  """One layer: mixer sublayer then FFN sublayer, each `x + f(norm(x))` (pre) or `x + norm(f(x))` (swin)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BLD, plan, modality, segment, position, image_block=None, deterministic=True,
               attention_span=None):
    """attention_span: how far apart a query and its keys can be (MoD's packed rows; see Attention)."""
    s = self.config
    norm = lambda name: Norm(kind=s.norm, num_groups=s.groups("norm"), eps=s.norm_eps, **_dtypes(s), name=name)
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
    if self.config.norm_placement == "pre":
      return layer(norm(x_BLD, modality_BL))
    return norm(layer(x_BLD), modality_BL)


class ModGroup(nn.Module):
  """`mod.every` layers: plain blocks `block_<i>`, then a block that only a `mod.capacity` share of the
  tokens (chosen by a router over the whole batch) goes through (`mod`)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BLD, plan, modality, segment, position, image_block=None, deterministic=True):
    s, mod = self.config, self.config.mod
    ctx = dict(modality=modality, segment=segment, position=position, image_block=image_block,
               deterministic=deterministic)
    for i in range(mod.every - 1):
      x_BLD = Block(s, name=f"block_{i}")(x_BLD, plan, **ctx)
    # parent=None: the block is adopted by the MoD wrapper (params under layers/mod/block).
    routed = MixtureOfDepths(Block(s, parent=None), mod, block_attends=s.block == "transformer",
                             aux_routing=s.aux_routing, **_dtypes(s), name="mod")
    return routed(x_BLD, plan, **ctx)
