"""The AGD objectives: what each one reads, which targets it scores, and its loss.

Decoder objectives all train the decoder's next-token cross-entropy; they differ only in which targets the
loss mask keeps (computed on the host from the packed batch of `moma.data`):

  lm                every target of a mixed-modal document (the batch's own `loss_mask`);
  captioning        text targets after an image (the caption of `image_caption` documents);
  image_generation  image targets after a caption (the image of `caption_image` documents);
  audio_text        text targets after an audio clip (the caption of `audio_caption` documents).

Encoder objectives (IMP) read whole images and captions bidirectionally (`moma.models.encoder`):

  contrastive       symmetric image–text InfoNCE over the batch (CLIP's loss);
  classification    cross-entropy of the pooled image over the dataset's labels.

Every `loss_fn(outputs, batch, modalities)` here has the trainer's signature and returns
(loss_weight * loss, metrics) with the unweighted loss under "objective_loss".
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moma import data
from moma.models import decoder


@dataclasses.dataclass(frozen=True)
class Objective:
  """templates: mixture templates whose documents carry what the objective scores (None: any).
  scored: decoder objectives score targets of this modality (None: all) that follow `after` (a marker
  token id) inside their document. encoder: reads images (and captions) through the encoder heads."""

  templates: tuple[str, ...] | None
  scored: str | None = None
  after: int | None = None
  encoder: bool = False


OBJECTIVES = {
    "lm": Objective(None),
    "captioning": Objective(("image_caption", "image_audio_caption"), "text", data.EOI),
    "image_generation": Objective(("caption_image",), "image", data.BOI),
    "audio_text": Objective(("audio_caption", "image_audio_caption"), "text", data.EOA),
    "contrastive": Objective(("image_caption", "caption_image", "image_audio_caption"), encoder=True),
    "classification": Objective(("image_caption", "caption_image", "image_audio_caption"),
                                encoder=True),
}


def get(name: str, field: str) -> Objective:
  """The objective called `name`; ValueError naming `field` when there is none."""
  if name not in OBJECTIVES:
    raise ValueError(f"{field}={name!r} is not an objective; choose one of {sorted(OBJECTIVES)}.")
  return OBJECTIVES[name]


def decoder_loss_mask(batch: Mapping[str, np.ndarray], objective: Objective,
                      modality_table: np.ndarray, modalities: Sequence[str]) -> np.ndarray:
  """float32 [B, L]: the batch's `loss_mask` restricted to the targets `objective` scores."""
  mask = np.asarray(batch["loss_mask"], np.float32)
  if objective.scored is None:
    return mask
  keep = modality_table[batch["targets"]] == modalities.index(objective.scored)
  if objective.after is not None:
    tokens, position = batch["tokens"], batch["position"]
    hits = (tokens == objective.after).astype(np.int32)
    seen = np.cumsum(hits, axis=1)  # markers at or before each position, in the row
    before = seen - hits  # markers strictly before each position
    start = np.arange(tokens.shape[1])[None, :] - position  # first position of each document
    keep &= seen - np.take_along_axis(before, start, axis=1) > 0
  return mask * keep


def decoder_loss(logits_BLV, batch, modalities, *, loss_weight: float = 1.0):
  """The decoder's next-token loss over the (objective-restricted) `loss_mask`."""
  loss, metrics = decoder.loss_fn(logits_BLV, batch, modalities)
  return loss_weight * loss, {"objective_loss": loss, **metrics}


def contrastive_loss(image_BE: jax.Array, text_BE: jax.Array, logit_scale: jax.Array) -> jax.Array:
  """Symmetric InfoNCE: image i's caption is text i, every other text in the batch is a negative.

  Embeddings are L2-normalised here; logits are cosine similarities times exp(logit_scale).
  """
  image_BE = image_BE / jnp.linalg.norm(image_BE, axis=-1, keepdims=True).clip(1e-6)
  text_BE = text_BE / jnp.linalg.norm(text_BE, axis=-1, keepdims=True).clip(1e-6)
  logits_BB = jnp.exp(logit_scale) * image_BE @ text_BE.T
  labels_B = jnp.arange(image_BE.shape[0])
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits_BB, labels_B)
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits_BB.T, labels_B)
  return 0.5 * (jnp.mean(image_to_text) + jnp.mean(text_to_image))


def retrieval_accuracy(image_BE: jax.Array, text_BE: jax.Array, label_B: jax.Array) -> jax.Array:
  """Image→text top-1 accuracy, counting a retrieved caption as right when it names the same label
  (captions of one digit are interchangeable, so the exact index would undercount)."""
  best_B = jnp.argmax(image_BE @ text_BE.T, axis=-1)
  return jnp.mean(label_B[best_B] == label_B)


def contrastive_task_loss(outputs, batch, modalities, *, loss_weight: float = 1.0):
  del modalities
  loss = contrastive_loss(outputs["image"], outputs["text"], outputs["logit_scale"])
  accuracy = retrieval_accuracy(outputs["image"], outputs["text"], batch["label"])
  return loss_weight * loss, {"objective_loss": loss, "accuracy": accuracy,
                              "logit_scale": outputs["logit_scale"]}


def classification_task_loss(logits_BC, batch, modalities, *, loss_weight: float = 1.0):
  del modalities
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch["label"]))
  accuracy = jnp.mean(jnp.argmax(logits_BC, axis=-1) == batch["label"])
  return loss_weight * loss, {"objective_loss": loss, "accuracy": accuracy}


def loss_fn(objective: str):
  """The trainer-style loss function `(outputs, batch, modalities, *, loss_weight)` of `objective`."""
  if objective == "contrastive":
    return contrastive_task_loss
  if objective == "classification":
    return classification_task_loss
  get(objective, "objective")
  return decoder_loss
