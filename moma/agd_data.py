"""Batches of one AGD task, each a pure function of (seed, step): resuming needs no iterator state.

Decoder tasks read packed documents from `moma.data` and keep only the targets their objective scores.
Encoder tasks (contrastive, classification) need what packed documents do not expose: the image, its
label and a caption per example, at the task's resolution. They read the examples of the task's mixture
entries through `moma.data.sources.open_source` and tokenise with the shared vocabulary, so image codes
and caption bytes are the same ids the decoder sees. Images are upsampled by pixel repetition to
`image_size` (e.g. the 8×8 digits at 16×16), which gives IMP-style multi-resolution tasks.

An encoder batch: {"image": sequence batch [B, H*W*C], "text": sequence batch [B, seq_len],
"label": int32 [B]}, B = this process's rows of the task's global batch_size; a sequence batch holds
tokens, modality, segment, position and image_block (= segment, so attention is bidirectional inside
each image and caption).
"""

from __future__ import annotations

import zlib

import numpy as np

from moma import data
from moma import objectives
from moma.data import sources as sources_lib


def task_seed(seed: int, name: str) -> int:
  """Each task draws its own stream: the same step of two tasks must not reuse one draw."""
  return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


class DecoderData:
  """Packed documents of the task's mixture with the objective's loss mask."""

  def __init__(self, task, modalities, *, split: str, process_index: int = 0, process_count: int = 1):
    self.task, self.modalities = task, tuple(modalities)
    self.objective = objectives.OBJECTIVES[task.objective]
    self.packer = data.Packer(task.data, split=split, seq_len=task.seq_len,
                              process_index=process_index, process_count=process_count)
    self.modality_table = self.packer.modality_table
    self.lengths = {"seq_len": task.seq_len}
    self.rows = task.batch_size // process_count  # task.batch_size is global

  def batch(self, seed: int, step: int) -> dict[str, np.ndarray]:
    batch = self.packer.batch(task_seed(seed, self.task.name), step, self.rows)
    batch["loss_mask"] = objectives.decoder_loss_mask(batch, self.objective, self.modality_table,
                                                      self.modalities)
    return batch


class EncoderData:
  """Images (at `task.image_size`), captions and labels drawn from the task's mixture entries."""

  def __init__(self, task, modalities, *, split: str, process_index: int = 0, process_count: int = 1):
    self.task = task
    field = f"agd.tasks.{task.name}"
    cfg = task.data
    self.vocab = data.vocabulary(cfg)
    self.image_id, self.text_id = modalities.index("image"), modalities.index("text")
    entries = [(n, e) for n, e in cfg.mixture.items() if e.weight > 0]
    self.sources = [sources_lib.open_source(n, e, cfg, split) for n, e in entries]
    self.process_index, self.process_count = process_index, process_count
    self.rows = task.batch_size // process_count  # task.batch_size is global
    for source in self.sources:
      if "label" not in source.roles:
        raise ValueError(f"{field}: objective {task.objective!r} needs labels, but data.mixture."
                         f"{source.name}.features has no 'label'; map the dataset's label feature.")
      if len(source.examples) < process_count:
        raise ValueError(f"data.mixture.{source.name}: split {split!r} is too small for "
                         f"{process_count} processes.")
    weights = np.array([e.weight for _, e in entries], np.float64)
    self.cum_weights = np.cumsum(weights / weights.sum())
    self.num_classes = max(len(s.label_names) if s.label_names else 0 for s in self.sources)
    self.native = self.sources[0].image_shape
    for source in self.sources:
      if source.image_shape != self.native:
        raise ValueError(f"{field}: data.mixture entries have different image shapes "
                         f"({source.image_shape} vs {self.native}); give each shape its own task.")
    size = task.image_size or self.native[0]
    if self.native[0] != self.native[1] or size % self.native[0]:
      raise ValueError(f"{field}.image_size={size} must be a multiple of the square images' side "
                       f"{self.native[:2]} (pixels are repeated, not interpolated).")
    self.factor = size // self.native[0]
    channels = self.native[2] if len(self.native) == 3 else 1
    self.image_len = size * size * channels
    self.lengths = {"image_size": self.image_len}
    if task.objective == "contrastive":
      self.lengths["seq_len"] = task.seq_len
    longest = max(len(c.format(name=n).encode()) for s in self.sources for c in s.captions
                  for n in (s.label_names or ("0" * 20,)))
    if task.objective == "contrastive" and longest > task.seq_len:
      raise ValueError(f"{field}.seq_len={task.seq_len} is shorter than the longest caption "
                       f"({longest} tokens); raise it.")

  def _image(self, image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    image = np.repeat(np.repeat(image, self.factor, axis=0), self.factor, axis=1)
    return self.vocab.encode_image(image)

  def batch(self, seed: int, step: int) -> dict:
    b_ = self.rows
    rng = np.random.default_rng([task_seed(seed, self.task.name), step])
    entry_B = np.minimum(np.searchsorted(self.cum_weights, rng.random(b_), side="right"),
                         len(self.sources) - 1)
    picks_B, variant_B = rng.random(b_), rng.integers(0, 2**31, b_)
    images, captions, labels = [], [], []
    for e, pick, variant in zip(entry_B, picks_B, variant_B):
      source = self.sources[e]
      share = (len(source.examples) - self.process_index + self.process_count - 1) // self.process_count
      example = source.examples[self.process_index + self.process_count * int(pick * share)]
      label = int(example[source.roles["label"]])
      name = source.label_names[label] if source.label_names else str(label)
      images.append(self._image(example[source.roles["image"]]))
      captions.append(self.vocab.encode_text(
          source.captions[variant % len(source.captions)].format(name=name)))
      labels.append(label)
    batch = {"image": _sequences(images, self.image_len, self.image_id),
             "label": np.array(labels, np.int32)}
    if self.task.objective == "contrastive":
      batch["text"] = _sequences(captions, self.task.seq_len, self.text_id)
    return batch


def _sequences(rows: list[np.ndarray], length: int, modality: int) -> dict[str, np.ndarray]:
  """Right-padded one-document rows [B, length]; image_block = segment makes attention bidirectional."""
  tokens = np.full((len(rows), length), data.PAD, np.int32)
  segment = np.zeros_like(tokens)
  for r, row in enumerate(rows):
    tokens[r, :len(row)] = row
    segment[r, :len(row)] = 1
  position = np.where(segment > 0, np.arange(length)[None, :], 0).astype(np.int32)
  return dict(tokens=tokens, modality=np.where(segment > 0, modality, 0).astype(np.int32),
              segment=segment, position=position, image_block=segment.copy())


def task_data(task, modalities, *, split: str, process_index: int = 0, process_count: int = 1):
  """The batch source of `task` (decoder or encoder objective)."""
  kind = EncoderData if objectives.OBJECTIVES[task.objective].encoder else DecoderData
  return kind(task, tuple(modalities), split=split, process_index=process_index,
              process_count=process_count)
