"""Mixture entries → example sources → tokenised documents (one document per template use)."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import types
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

from moma.data import builders
from moma.data import config as config_lib
from moma.data import corpus as corpus_lib
from moma.data import melodies
from moma.data import scenes
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
  latent_dim: int = 0  # a corpus's latent image width P (0: none)
  text_limits: tuple[int, ...] = ()  # per part: the most tokens of its text (`_text_limits`; media: 0)


CORPUS_PARTS = (corpus_lib.TEMPLATE,)  # a corpus source's parts: its documents come whole from records


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


def _corpus_source(name: str, entry, config, split: str) -> Source:
  """A records corpus: its documents are read whole; `max_len` bounds those that may not be cut."""
  examples = corpus_lib.open_split(entry.dataset, split, corpus_lib.field_of(name, config))
  return Source(name, CORPUS_PARTS, examples, {}, None, (), None, examples.longest_media_document,
                latent_dim=examples.layout.latent_dim)


def has_text_documents(source: Source) -> bool:
  """Whether the source yields text-only documents (which the packer may cut across rows)."""
  if source.parts == CORPUS_PARTS:
    return source.examples.text_only_documents > 0
  return source.parts == ("text",)


def open_source(name: str, entry, config, split: str) -> Source:
  if entry.template == corpus_lib.TEMPLATE:
    return _corpus_source(name, entry, config, split)
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
  source = dataclasses.replace(source, text_limits=_text_limits(source, config))
  return dataclasses.replace(source, max_len=_max_len(source, config))


def _shapes_source(source: Source, config) -> Source:
  """Shapes: exact caption bound; discrete codes per patch (the palette must fit data.image_levels)."""
  knobs, p = config.shapes, config.patch_size
  source = dataclasses.replace(source, caption_bytes=scenes.max_caption_bytes(knobs))
  if config.image_form == "patches":
    return source
  if scenes.CELL % p:
    raise ValueError(f"data.patch_size={p} does not divide the {scenes.CELL}-pixel cells of "
                     "data.shapes (discrete codes are per patch); use 1, 2, 4 or 8.")
  needed = shapes.num_codes(knobs, p)
  if needed > config.image_levels:
    raise ValueError(f"data.shapes.palette={knobs.palette} needs {needed} image codes at data.patch_size="
                     f"{p}, more than data.image_levels={config.image_levels}; lower the palette or "
                     "raise data.image_levels.")
  return dataclasses.replace(source, codes_feature="codes", image_tokens=(knobs.image_size // p) ** 2)


def _text_limits(source: Source, config) -> tuple[int, ...]:
  """Per part, the most tokens its text may have (0 for image and audio parts): its longest text in
  bytes (cut to data.text_max_bytes before encoding), plus one for a file tokenizer (SentencePiece's
  word-start piece covers no byte; byte-level BPE makes at most one token per byte), within
  data.text_max_bytes. Encoding cuts the tokens past it, so `_max_len` is a bound for every tokenizer;
  for bytes the cut never bites."""
  slack = 0 if config.get("text_tokenizer", "bytes") == "bytes" else 1
  limits = []
  for part in source.parts:
    if part == "text" or (part == "caption" and "caption" in source.roles):
      longest = source.caption_bytes or config.text_max_bytes
    elif part == "caption":
      names = source.label_names or ("0" * 20,)  # unnamed labels render as their integer
      longest = max(len(c.format(name=n).encode()) for c in source.captions for n in names)
    else:
      limits.append(0)
      continue
    limits.append(min(longest + slack, config.text_max_bytes))
  return tuple(limits)


def _max_len(source: Source, config) -> int:
  length = 2 + sum(source.text_limits)  # BOS, EOS, the text parts
  for part in source.parts:
    if part == "image":
      length += 2 + source.image_tokens
    elif part == "audio":
      length += 2 + config.audio_max_samples
  return length


def _text(value, max_bytes: int) -> bytes:
  data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
  return data[:max_bytes]


def _waveform(value) -> np.ndarray:
  """Audio feature → float waveform in [-1, 1] (integer PCM is scaled by its dtype's range)."""
  wave = np.asarray(value).reshape(-1)
  if wave.dtype.kind in "iu":  # (np.issubdtype costs ~5 µs)
    return wave.astype(np.float32) / np.iinfo(wave.dtype).max
  return wave.astype(np.float32, copy=False)


_BOS, _EOS = np.array([vocab_lib.BOS], np.int32), np.array([vocab_lib.EOS], np.int32)
_BOI, _EOI = np.array([vocab_lib.BOI], np.int32), np.array([vocab_lib.EOI], np.int32)
_BOA, _EOA = np.array([vocab_lib.BOA], np.int32), np.array([vocab_lib.EOA], np.int32)


def _encode_media(source: Source, columns: dict, part: str, vocab: vocab_lib.Vocab, config) -> list:
  """[(token pieces, patches or None)] of the image parts (BOI … EOI) or audio parts (BOA … EOA) of the
  examples in `columns` (feature → one value per example), encoded together: the codecs are elementwise."""
  if part == "image":
    if config.image_form == "patches":
      pieces = []
      for image in columns[source.roles["image"]]:
        if source.patch_channels > 1 and (np.ndim(image) == 2 or np.shape(image)[-1] == 1):
          image = np.repeat(np.reshape(image, np.shape(image)[:2] + (1,)), source.patch_channels, -1)
        patches = vocab_lib.image_patches(image, config.patch_size)
        pieces.append(((_BOI, np.full(len(patches), vocab_lib.IMG, np.int32), _EOI), patches))
      return pieces
    if source.codes_feature:  # every image of a source has image_tokens codes
      codes = np.stack([np.asarray(c, np.int32) for c in columns[source.codes_feature]]) + vocab.image_offset
    else:
      images = np.stack([np.asarray(image) for image in columns[source.roles["image"]]])
      codes = vocab.encode_image(images).reshape(len(images), -1)
    return [((_BOI, row, _EOI), None) for row in codes.astype(np.int32)]
  waves = [_waveform(wave)[:config.audio_max_samples] for wave in columns[source.roles["audio"]]]
  codes = vocab.encode_audio(np.concatenate(waves)).astype(np.int32)
  bounds = list(itertools.accumulate((len(w) for w in waves), initial=0))
  return [((_BOA, codes[a:b], _EOA), None) for a, b in zip(bounds[:-1], bounds[1:])]


def _media(source: Source, indices, columns: dict, part: str, vocab: vocab_lib.Vocab, config) -> list:
  """`_encode_media`, through the source's media cache when it has one (embedded sources)."""
  cache = source.media_cache
  if cache is None:
    return _encode_media(source, columns, part, vocab, config)
  out = [cache.get((index, part)) for index in indices]
  missing = [j for j, media in enumerate(out) if media is None]
  if missing:
    fresh = _encode_media(source, {f: [column[j] for j in missing] for f, column in columns.items()}, part,
                          vocab, config)
    for j, media in zip(missing, fresh):
      cache[indices[j], part] = out[j] = media
  return out


def _encode_texts(values, vocab: vocab_lib.Vocab, max_bytes: int, max_tokens: int) -> list[np.ndarray]:
  """Text tokens of each value (cut to `max_bytes` bytes, then to `max_tokens` tokens), in one call."""
  return [tokens[:max_tokens] for tokens in vocab.encode_texts([_text(value, max_bytes) for value in values])]


def render_settings(config) -> types.SimpleNamespace:
  """The data config fields `render` reads, as plain attributes (a ConfigDict lookup costs ~3 µs)."""
  return types.SimpleNamespace(**{k: config[k] for k in (
      "text_max_bytes", "audio_max_samples", "image_form", "patch_size")})


def _columns(source: Source, indices) -> dict:
  """Feature → one value per example of `indices` (generated sources render them as one block)."""
  if hasattr(source.examples, "block"):
    return source.examples.block(indices)
  examples = [source.examples[index] for index in indices]
  return {feature: [example[feature] for example in examples] for feature in examples[0]}


def render_block(source: Source, indices, variants, vocab: vocab_lib.Vocab, config) -> list:
  """Documents from examples `indices` (caption template choice by `variants`): per document, int32
  tokens [n] and for the patches form a list of (offset of the first patch in the document, patches
  [k, P]). Each part is encoded for the whole block at once. `config`: the data config or its
  `render_settings`."""
  indices, n = [int(i) for i in indices], len(indices)
  if not n:
    return []
  columns = _columns(source, indices)
  pieces, images = [[_BOS] for _ in range(n)], [[] for _ in range(n)]
  lengths = [1] * n
  for part, max_tokens in zip(source.parts, source.text_limits, strict=True):
    if part in ("image", "audio"):
      for j, (media, patches) in enumerate(_media(source, indices, columns, part, vocab, config)):
        if patches is not None:
          images[j].append((lengths[j] + 1, patches))
        pieces[j] += media
        lengths[j] += len(media[0]) + len(media[1]) + len(media[2])  # BO*, body, EO*
      continue
    if part == "caption" and "caption" not in source.roles:
      texts = []
      for label, variant in zip(columns[source.roles["label"]], variants):
        name = source.label_names[int(label)] if source.label_names else str(int(label))
        texts.append(source.captions[int(variant) % len(source.captions)].format(name=name))
    else:  # text, or a caption read from a text feature
      texts = columns[source.roles[part]]
    for j, piece in enumerate(_encode_texts(texts, vocab, config.text_max_bytes, max_tokens)):
      pieces[j].append(piece)
      lengths[j] += len(piece)
  tokens = np.concatenate([piece for doc in pieces for piece in doc + [_EOS]])  # one copy for the block
  bounds = list(itertools.accumulate((length + 1 for length in lengths), initial=0))
  return [(tokens[a:b], image) for a, b, image in zip(bounds[:-1], bounds[1:], images)]


def documents_block(source: Source, indices, variants, vocab: vocab_lib.Vocab, config) -> list:
  """[(int32 tokens, latent images, whether the packer may cut it)] of examples `indices`: a corpus's
  records as written, else `render_block`'s documents (cut only when the template is text alone)."""
  if source.parts == CORPUS_PARTS:
    return source.examples.documents(indices)
  splittable = source.parts == ("text",)
  return [(tokens, images, splittable) for tokens, images in render_block(source, indices, variants, vocab,
                                                                          config)]


def render(source: Source, index: int, variant: int, vocab: vocab_lib.Vocab, config):
  """One document: `render_block` of a block of one."""
  return render_block(source, [index], [variant], vocab, config)[0]
