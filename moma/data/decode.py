"""Decoding helpers for people and notebooks: token ids back to text, images and waveforms."""

from __future__ import annotations

import numpy as np

from moma.data import scenes
from moma.data import shapes
from moma.data import vocab as vocab_lib


def decode_text(tokens, data_config) -> str:
  """The text among `tokens` as a string, decoded with the data's text tokenizer (data.text_tokenizer, or
  a corpus's); specials and media codes are skipped."""
  return vocab_lib.vocabulary(data_config).decode_text(tokens)


def decode_image(tokens, data_config, shape=None) -> np.ndarray:
  """Discrete image tokens → uint8 image of `shape` (default: square, one channel), codes read as pixel
  intensities (the embedded digits); scenes of shapes decode with `decode_scene`."""
  return vocab_lib.vocabulary(data_config).decode_image(tokens, shape)


def decode_scene(tokens, data_config) -> np.ndarray:
  """Discrete scene tokens → uint8 RGB image [S, S, 3] (`moma.data.shapes` codes, one per
  data.patch_size patch). A sampled image with too few codes is padded with background, too many cut."""
  vocab = vocab_lib.vocabulary(data_config)
  tokens = np.asarray(tokens).reshape(-1)
  codes = tokens[(tokens >= vocab.image_offset) & (tokens < vocab.audio_offset)] - vocab.image_offset
  count = (data_config.shapes.image_size // data_config.patch_size) ** 2
  codes = np.pad(codes[:count], (0, max(0, count - codes.size)))
  return shapes.decode_codes(codes, data_config.shapes, data_config.patch_size)


def decode_audio(tokens, data_config) -> np.ndarray:
  """Audio tokens → float32 waveform in [-1, 1] (μ-law expanded)."""
  return vocab_lib.vocabulary(data_config).decode_audio(tokens)


def is_scene_caption(text: str, data_config) -> bool:
  """Whether `text` is a caption of a scene of shapes under data.shapes (`scenes.parse_caption`)."""
  if "shapes" not in data_config:
    return False
  try:
    scenes.parse_caption(text.strip(), data_config.shapes)
  except ValueError:
    return False
  return True


def _split(tokens) -> list[tuple[str, np.ndarray, int]]:
  """[(kind, body tokens, start)]: text runs, and image / audio bodies between their markers."""
  closers = {vocab_lib.BOI: (vocab_lib.EOI, "image"), vocab_lib.BOA: (vocab_lib.EOA, "audio")}
  out, start, i = [], 0, 0
  while i < len(tokens):
    token = int(tokens[i])
    if token in closers:
      closer, kind = closers[token]
      out.append(("text", tokens[start:i], start))
      ends = np.flatnonzero(tokens[i + 1:] == closer)
      end = i + 1 + (int(ends[0]) if ends.size else len(tokens) - i - 1)
      out.append((kind, tokens[i + 1:end], i + 1))
      i = start = end + 1
    else:
      i += 1
  out.append(("text", tokens[start:], start))
  return out


def decode_document(tokens, data_config, patches=None, image_shape=None, scene=None) -> list[tuple[str, object]]:
  """One document's tokens → [(kind, value)] in order: ("text", str), ("image", uint8 array),
  ("audio", float32 waveform). Pass the row's `patches` [L, P] for the patches form (RGB when P holds
  three channels). Discrete images decode as scenes of shapes (RGB, `decode_scene`) when `scene` is
  True, or when it is None and a text part of the document is a scene caption; else as pixel
  intensities (`decode_image`, e.g. the grey digits)."""
  vocab = vocab_lib.vocabulary(data_config)
  parts = [(kind, body, start) for kind, body, start in _split(np.asarray(tokens).reshape(-1))
           if kind != "text" or vocab.decode_text(body)]
  texts = [vocab.decode_text(body) for kind, body, _ in parts if kind == "text"]
  if scene is None:
    scene = any(is_scene_caption(text, data_config) for text in texts)
  out = []
  for kind, body, start in parts:
    if kind == "text":
      out.append(("text", vocab.decode_text(body)))
    elif kind == "audio":
      out.append(("audio", vocab.decode_audio(body)))
    elif patches is not None and body.size and body[0] == vocab_lib.IMG:
      p = np.asarray(patches)[start:start + body.size]
      out.append(("image", vocab_lib.unpatch(p, image_shape or _patches_shape(p, data_config.patch_size))))
    elif scene:
      out.append(("image", decode_scene(body, data_config)))
    else:
      out.append(("image", vocab.decode_image(body, image_shape)))
  return out


def _patches_shape(patches: np.ndarray, patch_size: int) -> tuple[int, ...]:
  """A square image's shape from its patches [k, p·p·C]: (side, side) for one channel, else (.., C)."""
  channels = patches.shape[-1] // (patch_size * patch_size)
  side = int(round(np.sqrt(len(patches)))) * patch_size
  return (side, side) if channels == 1 else (side, side, channels)
