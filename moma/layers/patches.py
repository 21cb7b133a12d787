"""Transfusion's patch projections: continuous patches into the decoder's width and predictions back out.

`PatchIn` maps each noised patch vector x_t [P] to d_model and adds an embedding of its diffusion time
(sinusoidal features → 2-layer MLP, as DiT), replacing the token embedding at image positions (`IMG`
placeholders). `PatchOut` maps the final hidden state back to P (the ε or velocity prediction).

`kind="linear"` (default) is the paper's linear layer. `kind="unet"` is a small U-Net-style pair: a down
block (linear, then a time-conditioned residual block) whose activations are the skip into the mirrored up
block (residual block, then linear). Patches arrive flattened in sequence order with no image grid, so
these blocks work per patch (no spatial convolution or resampling, unlike the paper's U-Net).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("linear", "unet")
TIME_SCALE = 1000.0  # times in [0, 1] are embedded as t · 1000 (DDPM's integer steps)


def timestep_features(time: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal features [..., dim] of `time` (in [0, 1]), cos then sin halves (DiT's convention)."""
  half = dim // 2
  freqs = np.exp(-np.log(max_period) * np.arange(half) / half).astype(np.float32)
  angles = time[..., None].astype(jnp.float32) * TIME_SCALE * freqs
  features = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
  return jnp.pad(features, [(0, 0)] * time.ndim + [(0, dim - 2 * half)])


def _dense(features, axes, dtype, param_dtype, name):
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


class _ResBlock(nn.Module):
  """x + Dense(SiLU(LayerNorm(x)·(1 + scale) + shift)), scale and shift from the time embedding."""

  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x_BLD, temb_BLD):
    d = x_BLD.shape[-1]
    mod = _dense(2 * d, ("embed", None), self.dtype, self.param_dtype, "modulation")(nn.silu(temb_BLD))
    scale, shift = jnp.split(mod, 2, axis=-1)
    h = nn.LayerNorm(use_scale=False, use_bias=False, dtype=self.dtype)(x_BLD) * (1 + scale) + shift
    return x_BLD + _dense(d, ("embed", None), self.dtype, self.param_dtype, "proj")(nn.silu(h))


class PatchIn(nn.Module):
  """(x_BLD token embeddings, diffusion.Inputs) → (x_BLD with image positions replaced, (skip_BLD | None,
  temb)): the skip (unet) and the timestep embedding, which `PatchOut` takes back."""

  d_model: int
  kind: str = "linear"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, inputs):
    dense = lambda n, axes, name: _dense(n, axes, self.dtype, self.param_dtype, name)
    temb = timestep_features(inputs.time, self.d_model)
    temb = dense(self.d_model, ("embed", None), "time_out")(
        nn.silu(dense(self.d_model, (None, "embed"), "time_in")(temb)))
    h_BLD = dense(self.d_model, (None, "embed"), "proj")(inputs.patches.astype(self.dtype))
    skip = None
    if self.kind == "unet":
      h_BLD = skip = _ResBlock(self.dtype, self.param_dtype, name="down")(h_BLD, temb)
    h_BLD = h_BLD + temb
    return jnp.where(inputs.weight[..., None] > 0, h_BLD, x_BLD).astype(x_BLD.dtype), (skip, temb)


class PatchOut(nn.Module):
  """(final hidden x_BLD, PatchIn's skip) → float32 prediction [B, L, P]."""

  patch_dim: int
  kind: str = "linear"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, skip):
    skip_BLD, temb_BLD = skip
    if self.kind == "unet":
      h = x_BLD + _dense(x_BLD.shape[-1], ("embed", None), self.dtype, self.param_dtype, "skip")(skip_BLD)
      x_BLD = _ResBlock(self.dtype, self.param_dtype, name="up")(h, temb_BLD)
    out = _dense(self.patch_dim, ("embed", None), self.dtype, self.param_dtype, "proj")(x_BLD)
    return out.astype(jnp.float32)


def flops_per_image_token(d_model: int, patch_dim: int, kind: str) -> float:
  """Forward FLOPs of PatchIn + PatchOut at one image position (matmuls only, as moma.flops counts)."""
  d, p = d_model, patch_dim
  flops = 2 * p * d + 2 * 2 * d * d + 2 * d * p  # in-projection, time MLP, out-projection
  if kind == "unet":
    flops += 2 * (2 * d * 2 * d + 2 * d * d) + 2 * d * d  # two residual blocks (modulation, proj), skip
  return float(flops)
