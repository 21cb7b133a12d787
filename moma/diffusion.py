"""Transfusion's image objective (arXiv 2408.11039): noise schedules, noising a packed batch, loss, samplers.

Two objectives behind `config.model.diffusion.objective`:

  ddpm  cosine schedule (Nichol & Dhariwal), T = `timesteps` (1000), the model predicts the noise ε;
        t is uniform over {1, …, T}.
  flow  rectified flow x_t = (1 - t) x_0 + t ε, the model predicts the velocity ε - x_0; t is logit-normal
        (`flow_mean`, `flow_std`) then shifted, t ← s·t / (1 + (s - 1)·t) with s = `flow_shift` (SD3, BAGEL).

Both hand the model a time in [0, 1] (ddpm: t / T). One t per image (every patch of an image shares it).
Noise limiting: an image that precedes its caption (its document goes on past EOI with more than EOS) draws
t from the first `noise_limit` / `timesteps` of the range, so captioning sees mostly clean images.
Caption dropout (classifier-free guidance): with probability `caption_dropout` per document, the text
before the document's first image moves to a segment of its own, so that image is trained unconditioned
(the model's attention never crosses segments; Mamba restarts at a segment change).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

OBJECTIVES = ("ddpm", "flow")
COSINE_OFFSET = 0.008  # s of the cosine schedule: ᾱ(t) = f(t) / f(0), f(t) = cos²((t/T + s) / (1 + s) · π/2)
MAX_BETA = 0.999


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """config.model.diffusion (read when config.model.patch_dim > 0); see the module docstring."""

  objective: str = "ddpm"
  timesteps: int = 1000
  loss_weight: float = 5.0
  noise_limit: int = 500
  caption_dropout: float = 0.1
  flow_mean: float = 0.0
  flow_std: float = 1.0
  flow_shift: float = 1.0


def check(s: DiffusionConfig) -> None:
  """Raises ValueError naming the config.model.diffusion field for settings that cannot train."""
  if s.objective not in OBJECTIVES:
    raise ValueError(f"config.model.diffusion.objective={s.objective!r}: expected one of {OBJECTIVES}")
  if s.timesteps < 1:
    raise ValueError(f"config.model.diffusion.timesteps={s.timesteps} must be >= 1")
  if not s.loss_weight >= 0:
    raise ValueError(f"config.model.diffusion.loss_weight={s.loss_weight} (λ) must be >= 0")
  if not 1 <= s.noise_limit <= s.timesteps:
    raise ValueError(f"config.model.diffusion.noise_limit={s.noise_limit} must be in [1, timesteps="
                     f"{s.timesteps}] (the t cap for images that precede their caption)")
  if not 0 <= s.caption_dropout <= 1:
    raise ValueError(f"config.model.diffusion.caption_dropout={s.caption_dropout} must be in [0, 1]")
  if not (s.flow_std > 0 and s.flow_shift > 0):
    raise ValueError("config.model.diffusion.flow_std and flow_shift must be > 0")


def cosine_alpha_bar(timesteps: int) -> np.ndarray:
  """float64 [T + 1]: ᾱ_t for t = 0 … T, with each β_t = 1 - ᾱ_t / ᾱ_{t-1} clipped at 0.999."""
  f = lambda t: np.cos((t / timesteps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * np.pi / 2) ** 2
  t = np.arange(timesteps + 1, dtype=np.float64)
  ratio = f(t[1:]) / f(t[:-1])
  betas = np.minimum(1 - ratio, MAX_BETA)
  return np.concatenate([[1.0], np.cumprod(1 - betas)])


@flax.struct.dataclass
class Inputs:
  """What the decoder reads at image positions: noised patches and their time; the loss target."""

  patches: jax.Array  # float32 [B, L, P], x_t (zeros off image positions)
  time: jax.Array  # float32 [B, L] in [0, 1] (0 off image positions)
  target: jax.Array | None  # float32 [B, L, P]: ε (ddpm) or ε - x_0 (flow); None when given x_t
  weight: jax.Array  # float32 [B, L]: 1 at image (patch) positions
  segment: jax.Array  # int32 [B, L]: batch["segment"] with dropped captions moved apart


@flax.struct.dataclass
class Output:
  """The decoder's output on a batch with patches: next-token logits and the patch prediction."""

  logits: jax.Array  # float32 [B, L, V]
  prediction: jax.Array  # float32 [B, L, P]
  target: jax.Array | None
  weight: jax.Array
  loss_weight: float = flax.struct.field(pytree_node=False, default=1.0)  # λ


def add_noise(x0, eps, time, settings):
  """(x_t, target) for clean x0 and noise eps at `time` in [0, 1] (broadcast over the last axis)."""
  if settings.objective == "flow":
    return (1 - time) * x0 + time * eps, eps - x0
  alpha_bar = jnp.asarray(cosine_alpha_bar(settings.timesteps), jnp.float32)
  ab = alpha_bar[jnp.rint(time * settings.timesteps).astype(jnp.int32)]
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps, eps


def sample_time(rng, shape, cap, settings) -> jax.Array:
  """Training times in (0, cap] (cap ≤ 1, broadcastable to `shape`); ddpm: multiples of 1 / T."""
  if settings.objective == "flow":
    t = jax.nn.sigmoid(settings.flow_mean + settings.flow_std * jax.random.normal(rng, shape))
    s = settings.flow_shift
    return cap * (s * t / (1 + (s - 1) * t))
  steps = settings.timesteps
  top = jnp.maximum(jnp.rint(cap * steps), 1)  # t uniform over {1, …, top}
  return (1 + jnp.floor(jax.random.uniform(rng, shape) * top)) / steps


def _per_row(op, values_BL, ids_BL, num):
  return jax.vmap(lambda v, i: op(v, i, num_segments=num))(values_BL, ids_BL)


def noise_limited(segment_BL, position_BL, image_block_BL) -> jax.Array:
  """bool [B, L + 1] per image block id: the image precedes text of its document (more than EOI, EOS)."""
  b, length = segment_BL.shape
  doc_len_BS = _per_row(jax.ops.segment_max, position_BL, segment_BL, length + 1) + 1
  remaining_BL = jnp.take_along_axis(doc_len_BS, segment_BL, axis=1) - position_BL - 1
  after_BN = _per_row(jax.ops.segment_min, jnp.where(image_block_BL > 0, remaining_BL, length),
                      image_block_BL, length + 1)  # after the image's last patch
  return after_BN > 2


def drop_captions(rng, rate, segment_BL, position_BL, image_block_BL) -> jax.Array:
  """segment_BL where, with probability `rate` per document, the text between BOS and the BOI of the
  document's first image gets its own segment id (segment + L): that image then sees no caption."""
  b, length = segment_BL.shape
  image_BL = image_block_BL > 0
  first_BS = _per_row(jax.ops.segment_min, jnp.where(image_BL, position_BL, length), segment_BL, length + 1)
  first_BL = jnp.take_along_axis(first_BS, segment_BL, axis=1)  # first patch's position, L: none
  caption_BL = (position_BL >= 1) & (position_BL <= first_BL - 2) & (first_BL < length) & (segment_BL > 0)
  drop_BS = jax.random.bernoulli(rng, rate, (b, length + 1))
  dropped_BL = caption_BL & jnp.take_along_axis(drop_BS, segment_BL, axis=1)
  return jnp.where(dropped_BL, segment_BL + length, segment_BL)


def inputs(batch: Mapping[str, jax.Array], settings: DiffusionConfig, rng: jax.Array) -> Inputs:
  """The decoder's image inputs for a batch with `patches` and `image_block`.

  Training (no `timestep` in the batch): `patches` are clean x_0; each image draws its time (noise
  limited), the batch's documents drop captions, and the target is returned. Sampling / evaluation
  (`batch["timestep"]` float32 [B, L]): `patches` already are x_t at that time; nothing is drawn.
  """
  image_block_BL = batch["image_block"]
  weight_BL = (image_block_BL > 0).astype(jnp.float32)
  if "timestep" in batch:
    return Inputs(batch["patches"] * weight_BL[..., None], batch["timestep"] * weight_BL, None, weight_BL,
                  batch["segment"])
  segment_BL, position_BL = batch["segment"], batch["position"]
  rng_t, rng_eps, rng_drop = jax.random.split(rng, 3)
  limit = settings.noise_limit / settings.timesteps
  cap_BN = jnp.where(noise_limited(segment_BL, position_BL, image_block_BL), limit, 1.0)
  time_BN = sample_time(rng_t, cap_BN.shape, cap_BN, settings)
  time_BL = jnp.take_along_axis(time_BN, image_block_BL, axis=1) * weight_BL
  x0_BLP = batch["patches"].astype(jnp.float32)
  eps_BLP = jax.random.normal(rng_eps, x0_BLP.shape, jnp.float32)
  xt_BLP, target_BLP = add_noise(x0_BLP, eps_BLP, time_BL[..., None], settings)
  segment_BL = drop_captions(rng_drop, settings.caption_dropout, segment_BL, position_BL, image_block_BL)
  mask = weight_BL[..., None]
  return Inputs(xt_BLP * mask, time_BL, target_BLP * mask, weight_BL, segment_BL)


def loss(prediction_BLP, target_BLP, weight_BL) -> tuple[jax.Array, jax.Array]:
  """(mean squared error per patch position over `weight`, the weight's sum)."""
  err_BL = jnp.mean(jnp.square(prediction_BLP.astype(jnp.float32) - target_BLP), axis=-1)
  count = jnp.sum(weight_BL)
  return jnp.sum(err_BL * weight_BL) / jnp.maximum(count, 1.0), count


# --- Sampling -------------------------------------------------------------------------------------------


def sampling_times(settings, num_steps: int) -> np.ndarray:
  """float32 [num_steps + 1]: the times a sampler visits, from pure noise (1) down to clean (0)."""
  if settings.objective == "flow":
    t = np.linspace(1.0, 0.0, num_steps + 1)
    s = settings.flow_shift
    return (s * t / (1 + (s - 1) * t)).astype(np.float32)
  steps = settings.timesteps  # evenly spaced timesteps T … 1, then 0 (DDIM respacing)
  ts = np.round(np.linspace(steps, 0, num_steps + 1)).astype(np.int64)
  return (ts / steps).astype(np.float32)


def sampler_step(x_t, prediction, time, next_time, settings, *, eta=0.0, rng=None):
  """One step from `time` to `next_time` < time. ddpm: DDIM with stochasticity `eta` (1: DDPM ancestral
  on the respaced schedule; needs `rng`), x_0 clipped to [-1, 1]; flow: an Euler step of the velocity."""
  if settings.objective == "flow":
    return x_t + (next_time - time) * prediction
  alpha_bar = jnp.asarray(cosine_alpha_bar(settings.timesteps), jnp.float32)
  index = lambda tm: jnp.rint(tm * settings.timesteps).astype(jnp.int32)
  ab, ab_next = alpha_bar[index(time)], alpha_bar[index(next_time)]
  x0 = jnp.clip((x_t - jnp.sqrt(1 - ab) * prediction) / jnp.sqrt(ab), -1.0, 1.0)
  eps = (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)  # consistent with the clipped x0
  sigma = eta * jnp.sqrt((1 - ab_next) / (1 - ab) * (1 - ab / ab_next))
  x_next = jnp.sqrt(ab_next) * x0 + jnp.sqrt(jnp.maximum(1 - ab_next - sigma ** 2, 0.0)) * eps
  if eta:
    x_next = x_next + sigma * jax.random.normal(rng, x_t.shape, x_t.dtype)
  return x_next
