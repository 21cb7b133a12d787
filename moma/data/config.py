"""The data config: the embedded three-modality mixture, and how to swap in any TFDS dataset.

A mixture entry names a TFDS dataset, a document template and a sampling weight; `features` maps the
template's roles (text, caption, label, image, audio) to the dataset's feature names, and `splits` maps
moma's split names ("train", "validation") to the dataset's own. Example, MNIST as image-caption data:

  config.mixture.mnist = ml_collections.ConfigDict(dict(
      dataset="mnist", template="image_caption", weight=1.0,
      features=dict(image="image", label="label"), splits=dict(validation="test")))
"""

from __future__ import annotations

import ml_collections

from moma.data import corpus
from moma.data import melodies
from moma.data import scenes

# Every document is BOS, its parts, EOS. "caption" renders `captions.<media>` from a label (or takes a
# text feature mapped as "caption"); "image" is BOI image EOI; "audio" is BOA audio EOA.
TEMPLATES = {
    "text": ("text",),
    "image_caption": ("image", "caption"),
    "caption_image": ("caption", "image"),
    "audio_caption": ("audio", "caption"),
    "caption_audio": ("caption", "audio"),
    "image_audio_caption": ("image", "audio", "caption"),
}

_DIGITS = dict(image="image", audio="audio", label="label")
_SCENES = dict(image="image", caption="caption")
_MELODIES = dict(audio="audio", caption="caption")
_DEFAULT_MIXTURE = {  # name: (dataset, template, weight, features)
    "text": ("moma_text", "text", 1.0, dict(text="text")),
    "image_caption": ("moma_digits", "image_caption", 0.5, _DIGITS),
    "caption_image": ("moma_digits", "caption_image", 0.5, _DIGITS),
    "scene_caption": ("moma_shapes", "image_caption", 1.0, _SCENES),
    "caption_scene": ("moma_shapes", "caption_image", 1.0, _SCENES),
    "melody_caption": ("moma_melodies", "audio_caption", 1.0, _MELODIES),
    "caption_melody": ("moma_melodies", "caption_audio", 1.0, _MELODIES),
    # DTMF key tones (4 kHz, random phase: close to noise for a small model), kept light.
    "audio_caption": ("moma_digits", "audio_caption", 0.1, _DIGITS),
    "caption_audio": ("moma_digits", "caption_audio", 0.1, _DIGITS),
    "image_audio_caption": ("moma_digits", "image_audio_caption", 0.2, _DIGITS),
}


def mixture_entry(dataset: str, template: str, weight: float = 1.0, features=None, splits=None,
                  data_dir: str = "") -> ml_collections.ConfigDict:
  """One mixture entry; `data_dir` "" means `data.cache_dir`."""
  return ml_collections.ConfigDict(dict(
      dataset=dataset, template=template, weight=float(weight), features=dict(features or {}),
      splits=dict(splits or {}), data_dir=data_dir))


def default_config(modalities=("text", "image", "audio")) -> ml_collections.ConfigDict:
  """The embedded mixture. `modalities=("text", "image")` keeps only the text and image templates
  (the two-modality layout of MoMa 4t4i); the batch `modality` ids index `config.modalities`."""
  modalities = tuple(modalities)
  config = ml_collections.ConfigDict()
  config.modalities = modalities
  config.cache_dir = "~/.cache/moma/tfds"  # embedded datasets are built here on first use
  config.image_form = "discrete"  # "discrete" (Chameleon codes) or "patches" (Transfusion)
  # Discrete image codes: one per pixel and channel (intensity; 256 = lossless for any uint8 image), and
  # the scenes' per-patch codes (moma.data.shapes: 1 + palette·(2^(p²) − 1), 91 at p=2) share the range.
  config.image_levels = 256
  config.patch_size = 2  # p×p pixel patches: P = p*p*channels floats (patches), one scene code (discrete)
  config.audio_levels = 64  # μ-law codes
  # Text documents and captions are cut to this many UTF-8 bytes before they are encoded, and their tokens
  # to this many after (documents fit seq 256); see docs/data.md "Text tokenizers".
  config.text_max_bytes = 254
  # bytes | sentencepiece:PATH | hf:PATH (moma.data.tokenizers): encodes the text and captions of the
  # mixture's entries; a records corpus carries its own (it must agree). Its fingerprint is recorded
  # when a run begins ("" for bytes), so a resume with another file is refused.
  config.text_tokenizer = "bytes"
  config.text_tokenizer_fingerprint = ""
  config.audio_max_samples = 128  # audio is cut to this many samples
  config.vocab_size = 0  # 0: exactly the ids needed; larger pads (e.g. to a multiple of 128)
  config.corpus = ""  # a records corpus directory (moma.data.convert): trains on it instead of the mixture
  config.captions = ml_collections.ConfigDict(dict(
      image=("a handwritten {name}.", "the digit {name}, written by hand.", "an image of a {name}.",
             "{name}"),
      audio=("the phone key {name}.", "a dtmf tone for {name}.", "the sound of dialing {name}.",
             "{name}"),
      image_audio=("a handwritten {name} and its key tone.", "{name}, seen and heard.", "{name}"),
  ))
  config.shapes = scenes.default_knobs()  # moma_shapes difficulty: image_size, objects, palette
  config.melodies = melodies.default_knobs()  # moma_melodies: max_notes
  config.mixture = ml_collections.ConfigDict()
  for name, (dataset, template, weight, features) in _DEFAULT_MIXTURE.items():
    if set(required_modalities(template)) <= set(modalities):
      config.mixture[name] = mixture_entry(dataset, template, weight, features)
  return config


def required_modalities(template: str) -> tuple[str, ...]:
  parts = TEMPLATES[template]
  return ("text",) + tuple(m for m in ("image", "audio") if m in parts)


def validate(config) -> None:
  """Raises ValueError naming the first bad field."""
  modalities = tuple(config.modalities)
  if not modalities or modalities[0] != "text" or len(set(modalities)) != len(modalities) or not (
      set(modalities) <= {"text", "image", "audio"}):
    raise ValueError(f"data.modalities={modalities} must start with 'text' and hold distinct names "
                     "from ('text', 'image', 'audio').")
  if config.image_form not in ("discrete", "patches"):
    raise ValueError(f"data.image_form={config.image_form!r}: use 'discrete' or 'patches'.")
  if config.patch_size < 1 or config.text_max_bytes < 1 or config.audio_max_samples < 1:
    raise ValueError("data.patch_size, data.text_max_bytes and data.audio_max_samples must be >= 1.")
  mixture = corpus.entries(config)
  if not mixture:
    raise ValueError("data.mixture is empty: add at least one entry (see moma.data.mixture_entry).")
  used = {entry.dataset for entry in mixture.values()}
  for dataset, module, field in (("moma_shapes", scenes, "shapes"), ("moma_melodies", melodies, "melodies")):
    if dataset in used:
      if field not in config:
        raise ValueError(f"data.{field} is missing but data.mixture uses {dataset}; copy it from "
                         "moma.data.default_config().")
      module.validate(config[field], f"data.{field}")
  for name, entry in mixture.items():
    if entry.template != corpus.TEMPLATE:  # a corpus's layout is checked as the vocabulary is built
      if entry.template not in TEMPLATES:
        raise ValueError(f"data.mixture.{name}.template={entry.template!r} is unknown; "
                         f"choose one of {sorted(TEMPLATES)}.")
      missing = set(required_modalities(entry.template)) - set(modalities)
      if missing:
        raise ValueError(f"data.mixture.{name}.template={entry.template!r} needs modalities "
                         f"{sorted(missing)} missing from data.modalities={modalities}.")
    if not entry.weight >= 0:
      raise ValueError(f"data.mixture.{name}.weight={entry.weight} must be >= 0: set "
                       f"--config.data.mixture.{name}.weight to 0 (off) or a positive weight.")
  if sum(entry.weight for entry in mixture.values()) <= 0:
    raise ValueError("data.mixture weights are all zero: give at least one entry a positive weight.")
