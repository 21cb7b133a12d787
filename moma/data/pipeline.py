"""Sampling documents from the mixture and packing them into full [batch, seq_len] rows (the batch contract).

The batch at `step` on process p is a pure function of (seed, split, p, step): it draws from its own
counter-based generator, so resuming at any step needs no iterator state. Documents are drawn i.i.d. from
the mixture (entry by weight, example uniformly among the examples whose index is ≡ p mod process_count,
so processes read disjoint shares) and laid into the batch's rows in order. Text documents may be cut at
a row's end (the tail continues in the next row as a new segment); images and audio clips are never cut
(one that does not fit waits for the next row while text fills the room), so rows are full.
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib
from typing import Iterator

import numpy as np

from moma.data import config as config_lib
from moma.data import corpus as corpus_lib
from moma.data import sources as sources_lib
from moma.data import vocab as vocab_lib

_DRAWS = 16  # documents drawn per generator call
# Deferred documents after which a row ends: many when text can fill the room, else one (as before).
_MISSES_WITH_TEXT, _MISSES_WITHOUT_TEXT = 64, 1


class Packer:
  """Opens the mixture for one split and process; `batch(seed, step, batch_size)` packs one batch."""

  def __init__(self, config, *, split: str, seq_len: int, process_index: int = 0,
               process_count: int = 1):
    config_lib.validate(config)
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    self.config = config
    self.vocab = vocab_lib.vocabulary(config)
    self.modality_table = self.vocab.modality_table()
    self.split, self.seq_len = split, seq_len
    self.process_index, self.process_count = process_index, process_count
    entries = [(name, entry) for name, entry in corpus_lib.entries(config).items() if entry.weight > 0]
    self.sources = [sources_lib.open_source(name, entry, config, split) for name, entry in entries]
    weights = np.array([entry.weight for _, entry in entries], np.float64)
    self.cum_weights = np.cumsum(weights / weights.sum())
    self.shares = []
    for source in self.sources:
      share = (len(source.examples) - process_index + process_count - 1) // process_count
      if share < 1:
        raise ValueError(f"data.mixture.{source.name}: split {split!r} has {len(source.examples)} "
                         f"examples, too few for process_count={process_count}.")
      self.shares.append(share)
    longest = max(self.sources, key=lambda s: s.max_len)
    if seq_len < longest.max_len and longest.parts == sources_lib.CORPUS_PARTS:
      raise ValueError(longest.examples.too_long(seq_len))
    if seq_len < longest.max_len:
      raise ValueError(f"seq_len={seq_len} is shorter than the longest document of "
                       f"data.mixture.{longest.name} ({longest.max_len} tokens); raise seq_len or lower "
                       "data.text_max_bytes / data.audio_max_samples.")
    self.patch_dim = self._patch_dim()
    self.any_text = any(sources_lib.has_text_documents(source) for source in self.sources)
    self._split_id = zlib.crc32(split.encode())
    self._settings = sources_lib.render_settings(config)
    self._tokens_per_document = float(seq_len)  # updated by every batch; sizes the render blocks

  def _patch_dim(self) -> int:
    """P = patch_size² · channels; grey images join an RGB mixture as three equal channels."""
    channels = {s.name: (s.image_shape[2] if len(s.image_shape) == 3 else 1)
                for s in self.sources if s.image_shape is not None}
    most = max(channels.values(), default=1)
    if set(channels.values()) - {1, most}:
      raise ValueError(f"data.mixture image entries have different channel counts ({channels}); patches "
                       "need one patch size P for the whole batch.")
    self.sources = [dataclasses.replace(s, patch_channels=most) for s in self.sources]
    patch_dim = self.config.patch_size ** 2 * most
    latent = {s.name: s.latent_dim for s in self.sources if s.latent_dim}  # corpora agree (corpus.layout)
    if latent and channels and patch_dim not in latent.values():
      raise ValueError(f"data.mixture.{next(iter(channels))}: its patches are {patch_dim} wide "
                       f"(data.patch_size² × channels), the latent images of corpus entry "
                       f"data.mixture.{next(iter(latent))} {next(iter(latent.values()))}; a batch has one "
                       "width P")
    return next(iter(latent.values())) if latent else patch_dim

  def _draw(self, rng: np.random.Generator, first_block: int):
    """Endless (tokens, images, splittable, source index) documents drawn i.i.d. from the mixture,
    `_DRAWS` per generator call. Rendering goes in blocks (one per source; numpy amortises over its
    documents): the first holds the calls for `first_block` documents, then one call's each, so few
    rendered documents go unused. The blocks change no output, only the speed."""
    shares = np.asarray(self.shares, np.int64)
    calls = max(1, first_block // _DRAWS)
    while True:
      draws = [(rng.random(_DRAWS), rng.random(_DRAWS), rng.integers(0, 2**31, _DRAWS))
               for _ in range(calls)]
      calls = 1
      entries, picks, variants = (np.concatenate(x) for x in zip(*draws))
      entries = np.minimum(np.searchsorted(self.cum_weights, entries, side="right"), len(self.sources) - 1)
      indices = self.process_index + self.process_count * (picks * shares[entries]).astype(np.int64)
      drawn = [None] * len(entries)
      for e in np.unique(entries).tolist():
        at = np.flatnonzero(entries == e)
        source = self.sources[e]
        docs = sources_lib.documents_block(source, indices[at], variants[at], self.vocab, self._settings)
        for j, (tokens, images, splittable) in zip(at.tolist(), docs):
          drawn[j] = (tokens, images, splittable, e)
      yield from drawn

  def _rng(self, seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, self._split_id, self.process_index, step])

  def draw_documents(self, seed: int, count: int, step: int = 0) -> list:
    """The first `count` documents [(tokens, images, splittable, source index)] of the stream that batch
    (seed, step) packs from (`moma.data.convert --from_mixture` writes them as a corpus)."""
    return list(itertools.islice(self._draw(self._rng(seed, step), count), count))

  def _rows(self, seed: int, step: int, batch_size: int):
    """Per row, its segments [(tokens, images, source index)] in order: the batch as one stream of documents.

    Queued items (documents deferred by earlier rows, then a cut text tail) come first, then new draws.
    An item that fits the row's room is placed whole. A text item that does not fit is cut: its head
    fills the row and its tail is queued as a new segment (no BOS; position restarts at 0), so one tail
    can fill the ends of several rows. An image or audio document that does not fit is queued for the
    next row and drawing goes on, so the mixture (in its own proportions) fills the row; without text
    a row ends at its first deferral. Items still queued after the last row are dropped.
    """
    rng = self._rng(seed, step)
    # The documents the batch will take (from the previous batches' mean length) in one block.
    documents = self._draw(rng, int(batch_size * self.seq_len / self._tokens_per_document))
    taken = 0
    pending = []  # tails and deferred documents, placed first in the next row
    for _ in range(batch_size):
      row, room, misses = [], self.seq_len, 0
      max_misses = _MISSES_WITH_TEXT if self.any_text else _MISSES_WITHOUT_TEXT
      waiting, pending = pending, []
      while room and (waiting or misses < max_misses):
        if waiting:
          tokens, images, splittable, source = waiting.pop(0)
        else:
          tokens, images, splittable, source = next(documents)
          taken += 1
        if len(tokens) <= room:
          row.append((tokens, images, source))
          room -= len(tokens)
        elif splittable:
          row.append((tokens[:room], images, source))
          pending.append((tokens[room:], images, True, source))
          room = 0
        else:
          pending.append((tokens, images, False, source))
          misses += 1
      yield row
      pending = waiting + pending  # older first
    self._tokens_per_document = batch_size * self.seq_len / max(taken, 1)

  @property
  def source_names(self) -> list[str]:
    """The mixture entries this packer draws from (weight > 0), in the order `batch(with_source=True)`
    numbers them."""
    return [source.name for source in self.sources]

  def batch(self, seed: int, step: int, batch_size: int, with_source: bool = False) -> dict[str, np.ndarray]:
    """The batch contract's dict; `with_source` adds "source" int32 [B, L]: the index in `source_names`
    of the entry each position's document came from (−1 on padding), for per-source analysis (e.g.
    `experiments/eval_sources.py`); it is not a model input."""
    b_, l_ = batch_size, self.seq_len
    tokens = np.full((b_, l_), vocab_lib.PAD, np.int32)
    segment = np.zeros((b_, l_), np.int32)
    position = np.zeros((b_, l_), np.int32)
    source = np.full((b_, l_), -1, np.int32)
    patches_form = self.config.image_form == "patches"
    if patches_form:
      patches = np.zeros((b_, l_, self.patch_dim), np.float32)
      image_block = np.zeros((b_, l_), np.int32)
    for row, docs in enumerate(self._rows(seed, step, b_)):
      lengths = np.array([len(t) for t, _, _ in docs], np.int32)
      starts = np.cumsum(lengths) - lengths
      n = int(lengths.sum())
      tokens[row, :n] = np.concatenate([t for t, _, _ in docs])
      source[row, :n] = np.repeat([s for _, _, s in docs], lengths)
      segment[row, :n] = np.repeat(np.arange(1, len(docs) + 1, dtype=np.int32), lengths)
      position[row, :n] = np.arange(n, dtype=np.int32) - np.repeat(starts, lengths)
      if patches_form:
        block = 0
        for start, (_, images, _) in zip(starts, docs):
          for offset, image_patches in images:
            block += 1
            at = slice(start + offset, start + offset + len(image_patches))
            patches[row, at] = image_patches
            image_block[row, at] = block
    # Next-token targets inside a segment only; no loss on padding, across segments, or on patch
    # placeholders (continuous patches get their own loss, not a cross-entropy).
    same_doc = (segment[:, 1:] == segment[:, :-1]) & (segment[:, :-1] > 0)
    targets = np.full((b_, l_), vocab_lib.PAD, np.int32)
    targets[:, :-1] = np.where(same_doc, tokens[:, 1:], vocab_lib.PAD)
    loss_mask = np.zeros((b_, l_), np.float32)
    loss_mask[:, :-1] = same_doc & (tokens[:, 1:] != vocab_lib.IMG)
    batch = dict(tokens=tokens, modality=self.modality_table[tokens], segment=segment,
                 position=position, targets=targets, loss_mask=loss_mask)
    if patches_form:
      batch.update(patches=patches, image_block=image_block)
    if with_source:
      batch["source"] = source
    return batch


def batches(data_config, *, split: str, batch_size: int, seq_len: int, seed: int, start_step: int = 0,
            process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator of per-process batches (dicts of numpy arrays, the docs/design.md batch contract).

  The batch at step k depends only on (seed, k, process_index, process_count): `start_step=k` resumes
  exactly where a fresh iterator would be after k batches. Validates eagerly (ValueError naming the field).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  packer = Packer(data_config, split=split, seq_len=seq_len, process_index=process_index,
                  process_count=process_count)

  def generate():
    step = start_step
    while True:
      yield packer.batch(seed, step, batch_size)
      step += 1

  return generate()
