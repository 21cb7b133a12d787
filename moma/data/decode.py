"""Decoding helpers for people and notebooks: token ids back to text, images and waveforms."""

from __future__ import annotations

import numpy as np

from moma.data import vocab as vocab_lib


def decode_text(tokens, data_config) -> str:
  """The text bytes among `tokens` as a string (specials and media codes are skipped)."""
  return vocab_lib.vocabulary(data_config).decode_text(tokens)


def decode_image(tokens, data_config, shape=None) -> np.ndarray:
  """Discrete image tokens → uint8 image of `shape` (default: square, one channel)."""
  return vocab_lib.vocabulary(data_config).decode_image(tokens, shape)


def decode_audio(tokens, data_config) -> np.ndarray:
  """Audio tokens → float32 waveform in [-1, 1] (μ-law expanded)."""
  return vocab_lib.vocabulary(data_config).decode_audio(tokens)


def decode_document(tokens, data_config, patches=None, image_shape=None) -> list[tuple[str, object]]:
  """One document's tokens → [(kind, value)] in order: ("text", str), ("image", uint8 array),
  ("audio", float32 waveform). Pass the row's `patches` [L, P] for the patches form."""
  vocab = vocab_lib.vocabulary(data_config)
  tokens = np.asarray(tokens).reshape(-1)
  out, start = [], 0
  closers = {vocab_lib.BOI: vocab_lib.EOI, vocab_lib.BOA: vocab_lib.EOA}
  i = 0
  while i < len(tokens):
    token = int(tokens[i])
    if token in closers:
      if i > start and vocab.decode_text(tokens[start:i]):
        out.append(("text", vocab.decode_text(tokens[start:i])))
      ends = np.flatnonzero(tokens[i + 1:] == closers[token])
      end = i + 1 + (int(ends[0]) if ends.size else len(tokens) - i - 1)
      body = tokens[i + 1:end]
      if token == vocab_lib.BOA:
        out.append(("audio", vocab.decode_audio(body)))
      elif patches is not None and body.size and body[0] == vocab_lib.IMG:
        p = np.asarray(patches)[i + 1:end]
        shape = image_shape or (int(round(np.sqrt(p.size))),) * 2
        out.append(("image", vocab_lib.unpatch(p, shape)))
      else:
        out.append(("image", vocab.decode_image(body, image_shape)))
      i = start = end + 1
    else:
      i += 1
  if vocab.decode_text(tokens[start:]):
    out.append(("text", vocab.decode_text(tokens[start:])))
  return out
