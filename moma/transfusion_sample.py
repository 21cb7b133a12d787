"""Transfusion sampling: captions → images by denoising a fresh image block, and images → captions.

`generate_patches` prefills the caption prompt (BOS caption BOI) once and keeps its KV / recurrent cache;
each denoising step feeds only the image block (all its patches at the step's time, bidirectional inside
the block) on top of that same cache, so the prefix is never recomputed. Classifier-free guidance runs the
unconditioned prompt as extra rows: the same tokens with the caption in a segment of its own, exactly as
caption dropout trains it (`moma.diffusion.drop_captions`). `with_image` appends the clean image and EOI so
that `moma.models.generate` continues in text; `caption_images` is image in, text out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moma import data
from moma import diffusion
from moma.data import vocab as vocab_lib
from moma.models import generate


def image_shape(config) -> tuple[int, ...]:
  """The shape of the images in the run's data mixture (e.g. (8, 8, 1) for the embedded digits)."""
  packer = data.Packer(config.data, split="validation", seq_len=config.train.seq_len)
  return next(s.image_shape for s in packer.sources if s.image_shape is not None)


def _num_patches(config) -> int:
  h, w = image_shape(config)[:2]
  return (h // config.data.patch_size) * (w // config.data.patch_size)


def _rows(config, token_rows, caption_rows=None) -> dict[str, jax.Array]:
  """Documents (lists of ids) left-padded with segment 0 into a prompt batch; `caption_rows` (bool per
  token) move those tokens to segment 2 (the unconditioned prompt of guidance)."""
  width = max(len(t) for t in token_rows)
  table = data.vocabulary(config.data).modality_table()
  out = {k: np.zeros((len(token_rows), width), np.int32) for k in ("tokens", "segment", "position")}
  for i, tokens in enumerate(token_rows):
    n = len(tokens)
    out["tokens"][i, width - n:] = tokens
    out["segment"][i, width - n:] = 1 if caption_rows is None else np.where(caption_rows[i], 2, 1)
    out["position"][i, width - n:] = np.arange(n)
  out["modality"] = table[out["tokens"]]
  return {k: jnp.asarray(v) for k, v in out.items()}


def generate_patches(config, model, variables, captions, *, num_steps: int = 250, cfg_scale: float = 1.0,
                     eta: float = 0.0, seed: int = 0) -> np.ndarray:
  """float32 [N, patches, P] in [-1, 1]: one image per caption, denoised in `num_steps` (DDIM with
  stochasticity `eta` for ddpm, Euler for flow) with guidance `cfg_scale` (1: conditioned only)."""
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps} (--steps) must be >= 1")
  vocab = data.vocabulary(config.data)
  rows = [np.concatenate([[data.BOS], vocab.encode_text(c), [data.BOI]]).astype(np.int32) for c in captions]
  prompt = _rows(config, rows)
  if cfg_scale != 1.0:
    caption_rows = [(np.arange(len(r)) >= 1) & (np.arange(len(r)) < len(r) - 1) for r in rows]
    uncond = _rows(config, rows, caption_rows)
    prompt = {k: jnp.concatenate([prompt[k], uncond[k]]) for k in prompt}
  n, p = _num_patches(config), model.config.patch_dim
  x_T = jax.random.normal(jax.random.key(seed), (len(captions), n, p), jnp.float32)
  denoise = _denoiser(model, config.model.modalities.index("image"), num_steps, float(eta),
                      float(cfg_scale))
  return np.asarray(denoise(variables, prompt, x_T, jax.random.key(seed + 1)))


@functools.lru_cache(maxsize=8)
def _denoiser(model, image_id, num_steps, eta, cfg_scale):
  """The jitted denoising loop, kept per (model, settings): a model (its frozen config) is hashable."""
  return _make_denoiser(model, image_id, num_steps, eta, cfg_scale)


def _make_denoiser(model, image_id, num_steps, eta, cfg_scale):
  settings = model.config.diffusion
  times = diffusion.sampling_times(settings, num_steps)

  def run(variables, prompt, x_T, rng):
    _, cache = generate.prefill(model, variables, prompt)
    rows, n = prompt["tokens"].shape[0], x_T.shape[1]
    position_BN = prompt["position"][:, -1:] + 1 + jnp.arange(n)
    tokens_BN = jnp.full((rows, n), data.IMG, jnp.int32)
    modality_BN = jnp.full((rows, n), image_id, jnp.int32)

    def step(x_BNP, i):
      time, next_time = jnp.asarray(times)[i], jnp.asarray(times)[i + 1]
      x_in = jnp.concatenate([x_BNP] * (rows // x_BNP.shape[0]))
      out, _ = generate.decode_step(model, variables, cache, tokens_BN, modality_BN, position_BN,
                                    patches=x_in, timestep=jnp.full((rows, n), time),
                                    image_block=jnp.ones((rows, n), jnp.int32))
      pred = out.prediction
      if rows > x_BNP.shape[0]:  # guidance: conditioned rows first, then unconditioned
        cond, uncond = jnp.split(pred, 2)
        pred = uncond + cfg_scale * (cond - uncond)
      return diffusion.sampler_step(x_BNP, pred, time, next_time, settings, eta=eta,
                                    rng=jax.random.fold_in(rng, i)), None

    x_0, _ = jax.lax.scan(step, x_T, jnp.arange(num_steps))
    return jnp.clip(x_0, -1.0, 1.0)

  return jax.jit(run)


def with_image(config, batch, image_BNP) -> dict[str, jax.Array]:
  """A prompt batch (ending in BOI) + the clean image block (time 0) + EOI, ready for text decoding."""
  b, n = image_BNP.shape[:2]
  length = batch["tokens"].shape[1]
  modality = jnp.asarray(batch["modality"])
  image_id = config.model.modalities.index("image")
  tail = lambda fill, width: jnp.full((b, width), fill, jnp.int32)
  out = {
      "tokens": jnp.concatenate([batch["tokens"], tail(data.IMG, n), tail(data.EOI, 1)], 1),
      "segment": jnp.concatenate([batch["segment"], jnp.repeat(batch["segment"][:, -1:], n + 1, 1)], 1),
      "position": jnp.concatenate([batch["position"],
                                   batch["position"][:, -1:] + 1 + jnp.arange(n + 1)], 1),
      "image_block": jnp.concatenate([jnp.zeros((b, length), jnp.int32), tail(1, n), tail(0, 1)], 1),
      "patches": jnp.pad(jnp.asarray(image_BNP, jnp.float32), [(0, 0), (length, 1), (0, 0)]),
  }
  out["modality"] = jnp.concatenate([modality, tail(image_id, n), tail(0, 1)], 1)
  out["timestep"] = jnp.zeros((b, length + n + 1), jnp.float32)
  return out


def caption_images(config, model, variables, images, num_tokens: int = 48) -> list[str]:
  """Greedy captions of uint8 images [N, H, W(, C)]: each is the document BOS BOI image EOI, continued."""
  patches = np.stack([vocab_lib.image_patches(im, config.data.patch_size) for im in images])
  prompt = _rows(config, [np.array([data.BOS, data.BOI], np.int32)] * len(images))
  batch = with_image(config, prompt, patches)
  table = jnp.asarray(data.vocabulary(config.data).modality_table())
  tokens_BT, _ = generate.generate(model, variables, batch, num_tokens, modality_table=table)
  vocab = data.vocabulary(config.data)
  captions = []
  for row in np.asarray(tokens_BT):
    ends = np.flatnonzero(row == data.EOS)
    captions.append(vocab.decode_text(row[:ends[0]] if ends.size else row))
  return captions
