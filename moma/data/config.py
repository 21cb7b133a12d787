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
_DEFAULT_MIXTURE = {  # name: (dataset, template, weight, features)
    "text": ("moma_text", "text", 1.0, dict(text="text")),
    "image_caption": ("moma_digits", "image_caption", 1.0, _DIGITS),
    "caption_image": ("moma_digits", "caption_image", 1.0, _DIGITS),
    "audio_caption": ("moma_digits", "audio_caption", 0.5, _DIGITS),
    "caption_audio": ("moma_digits", "caption_audio", 0.5, _DIGITS),
    "image_audio_caption": ("moma_digits", "image_audio_caption", 1.0, _DIGITS),
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
  config.image_levels = 17  # discrete: codes per pixel (the digits have 17 intensities: lossless)
  config.patch_size = 2  # patches: p×p pixel patches, P = p*p*channels floats per position
  config.audio_levels = 256  # μ-law codes
  config.text_max_bytes = 256  # text documents and captions are cut to this many bytes
  config.audio_max_samples = 128  # audio is cut to this many samples
  config.vocab_size = 0  # 0: exactly the ids needed; larger pads (e.g. to a multiple of 128)
  config.captions = ml_collections.ConfigDict(dict(
      image=("a handwritten {name}.", "the digit {name}, written by hand.", "an image of a {name}.",
             "{name}"),
      audio=("the phone key {name}.", "a dtmf tone for {name}.", "the sound of dialing {name}.",
             "{name}"),
      image_audio=("a handwritten {name} and its key tone.", "{name}, seen and heard.", "{name}"),
  ))
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
  if not config.mixture:
    raise ValueError("data.mixture is empty: add at least one entry (see moma.data.mixture_entry).")
  for name, entry in config.mixture.items():
    if entry.template not in TEMPLATES:
      raise ValueError(f"data.mixture.{name}.template={entry.template!r} is unknown; "
                       f"choose one of {sorted(TEMPLATES)}.")
    missing = set(required_modalities(entry.template)) - set(modalities)
    if missing:
      raise ValueError(f"data.mixture.{name}.template={entry.template!r} needs modalities "
                       f"{sorted(missing)} missing from data.modalities={modalities}.")
    if not entry.weight >= 0:
      raise ValueError(f"data.mixture.{name}.weight={entry.weight} must be >= 0.")
  if sum(entry.weight for entry in config.mixture.values()) <= 0:
    raise ValueError("data.mixture weights are all zero: give at least one entry a positive weight.")
