"""Mixture entries → example sources → tokenised documents (one document per template use)."""

from __future__ import annotations

import dataclasses
import functools
import os
import types
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

from moma.data import builders
from moma.data import config as config_lib
from moma.data import melodies
from moma.data import shapes
from moma.data import vocab as vocab_lib

# Generated on the fly, endless, a pure function of (data.shapes / data.melodies knobs, split, index).
PROCEDURAL = ("moma_shapes", "moma_melodies")


@dataclasses.dataclass(frozen=True)
class Source:
  """One mixture entry opened for one split: random access to examples plus what renders them."""

  name: str
  parts: tuple[str, ...]
  examples: Sequence[Any]
  roles: dict[str, str]  # template role → feature name
  label_names: tuple[str, ...] | None
  captions: tuple[str, ...]
  image_shape: tuple[int, ...] | None
  max_len: int  # upper bound on the length of one document, BOS and EOS included
  # Tokenised media per (example index, part), kept for in-memory (embedded) sources only.
  media_cache: dict | None = None
  caption_bytes: int = 0  # bound on a caption read from a feature (0: data.text_max_bytes)
  codes_feature: str = ""  # feature holding an image's discrete codes ("": quantised intensities)
  image_tokens: int = 0  # positions of one image between BOI and EOI
  patch_channels: int = 0  # patches form: grey images are repeated to this many channels (0: as is)


def _field(name: str) -> str:
  return f"data.mixture.{name}"


@functools.lru_cache(maxsize=16)
def _embedded_examples(dataset: str, data_dir: str, split: str) -> tuple[dict, ...]:
  """Embedded datasets are small: read them into memory once per process."""
  source = builders.prepare(dataset, data_dir).as_data_source(split=split)
  return tuple(source.__getitems__(range(len(source))))


def _open(name: str, entry, config, split: str):
  """(examples, features) of a mixture entry's split; embedded datasets are built on first use."""
  split = dict(entry.splits).get(split, split)
  if entry.dataset in PROCEDURAL:
    if split not in ("train", "validation"):
      raise ValueError(f"split={split!r} is not a split of {entry.dataset}; use 'train' or 'validation'.")
    if entry.dataset == "moma_shapes":
      patch_size = config.patch_size if config.image_form == "discrete" else 0
      return shapes.Examples(config.shapes, split, patch_size), shapes.features(config.shapes)
    return melodies.Examples(config.melodies, split), melodies.features(config.melodies)
  base = entry.dataset.split(":")[0].split("/")[0]
  if base in builders.EMBEDDED:
    data_dir = os.path.expanduser(entry.data_dir or config.cache_dir)
    builder = builders.prepare(entry.dataset, data_dir)
    if split not in builder.info.splits:
      raise ValueError(f"split={split!r} is not a split of {entry.dataset}; use 'train' or 'validation'.")
    return _embedded_examples(entry.dataset, data_dir, split), builder.info.features
  try:
    builder = tfds.builder(entry.dataset, data_dir=entry.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"{_field(name)}.dataset={entry.dataset!r} is not a known TFDS dataset "
                     f"(embedded ones: {builders.EMBEDDED + PROCEDURAL}).") from e
  try:
    return builder.as_data_source(split=split), builder.info.features
  except Exception as e:  # TFDS raises several types for unprepared data and unknown splits
    raise ValueError(f"split={split!r} of {_field(name)}.dataset={entry.dataset!r} cannot be read "
                     f"({e}); prepare the dataset with `tfds build` into {_field(name)}.data_dir, or map "
                     f"the split name in {_field(name)}.splits.") from e


def _roles(name: str, entry, features) -> dict[str, str]:
  """Template role → feature name, checked against the dataset's features."""
  roles = dict(entry.features)
  for part in config_lib.TEMPLATES[entry.template]:
    needed = ("caption", "label") if part == "caption" else (part,)
    if not any(role in roles for role in needed):
      raise ValueError(f"{_field(name)}.features.{needed[0]} is missing: template "
                       f"{entry.template!r} needs a feature for its {part}.")
  for role, feature in roles.items():
    if feature not in features:
      raise ValueError(f"{_field(name)}.features.{role}={feature!r} is not a feature of "
                       f"{entry.dataset} (it has {sorted(features.keys())}).")
  return roles


def open_source(name: str, entry, config, split: str) -> Source:
  examples, features = _open(name, entry, config, split)
  roles = _roles(name, entry, features)
  parts = config_lib.TEMPLATES[entry.template]
  label_names = None
  if "label" in roles and isinstance(features[roles["label"]], tfds.features.ClassLabel):
    label_names = tuple(features[roles["label"]].names)
  media = "_".join(p for p in parts if p in ("image", "audio"))
  captions = tuple(config.captions.get(media, ())) if "caption" in parts else ()
  if "caption" in parts and "caption" not in roles and not captions:
    raise ValueError(f"data.captions.{media} is empty: the {name} entry renders captions from labels.")
  image_shape = None
  if "image" in parts:
    image_shape = tuple(features[roles["image"]].shape)
    if None in image_shape or len(image_shape) not in (2, 3):
      raise ValueError(f"{_field(name)}.features.image={roles['image']!r} has shape {image_shape}; "
                       "images need a static [H, W] or [H, W, C] shape.")
    if config.image_form == "patches" and (image_shape[0] % config.patch_size or
                                           image_shape[1] % config.patch_size):
      raise ValueError(f"data.patch_size={config.patch_size} does not divide the {image_shape[:2]} "
                       f"images of {_field(name)}; set --config.data.patch_size to a divisor (e.g. 2).")
  source = Source(name, parts, examples, roles, label_names, captions, image_shape, 0,
                  {} if isinstance(examples, tuple) else None)
  if entry.dataset == "moma_shapes":
    source = _shapes_source(source, config)
  elif entry.dataset == "moma_melodies":
    if melodies.max_samples(config.melodies) > config.audio_max_samples:
      raise ValueError(f"data.melodies.max_notes={config.melodies.max_notes} makes clips of up to "
                       f"{melodies.max_samples(config.melodies)} samples, longer than "
                       f"data.audio_max_samples={config.audio_max_samples} (a cut clip no longer matches "
                       "its caption); raise data.audio_max_samples or lower max_notes.")
    source = dataclasses.replace(source, caption_bytes=melodies.max_caption_bytes(config.melodies))
  if image_shape is not None and not source.image_tokens:
    h, w = image_shape[:2]
    p = config.patch_size
    tokens = (h // p) * (w // p) if config.image_form == "patches" else int(np.prod(image_shape))
    source = dataclasses.replace(source, image_tokens=tokens)
  return dataclasses.replace(source, max_len=_max_len(source, config))


def _shapes_source(source: Source, config) -> Source:
  """Shapes: exact caption bound; discrete codes per patch (the palette must fit data.image_levels)."""
  knobs, p = config.shapes, config.patch_size
  source = dataclasses.replace(source, caption_bytes=shapes.max_caption_bytes(knobs))
  if config.image_form == "patches":
    return source
  if shapes.CELL % p:
    raise ValueError(f"data.patch_size={p} does not divide the {shapes.CELL}-pixel cells of "
                     "data.shapes (discrete codes are per patch); use 1, 2, 4 or 8.")
  needed = shapes.num_codes(knobs, p)
  if needed > config.image_levels:
    raise ValueError(f"data.shapes.palette={knobs.palette} needs {needed} image codes at data.patch_size="
                     f"{p}, more than data.image_levels={config.image_levels}; lower the palette or "
                     "raise data.image_levels.")
  return dataclasses.replace(source, codes_feature="codes", image_tokens=(knobs.image_size // p) ** 2)


def _max_len(source: Source, config) -> int:
  length = 2  # BOS, EOS
  for part in source.parts:
    if part == "text" or (part == "caption" and "caption" in source.roles):
      length += min(source.caption_bytes or config.text_max_bytes, config.text_max_bytes)
    elif part == "caption":
      names = source.label_names or ("0" * 20,)  # unnamed labels render as their integer
      longest = max(len(c.format(name=n).encode()) for c in source.captions for n in names)
      length += min(longest, config.text_max_bytes)
    elif part == "image":
      length += 2 + source.image_tokens
    else:
      length += 2 + config.audio_max_samples
  return length


def _text(value, max_bytes: int) -> bytes:
  data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
  return data[:max_bytes]


def _waveform(value) -> np.ndarray:
  """Audio feature → float waveform in [-1, 1] (integer PCM is scaled by its dtype's range)."""
  wave = np.asarray(value).reshape(-1)
  if np.issubdtype(wave.dtype, np.integer):
    return wave.astype(np.float32) / np.iinfo(wave.dtype).max
  return wave.astype(np.float32)


def _media(source: Source, example: dict, part: str, vocab: vocab_lib.Vocab, config):
  """(tokens, patches or None) of an image part (BOI … EOI) or audio part (BOA … EOA)."""
  if part == "image":
    image = example[source.roles["image"]]
    if config.image_form == "patches":
      if source.patch_channels > 1 and (np.ndim(image) == 2 or np.shape(image)[-1] == 1):
        image = np.repeat(np.reshape(image, np.shape(image)[:2] + (1,)), source.patch_channels, -1)
      patches = vocab_lib.image_patches(image, config.patch_size)
      codes = np.full(len(patches), vocab_lib.IMG, np.int32)
    elif source.codes_feature:
      patches, codes = None, np.asarray(example[source.codes_feature], np.int32) + vocab.image_offset
    else:
      patches, codes = None, vocab.encode_image(image)
    return np.concatenate([[vocab_lib.BOI], codes, [vocab_lib.EOI]]).astype(np.int32), patches
  wave = _waveform(example[source.roles["audio"]])[:config.audio_max_samples]
  codes = vocab.encode_audio(wave)
  return np.concatenate([[vocab_lib.BOA], codes, [vocab_lib.EOA]]).astype(np.int32), None


def render_settings(config) -> types.SimpleNamespace:
  """The data config fields `render` reads, as plain attributes (a ConfigDict lookup costs ~3 µs)."""
  return types.SimpleNamespace(**{k: config[k] for k in (
      "text_max_bytes", "audio_max_samples", "image_form", "patch_size")})


_BOS, _EOS = np.array([vocab_lib.BOS], np.int32), np.array([vocab_lib.EOS], np.int32)


def render(source: Source, index: int, variant: int, vocab: vocab_lib.Vocab, config):
  """Document from example `index`: int32 tokens [n], and for the patches form a list of
  (offset of the first patch in the document, patches [k, P]). `config`: the data config or its
  `render_settings`."""
  example = source.examples[index]
  pieces = [_BOS]
  images = []
  offset = 1
  for part in source.parts:
    if part in ("image", "audio"):
      key = (index, part)
      media = source.media_cache.get(key) if source.media_cache is not None else None
      if media is None:
        media = _media(source, example, part, vocab, config)
        if source.media_cache is not None:
          source.media_cache[key] = media
      piece, patches = media
      if patches is not None:
        images.append((offset + 1, patches))
    elif part == "caption" and "caption" not in source.roles:
      label = int(example[source.roles["label"]])
      name = source.label_names[label] if source.label_names else str(label)
      caption = source.captions[variant % len(source.captions)].format(name=name)
      piece = vocab.encode_text(_text(caption, config.text_max_bytes))
    else:  # text, or a caption read from a text feature
      piece = vocab.encode_text(_text(example[source.roles[part]], config.text_max_bytes))
    pieces.append(piece)
    offset += len(piece)
  pieces.append(_EOS)
  return np.concatenate(pieces), images
