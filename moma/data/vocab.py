"""One shared vocabulary for text ids, image codes, audio codes and special tokens, plus codecs.

Layout (ids in order): 8 specials, the text tokenizer's ids (`data.text_tokenizer`: 256 UTF-8 bytes by
default; a corpus's manifest names its own), `image_levels` image codes (discrete form only),
`audio_levels` audio codes (only when "audio" is a modality), then padding up to `config.vocab_size`.

Specials count as text (modality 0): BOS/EOS, and the BOI/EOI/BOA/EOA markers, so predicting *that* an
image starts is a text loss. The `IMG` placeholder marks a continuous patch position (patches form) and
counts as image. Per-modality losses group by the modality of the target token.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from moma.data import tokenizers

SPECIALS = ("pad", "bos", "eos", "boi", "eoi", "boa", "eoa", "img")
PAD, BOS, EOS, BOI, EOI, BOA, EOA, IMG = range(len(SPECIALS))
TEXT_OFFSET = len(SPECIALS)
NUM_BYTES = 256
MODALITY_NAMES = ("text", "image", "audio")


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Id ranges of the shared vocabulary; build it with `vocabulary(data_config)`."""

  modalities: tuple[str, ...]
  image_codes: int  # 0 in the patches form (images enter as continuous patches)
  audio_codes: int  # 0 when "audio" is not a modality
  size: int
  text_ids: int = NUM_BYTES  # the text tokenizer's ids (256 UTF-8 bytes for the default `bytes`)
  text_tokenizer: str = "bytes"  # its spec (moma.data.tokenizers) and the fingerprint the data was made with
  text_fingerprint: str = "bytes"

  @property
  def image_offset(self) -> int:
    return TEXT_OFFSET + self.text_ids

  @property
  def audio_offset(self) -> int:
    return self.image_offset + self.image_codes

  @property
  def used(self) -> int:
    """Ids actually assigned (`size` may pad past this)."""
    return self.audio_offset + self.audio_codes

  def modality_table(self) -> np.ndarray:
    """int32 [size]: the modality id (index into `modalities`) of every token id."""
    table = np.zeros(self.size, np.int32)  # specials and bytes are text
    if "image" in self.modalities:
      image = self.modalities.index("image")
      table[IMG] = image
      table[self.image_offset:self.audio_offset] = image
    if self.audio_codes:
      table[self.audio_offset:self.used] = self.modalities.index("audio")
    return table

  def tokenizer(self):
    """The text tokenizer (`moma.data.tokenizers`); refuses a file whose fingerprint is not the data's."""
    tokenizer = tokenizers.load(self.text_tokenizer)
    if tokenizer.fingerprint != self.text_fingerprint:
      raise ValueError(f"text tokenizer {self.text_tokenizer!r} has fingerprint {tokenizer.fingerprint}, "
                       f"not {self.text_fingerprint} as when the data was tokenized: the file changed; "
                       "restore it")
    return tokenizer

  def encode_text(self, text: str | bytes) -> np.ndarray:
    return self.encode_texts([text])[0]

  def encode_texts(self, texts) -> list[np.ndarray]:
    """int32 tokens of each text (str or UTF-8 bytes), in one call to the tokenizer. Bytes go to a file
    tokenizer as text, without an incomplete character at their end (one that a byte limit cut)."""
    if self.text_tokenizer == "bytes":  # one buffer for all: today's ids, fast
      data = [text.encode("utf-8") if isinstance(text, str) else bytes(text) for text in texts]
      tokens = np.frombuffer(b"".join(data), np.uint8).astype(np.int32) + TEXT_OFFSET
      bounds = list(itertools.accumulate((len(d) for d in data), initial=0))
      return [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    texts = [_complete_characters(t) if isinstance(t, bytes) else t for t in texts]
    return [ids + TEXT_OFFSET for ids in self.tokenizer().encode_batch(texts)]

  def decode_text(self, tokens) -> str:
    """Text among `tokens` as a string; every other id (specials, codes, padding) is skipped."""
    tokens = np.asarray(tokens).reshape(-1)
    ids = tokens[(tokens >= TEXT_OFFSET) & (tokens < TEXT_OFFSET + self.text_ids)] - TEXT_OFFSET
    if self.text_tokenizer != "bytes":
      return self.tokenizer().decode(ids)
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def encode_image(self, image: np.ndarray) -> np.ndarray:
    """uint8 image [H, W] or [H, W, C] → int32 tokens [H*W*C] (row-major, channels last)."""
    codes = np.rint(np.asarray(image, np.float32).reshape(-1) * ((self.image_codes - 1) / 255.0))
    return codes.astype(np.int32) + self.image_offset

  def decode_image(self, tokens, shape=None) -> np.ndarray:
    """Image tokens → uint8 image of `shape`; other ids are skipped.

    Default shape: the smallest square holding the codes, one channel; a sampled image whose code count
    is not a square is padded with black there (a given `shape` must match the count exactly).
    """
    tokens = np.asarray(tokens).reshape(-1)
    codes = tokens[(tokens >= self.image_offset) & (tokens < self.audio_offset)] - self.image_offset
    if shape is None:
      side = int(np.ceil(np.sqrt(codes.size)))
      shape, codes = (side, side), np.pad(codes, (0, side * side - codes.size))
    pixels = np.rint(codes * (255.0 / (self.image_codes - 1)))
    return pixels.astype(np.uint8).reshape(shape)

  def encode_audio(self, waveform: np.ndarray) -> np.ndarray:
    """Waveform in [-1, 1] → μ-law codes as int32 tokens (μ = audio_codes - 1)."""
    return mulaw_encode(waveform, self.audio_codes) + self.audio_offset

  def decode_audio(self, tokens) -> np.ndarray:
    """Audio tokens → float32 waveform in [-1, 1]; other ids are skipped."""
    tokens = np.asarray(tokens).reshape(-1)
    codes = tokens[(tokens >= self.audio_offset) & (tokens < self.used)] - self.audio_offset
    return mulaw_decode(codes, self.audio_codes)


def _complete_characters(data: bytes) -> str:
  """UTF-8 `data` as text; an incomplete character at the end is dropped, other invalid bytes replaced."""
  for cut in range(min(3, len(data)) + 1):  # a UTF-8 character is at most 4 bytes
    try:
      return data[:len(data) - cut].decode("utf-8")
    except UnicodeDecodeError as e:
      if e.end < len(data) - cut:  # invalid inside, not only at the end
        break
  return data.decode("utf-8", errors="replace")


def mulaw_encode(waveform: np.ndarray, levels: int) -> np.ndarray:
  mu = levels - 1
  x = np.minimum(np.maximum(np.asarray(waveform, np.float32), -1.0), 1.0)  # np.clip costs ~10 µs
  y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
  return np.rint((y + 1.0) * 0.5 * mu).astype(np.int32)


def mulaw_decode(codes: np.ndarray, levels: int) -> np.ndarray:
  mu = levels - 1
  y = np.asarray(codes, np.float32) * (2.0 / mu) - 1.0
  return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu).astype(np.float32)


def image_patches(image: np.ndarray, patch_size: int) -> np.ndarray:
  """uint8 image [H, W(, C)] → float32 patches [(H/p)*(W/p), p*p*C] scaled to [-1, 1] (Transfusion)."""
  image = np.asarray(image, np.float32)
  if image.ndim == 2:
    image = image[..., None]
  h, w, c = image.shape
  p = patch_size
  x = image.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4)
  return (x.reshape((h // p) * (w // p), p * p * c) * (2.0 / 255.0) - 1.0).astype(np.float32)


def unpatch(patches: np.ndarray, shape) -> np.ndarray:
  """Inverse of `image_patches`: float patches in [-1, 1] → uint8 image of `shape`."""
  h, w = shape[:2]
  c = shape[2] if len(shape) == 3 else 1
  p = int(round(np.sqrt(np.asarray(patches).shape[-1] // c)))
  x = np.asarray(patches, np.float32).reshape(h // p, w // p, p, p, c).transpose(0, 2, 1, 3, 4)
  pixels = np.clip(np.rint((x.reshape(h, w, c) + 1.0) * 127.5), 0, 255).astype(np.uint8)
  return pixels.reshape(shape)


def text_tokenizer(data_config) -> tokenizers.TextTokenizer:
  """The tokenizer of `data.text_tokenizer` (default bytes). Refuses a file whose fingerprint is not the
  recorded `data.text_tokenizer_fingerprint` (a run's config.json holds it: see
  `text_tokenizer_fingerprint`)."""
  spec = data_config.get("text_tokenizer", "bytes")
  tokenizer = tokenizers.load(spec)
  recorded = data_config.get("text_tokenizer_fingerprint", "")
  if recorded and recorded != tokenizer.fingerprint:
    raise ValueError(f"data.text_tokenizer={spec!r} has fingerprint {tokenizer.fingerprint}, but "
                     f"data.text_tokenizer_fingerprint={recorded!r} was recorded when the run began: the "
                     "tokenizer file changed, and its ids would mean other text; restore the file, or start "
                     "a new --workdir")
  return tokenizer


def text_tokenizer_fingerprint(data_config) -> str:
  """The value to record as `data.text_tokenizer_fingerprint` when a run begins: the file's fingerprint
  ("" for bytes, which has no file, so that runs from before the field resume). Refuses a recorded value
  that the file no longer has."""
  tokenizer = text_tokenizer(data_config)
  return "" if tokenizer is tokenizers.BYTES else tokenizer.fingerprint


def vocabulary(data_config, with_corpus: bool = True) -> Vocab:
  """The vocabulary a data config implies: a records corpus's manifest when the config trains on one
  (`moma.data.corpus`), else the text tokenizer's ids (`text_tokenizer`) and the configured code ranges;
  raises ValueError naming the field on a range overflow."""
  modalities = tuple(data_config.modalities)
  if with_corpus:
    from moma.data import corpus  # pylint: disable=g-import-not-at-top  (corpus builds on this module)
    layout = corpus.layout(data_config)
    if layout is not None:
      if data_config.vocab_size and data_config.vocab_size < layout.used:
        raise ValueError(f"data.vocab_size={data_config.vocab_size} is smaller than the {layout.used} ids "
                         f"of the corpus's layout ({layout.describe()}); set it to 0 (exact) or >= "
                         f"{layout.used}.")
      return layout.vocab(modalities, data_config.vocab_size)
  if data_config.image_form == "discrete" and not 2 <= data_config.image_levels <= 256:
    raise ValueError(f"data.image_levels={data_config.image_levels} overflows the image code range; "
                     "use 2..256 levels per pixel.")
  if "audio" in modalities and not 2 <= data_config.audio_levels <= 65536:
    raise ValueError(f"data.audio_levels={data_config.audio_levels} overflows the audio code range; "
                     "use 2..65536 μ-law levels.")
  image_codes = data_config.image_levels if ("image" in modalities and
                                             data_config.image_form == "discrete") else 0
  audio_codes = data_config.audio_levels if "audio" in modalities else 0
  tokenizer = text_tokenizer(data_config)
  used = TEXT_OFFSET + tokenizer.vocab_size + image_codes + audio_codes
  size = data_config.vocab_size or used
  if size < used:
    raise ValueError(f"data.vocab_size={size} is smaller than the {used} ids the vocabulary needs "
                     f"(specials + {tokenizer.vocab_size} text ids of {tokenizer.spec} + image + audio "
                     f"codes); set it to 0 (exact) or >= {used}.")
  return Vocab(modalities, image_codes, audio_codes, size, tokenizer.vocab_size, tokenizer.spec,
               tokenizer.fingerprint)


def vocab_size(data_config) -> int:
  """Size of the shared vocabulary (the model's `vocab_size` when that is 0)."""
  return vocabulary(data_config).size


def check_model_vocab(data_config, model_vocab_size: int) -> None:
  """Raises ValueError (naming config.model.vocab_size) unless the model embeds every id the data uses."""
  vocab = vocabulary(data_config)
  if model_vocab_size < vocab.used:
    from moma.data import corpus  # pylint: disable=g-import-not-at-top
    layout = corpus.layout(data_config)
    of = (f"corpus {corpus.manifest_path(data_config)} ({layout.describe()})" if layout else
          "the data's vocabulary")
    raise ValueError(f"config.model.vocab_size={model_vocab_size} is smaller than the {vocab.used} ids of "
                     f"{of}; set it to 0 (from the data) or >= {vocab.used}")
