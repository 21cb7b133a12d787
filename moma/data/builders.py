"""TFDS builders for the embedded datasets, made from what the installed packages ship (no download).

- `moma_text`: English prose from the Python documentation that ships with the stdlib
  (`pydoc_data.topics`), cut into paragraph-aligned chunks of at most `TEXT_CHUNK_BYTES` bytes.
- `moma_digits`: scikit-learn's 1,797 handwritten 8×8 digits (`load_digits`), each with its label and the
  digit's DTMF tone (ITU-T Q.23 frequency pairs) with varied duration, level, twist, phase and noise, so that
  image, audio and caption documents all come from one example.

Both are written as array_record files and read without TensorFlow through `as_data_source`. Everything is
deterministic (fixed seeds; the split is a function of the example index or topic name).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import zlib

import numpy as np
import tensorflow_datasets as tfds

EMBEDDED = ("moma_text", "moma_digits")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SAMPLE_RATE = 4000  # Hz; above twice the highest DTMF digit frequency (1477 Hz)
TONE_SAMPLES = (64, 128)  # 16-32 ms: shorter than Q.24's 40 ms, to keep documents short
TEXT_CHUNK_BYTES = 256
# ITU-T Q.23: each key sounds one low-group (row) and one high-group (column) frequency.
_ROWS = {"1": 697, "2": 697, "3": 697, "4": 770, "5": 770, "6": 770, "7": 852, "8": 852, "9": 852,
         "0": 941}
_COLS = {"1": 1209, "2": 1336, "3": 1477, "4": 1209, "5": 1336, "6": 1477, "7": 1209, "8": 1336,
         "9": 1477, "0": 1336}
DTMF_HZ = tuple((_ROWS[str(d)], _COLS[str(d)]) for d in range(10))


def dtmf_tone(digit: int, rng: np.random.Generator) -> np.ndarray:
  """One DTMF key press as a float32 waveform in [-1, 1] at `SAMPLE_RATE`."""
  n = rng.integers(TONE_SAMPLES[0], TONE_SAMPLES[1] + 1)
  t = np.arange(n) / SAMPLE_RATE
  low_hz, high_hz = DTMF_HZ[digit]
  level = rng.uniform(0.15, 0.4)
  twist = 10 ** (rng.uniform(0.0, 3.0) / 20)  # high group up to 3 dB louder, as Q.24 allows
  phase = rng.uniform(0, 2 * np.pi, size=2)
  wave = level * (np.sin(2 * np.pi * low_hz * t + phase[0]) +
                  twist * np.sin(2 * np.pi * high_hz * t + phase[1]))
  wave += rng.normal(0.0, rng.uniform(0.0, 0.03), size=n)
  return np.clip(wave, -1.0, 1.0).astype(np.float32)


def _is_validation(key: str) -> bool:
  return zlib.crc32(key.encode()) % 10 == 0


class _Embedded(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared plumbing: a features dict, train/validation splits, nothing to download."""

  VERSION = tfds.core.Version("1.0.0")
  url_infos = None  # nothing to download (and no lookup of checksum files)
  METADATA = {}

  def _features(self) -> dict:
    raise NotImplementedError

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=tfds.features.FeaturesDict(self._features()),
                                 metadata=tfds.core.MetadataDict(self.METADATA))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(False), "validation": self._generate_examples(True)}


class MomaDigits(_Embedded):
  """Handwritten digits (scikit-learn) with their label and DTMF tone."""

  METADATA = {"sample_rate": SAMPLE_RATE}

  def _features(self):
    return {"image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=DIGIT_NAMES),
            "audio": tfds.features.Tensor(shape=(None,), dtype=np.float32)}

  def _generate_examples(self, validation: bool):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    # 0..16 intensities → uint8 0..255, so one quantiser serves every image dataset.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    for i, (image, label) in enumerate(zip(images, digits.target)):
      if (i % 10 == 0) != validation:
        continue
      rng = np.random.default_rng([20240, i])
      yield i, {"image": image, "label": int(label), "audio": dtmf_tone(int(label), rng)}


def text_chunks(text: str, max_bytes: int = TEXT_CHUNK_BYTES) -> list[str]:
  """Paragraph-aligned chunks of at most `max_bytes` UTF-8 bytes (long paragraphs split at spaces)."""
  pieces = []
  for para in re.split(r"\n\s*\n", text):
    words = para.split()
    line = ""
    for word in words:
      candidate = f"{line} {word}" if line else word
      if len(candidate.encode()) > max_bytes and line:
        pieces.append(line)
        candidate = word
      line = candidate
    if line:
      pieces.append(line.encode()[:max_bytes].decode("utf-8", errors="ignore"))
  chunks, current = [], ""
  for piece in pieces:  # merge short paragraphs so documents are not all one-liners
    candidate = f"{current}\n\n{piece}" if current else piece
    if len(candidate.encode()) > max_bytes:
      chunks.append(current)
      candidate = piece
    current = candidate
  return chunks + ([current] if current else [])


class MomaText(_Embedded):
  """English prose: the Python documentation topics that ship with the stdlib (`pydoc_data`)."""

  def _features(self):
    return {"text": tfds.features.Text(), "topic": tfds.features.Text()}

  def _generate_examples(self, validation: bool):
    from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
    for topic in sorted(topics):
      if _is_validation(topic) != validation:
        continue
      for j, chunk in enumerate(text_chunks(topics[topic])):
        yield f"{topic}/{j}", {"text": chunk, "topic": topic}


def _check_writable(cache_dir: str) -> str:
  path = os.path.abspath(os.path.expanduser(cache_dir))
  try:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, ".moma_write_check"), "w"):
      pass
  except OSError as e:
    raise ValueError(f"data.cache_dir={cache_dir!r} is not writable ({e.strerror}); point data.cache_dir "
                     "at a writable directory.") from None
  return path


def prepare(name: str, cache_dir: str) -> tfds.core.DatasetBuilder:
  """The builder of embedded dataset `name`, built into `cache_dir` on first use.

  A file lock serialises concurrent first builds (e.g. pytest-xdist workers sharing one cache); TFDS
  writes into an incomplete dir and renames it when done, so an interrupted build leaves nothing behind.
  """
  path = _check_writable(cache_dir)
  builder = tfds.builder(name, data_dir=path, file_format="array_record")
  if builder.is_prepared():
    return builder
  with open(os.path.join(path, f".{name}.lock"), "w") as lock:
    with contextlib.ExitStack() as stack:
      fcntl.flock(lock, fcntl.LOCK_EX)
      stack.callback(fcntl.flock, lock, fcntl.LOCK_UN)
      builder = tfds.builder(name, data_dir=path, file_format="array_record")
      if not builder.is_prepared():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder
