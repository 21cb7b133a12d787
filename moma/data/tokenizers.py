"""Text tokenizers: UTF-8 bytes, a SentencePiece model, or a Hugging Face `tokenizer.json`.

`load(spec)` takes `bytes`, `sentencepiece:PATH` (a `.model` file) or `hf:PATH` (a `tokenizer.json`, or a
directory holding one) and returns a `TextTokenizer`: text ids in [0, vocab_size), never the tokenizer's
own BOS/EOS (moma puts its own special ids around documents), and a `fingerprint` of the tokenizer file
so that a run or corpus can record which tokenizer made its ids and refuse another.

`sentencepiece` and `tokenizers` are imported only when such a spec is loaded (the `tokenizers` extra).
Every bad spec is one ValueError line naming the config field, the path and the fix.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os

import numpy as np

FIELD = "data.text_tokenizer"
_INSTALL = 'pip install -e ".[tokenizers]"'


class TextTokenizer:
  """Text ↔ ids in [0, vocab_size). `spec` is the spec it was loaded from; `fingerprint` a short hash of
  the tokenizer file's bytes ("bytes" for the byte tokenizer)."""

  spec: str
  vocab_size: int
  fingerprint: str

  def encode(self, text: str | bytes) -> np.ndarray:
    """int32 ids of `text`, without BOS/EOS. Bytes are read as UTF-8 (invalid bytes become U+FFFD,
    except for the byte tokenizer, which keeps them)."""
    raise NotImplementedError

  def encode_batch(self, texts) -> list[np.ndarray]:
    """`[encode(text) for text in texts]`, in one call to the tokenizer library where it has one."""
    return [self.encode(text) for text in texts]

  def decode(self, ids) -> str:
    """The text of `ids`; ValueError naming any id outside [0, vocab_size)."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    outside = ids[(ids < 0) | (ids >= self.vocab_size)]
    if outside.size:
      raise ValueError(f"text ids {outside[:8].tolist()} are outside [0, {self.vocab_size}), the ids of "
                       f"text tokenizer {self.spec!r}.")
    return self._decode(ids)

  def _decode(self, ids: np.ndarray) -> str:
    raise NotImplementedError

  def __repr__(self):
    return f"TextTokenizer({self.spec!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"


class _Bytes(TextTokenizer):
  """UTF-8 bytes: id = byte value (moma's text ids before `vocab.TEXT_OFFSET`)."""

  spec = "bytes"
  vocab_size = 256
  fingerprint = "bytes"

  def encode(self, text):
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def _decode(self, ids):
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


BYTES = _Bytes()


class _Unusable(Exception):
  """A tokenizer file that cannot serve: `problem` follows the file's path in load's message."""

  def __init__(self, problem: str, fix: str | None = None):
    super().__init__(problem)
    self.problem, self.fix = problem, fix


def _import(package: str):
  try:
    return importlib.import_module(package)
  except ImportError:
    raise _Unusable(f"cannot be read without the {package} package", f"install it: {_INSTALL}") from None


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split())[:160]


class _FileTokenizer(TextTokenizer):
  """A tokenizer built from a file's bytes, which it keeps so that it pickles (to converter workers)
  without reading the file again."""

  def __init__(self, spec: str, data: bytes):
    self.spec = spec
    self.fingerprint = hashlib.sha256(data).hexdigest()[:16]
    self._data = data

  def __reduce__(self):
    return type(self), (self.spec, self._data)

  def encode(self, text):
    return self.encode_batch([text])[0]

  def encode_batch(self, texts):
    texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
    return [np.asarray(ids, np.int32) for ids in self._encode(texts)] if texts else []

  def _encode(self, texts: list[str]) -> list[list[int]]:
    """The ids of each text."""
    raise NotImplementedError


class _SentencePiece(_FileTokenizer):
  """A SentencePiece model. `vocab_size` is its piece count, which includes its own special pieces
  (by default unk = 0, bos = 1, eos = 2; pad is off): encode never emits bos/eos/pad (control pieces),
  and emits unk only for a character outside the model when it was trained without byte_fallback.
  Text comes back through the model's normaliser: the default (nmt_nfkc) applies NFKC and turns every
  run of whitespace, newlines included, into one space, trimmed at both ends."""

  what = "a SentencePiece .model file"

  def __init__(self, spec, data):
    super().__init__(spec, data)
    sentencepiece = _import("sentencepiece")
    try:
      self._model = sentencepiece.SentencePieceProcessor(model_proto=data)
    except RuntimeError:
      raise _Unusable("does not parse as a SentencePiece model") from None
    self.vocab_size = self._model.get_piece_size()
    if not self.vocab_size:
      raise _Unusable("is a SentencePiece model without pieces")

  def _encode(self, texts):
    return self._model.encode(texts, add_bos=False, add_eos=False)

  def _decode(self, ids):
    return self._model.decode(ids.tolist())


class _HuggingFace(_FileTokenizer):
  """A Hugging Face `tokenizers` tokenizer.json. `vocab_size` is one past its largest id, added tokens
  included. Encoding adds no special tokens (its post-processor's BOS/EOS stay off), and a special
  token's text inside a document is encoded as text; decoding skips special tokens."""

  what = "a Hugging Face tokenizer.json or a directory holding one"

  def __init__(self, spec, data):
    super().__init__(spec, data)
    tokenizers = _import("tokenizers")
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
      raise _Unusable(f"does not parse as a Hugging Face tokenizer ({_one_line(e)})") from None
    self._tokenizer.encode_special_tokens = True
    self.vocab_size = max(self._tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    if not self.vocab_size:
      raise _Unusable("is a Hugging Face tokenizer without a vocabulary")

  def _encode(self, texts):
    return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

  def _decode(self, ids):
    return self._tokenizer.decode(ids.tolist())


_KINDS = {"sentencepiece": _SentencePiece, "hf": _HuggingFace}


def load(spec: str, field: str = FIELD) -> TextTokenizer:
  """The tokenizer of `spec` (`bytes`, `sentencepiece:PATH` or `hf:PATH`); `field` names the config field
  in errors. Loads are cached by spec and the file's modification time and size, so calling it per
  batch is cheap and a rewritten file is read again."""
  if spec == "bytes":
    return BYTES
  kind, _, path = str(spec).partition(":")
  if kind not in _KINDS or not path:
    raise ValueError(f"{field}={spec!r} names no text tokenizer; use bytes, sentencepiece:PATH "
                     f"({_SentencePiece.what}) or hf:PATH ({_HuggingFace.what}).")
  cls = _KINDS[kind]
  file = os.path.expanduser(path)
  if cls is _HuggingFace and os.path.isdir(file):
    file = os.path.join(file, "tokenizer.json")
  try:
    if not os.path.isfile(file):
      raise _Unusable("is a directory" if os.path.isdir(file) else "does not exist")
    stat = os.stat(file)
    return _read(cls, spec, file, stat.st_mtime_ns, stat.st_size)
  except _Unusable as e:
    fix = e.fix or f"point {field} at {cls.what}"
    raise ValueError(f"{field}={spec!r}: {file} {e.problem}; {fix}.") from None


@functools.lru_cache(maxsize=16)
def _read(cls, spec: str, file: str, mtime_ns: int, size: int) -> TextTokenizer:
  del mtime_ns, size  # cache key only: a rewritten file is a new entry
  try:
    with open(file, "rb") as f:
      data = f.read()
  except OSError as e:
    raise _Unusable(f"cannot be read ({e.strerror})") from None
  return cls(spec, data)
