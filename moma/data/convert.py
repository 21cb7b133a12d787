"""Write a records corpus (`moma.data.corpus`) from JSONL documents, or from the embedded mixture.

  python -m moma.data.convert --input='docs/*.jsonl' --output=corpus --text_tokenizer=bytes \
      --image_codebook=8192 --audio_codebook=1024 --shards=64 --validation_fraction=0.01
  python -m moma.data.convert --from_mixture=configs/mot.py:size=tiny --documents=20000 --output=corpus

JSONL: one document per line, `{"parts": [span, ...]}`, each span one of
  {"text": "a red square."}
  {"image": {"codes": [17, 4, ...]}}      or {"image": {"codes": "x.npy"}} (a path relative to the JSONL file)
  {"image": {"latents": [[...], ...]}}    latent patch vectors [k, --latent_dim] (inline or .npy)
  {"audio": {"codes": [3, 9, ...]}}
A document becomes BOS, its spans (text through --text_tokenizer; image and audio codes between BOI/EOI,
BOA/EOA), EOS. `--from_mixture` writes the documents the mixture's packer draws (train and validation
splits, seed 0, process 0), so a corpus run can be compared with the mixture run.

Shards are written in parallel (one worker per shard), then the manifest, last: an interrupted run leaves
no corpus (a previous manifest in --output is removed first). The same arguments give byte-identical
shards. Bad input is one line naming the file, line and field; no manifest is written.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os

from absl import flags
from ml_collections import config_flags
import numpy as np

from moma import cli
from moma.data import corpus
from moma.data import pipeline
from moma.data import tokenizers
from moma.data import vocab as vocab_lib

_INPUT = flags.DEFINE_string("input", None, "Glob of JSONL files, one document per line.")
_OUTPUT = flags.DEFINE_string("output", None, "The corpus directory to write.")
_TEXT_TOKENIZER = flags.DEFINE_string("text_tokenizer", "bytes",
                                      "bytes | sentencepiece:PATH | hf:PATH (a tokenizer.json).")
_IMAGE_CODEBOOK = flags.DEFINE_integer("image_codebook", 0, "Image codes per image codebook (0: no image "
                                       "codes).", lower_bound=0)
_AUDIO_CODEBOOK = flags.DEFINE_integer("audio_codebook", 0, "Audio codebook size (0: no audio).",
                                       lower_bound=0)
_LATENT_DIM = flags.DEFINE_integer("latent_dim", 0, "Width of latent image patch vectors (0: none).",
                                   lower_bound=0)
_LATENT_DTYPE = flags.DEFINE_enum("latent_dtype", "float32", ["float32", "float16"],
                                  "How latents are stored.")
_SHARDS = flags.DEFINE_integer("shards", 8, "Train shards (validation: a share of them, at least 1).",
                               lower_bound=1)
_VALIDATION_FRACTION = flags.DEFINE_float(
    "validation_fraction", 0.0, "Share of the documents held out as the validation split (0: none; "
    f"training then holds out every {corpus.HOLD_OUT}th train document).", lower_bound=0, upper_bound=0.5)
_WORKERS = flags.DEFINE_integer("workers", 0, "Processes writing shards (0: one per CPU).", lower_bound=0)
_FROM_MIXTURE = config_flags.DEFINE_config_file(
    "from_mixture", None, "A config (configs/NAME.py[:arg]) whose data mixture to write as a corpus, with "
    "--documents.")
_DOCUMENTS = flags.DEFINE_integer("documents", 10000, "--from_mixture: train documents to write.",
                                  lower_bound=1)

_MARKERS = {"image": (vocab_lib.BOI, vocab_lib.EOI), "audio": (vocab_lib.BOA, vocab_lib.EOA)}


def _array(value, base: str, where: str, dtype) -> np.ndarray:
  """A span's codes or latents: inline, or a .npy path relative to the JSONL file."""
  if isinstance(value, str):
    path = os.path.join(base, value)
    try:
      return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"{where}: {path} cannot be read as .npy ({e})") from e
  try:
    return np.asarray(value, dtype)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: not an array of numbers ({e})") from e


def _codes(value, base: str, where: str, codebook: int, flag: str) -> np.ndarray:
  codes = _array(value, base, where, np.int64)
  if codebook == 0:
    raise ValueError(f"{where}: this corpus has no codebook for it; set {flag}=N (the codebook size)")
  if codes.ndim != 1 and codes.size or codes.dtype.kind not in "iu":
    raise ValueError(f"{where}: codes must be a flat list of integers (got {codes.dtype} {codes.shape})")
  bad = codes[(codes < 0) | (codes >= codebook)]
  if bad.size:
    raise ValueError(f"{where} holds code {int(bad[0])}, outside [0, {flag}={codebook})")
  return codes.reshape(-1)


def document(line: str, base: str, where: str, tokenizer, layout: corpus.Layout):
  """One JSONL line → (int32 tokens in the shared vocabulary, latent images, text only)."""
  try:
    parts = json.loads(line)["parts"]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{where}: not a JSON object with a 'parts' list ({e})") from e
  if not isinstance(parts, list):
    raise ValueError(f"{where}: parts is not a list")
  pieces, images, length = [[vocab_lib.BOS]], [], 1
  for i, span in enumerate(parts):
    at = f"{where}: parts[{i}]"
    if not isinstance(span, dict) or len(span) != 1:
      raise ValueError(f"{at}: a span is an object with one key: text, image or audio")
    (kind, value), = span.items()
    if kind == "text":
      if not isinstance(value, str):
        raise ValueError(f"{at}.text: not a string")
      piece = tokenizer.encode(value) + vocab_lib.TEXT_OFFSET
    elif kind in _MARKERS and isinstance(value, dict) and len(value) == 1 and (
        "codes" in value or (kind == "image" and "latents" in value)):
      begin, end = _MARKERS[kind]
      if "latents" in value:
        latents = _array(value["latents"], base, f"{at}.image.latents", np.float32)
        if latents.ndim != 2 or latents.shape[1] != layout.latent_dim or not np.isfinite(latents).all():
          raise ValueError(f"{at}.image.latents: shape {latents.shape} (finite values [k, --latent_dim="
                           f"{layout.latent_dim}]) expected; set --latent_dim to the latents' width")
        images.append((length + 1, latents))
        body = np.full(len(latents), vocab_lib.IMG, np.int64)
      elif kind == "image":
        body = _codes(value["codes"], base, f"{at}.image.codes", layout.image_codebook,
                      "--image_codebook") + layout.vocab().image_offset
      else:
        body = _codes(value["codes"], base, f"{at}.audio.codes", layout.audio_codebook,
                      "--audio_codebook") + layout.vocab().audio_offset
      piece = np.concatenate([[begin], body, [end]])
    elif kind in _MARKERS:
      raise ValueError(f"{at}.{kind}: give {{'codes': ...}}" + (" or {'latents': ...}" if kind == "image"
                                                               else ""))
    else:
      raise ValueError(f"{at}: unknown span kind {kind!r}; use text, image or audio")
    pieces.append(piece)
    length += len(piece)
  pieces.append([vocab_lib.EOS])
  tokens = np.concatenate(pieces).astype(np.int32)
  return tokens, images, all("text" in span for span in parts)


def _jsonl_shard(path: str, lines, layout: corpus.Layout, spec: str) -> dict:
  """Writes the documents at `lines` [(file, line number, byte offset)] as one shard."""
  tokenizer = tokenizers.load(spec, field="--text_tokenizer")

  def documents():
    handles = {}
    try:
      for file, number, offset in lines:
        if file not in handles:
          handles[file] = open(file, "rb")  # pylint: disable=consider-using-with
        handles[file].seek(offset)
        line = handles[file].readline().decode("utf-8", errors="replace")
        yield document(line, os.path.dirname(file), f"{file}:{number}", tokenizer, layout)
    finally:
      for handle in handles.values():
        handle.close()

  return corpus.write_shard(path, documents(), layout)


def _index(files: list[str]) -> list[tuple[str, int, int]]:
  """(file, line number, byte offset) of every non-blank line, in order."""
  lines = []
  for file in files:
    with open(file, "rb") as f:
      offset = 0
      for number, line in enumerate(f, 1):
        if line.strip():
          lines.append((file, number, offset))
        offset += len(line)
  return lines


def _runs(items: list, count: int) -> list[list]:
  """`items` in `count` contiguous runs of near-equal size."""
  bounds = np.linspace(0, len(items), count + 1).round().astype(int)
  return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _in_shards(splits: dict, shards: int) -> dict:
  """split → its items in shards: `shards` for train, a matching share of them (at least 1) for the
  others."""
  train = max(len(splits["train"]), 1)
  return {split: _runs(items, shards if split == "train" else max(1, round(shards * len(items) / train)))
          for split, items in splits.items() if items}


def _hold_out(items: list, validation_fraction: float) -> dict:
  """A `validation_fraction` share of `items` (drawn with a fixed seed) as the validation split."""
  held_out = np.random.default_rng(0).random(len(items)) < validation_fraction
  return dict(train=[x for x, h in zip(items, held_out) if not h],
              validation=[x for x, h in zip(items, held_out) if h])


def from_jsonl(pattern: str, output: str, text_tokenizer: str, image_codebook: int, audio_codebook: int,
               latent_dim: int, latent_dtype: str, shards: int, validation_fraction: float,
               workers: int = 0) -> str:
  """Converts the JSONL files matching `pattern`; returns the manifest's path."""
  files = sorted(glob.glob(os.path.expanduser(pattern)))
  if not files:
    raise ValueError(f"--input={pattern!r} matches no file")
  tokenizer = tokenizers.load(text_tokenizer, field="--text_tokenizer")
  kind, _, path = tokenizer.spec.partition(":")  # recorded with an absolute path: training runs elsewhere
  spec = f"{kind}:{os.path.abspath(os.path.expanduser(path))}" if path else kind
  layout = corpus.Layout(spec, tokenizer.fingerprint, tokenizer.vocab_size, image_codebook,
                         audio_codebook, latent_dim, latent_dtype)
  lines = _index(files)
  if not lines:
    raise ValueError(f"--input={pattern!r}: the files hold no document (every line is blank)")
  made_by = dict(input=pattern, files=len(files), validation_fraction=validation_fraction)
  return corpus.write(output, _in_shards(_hold_out(lines, validation_fraction), shards),
               functools.partial(_jsonl_shard, spec=spec), layout, made_by, workers)


def mixture_documents(data_config, split: str, seq_len: int, count: int, seed: int = 0) -> list:
  """The first `count` documents [(tokens, latent images, text only)] the mixture's packer draws for
  `split` (process 0 of 1) from the generator of batch (seed, step 0)."""
  packer = pipeline.Packer(data_config, split=split, seq_len=seq_len)
  drawn = packer.draw_documents(seed, count)
  return [(tokens, images, splittable) for tokens, images, splittable, _ in drawn]


def from_mixture(config, output: str, documents: int, shards: int, validation_fraction: float,
                 workers: int = 0) -> str:
  """Writes `documents` train documents of `config`'s data mixture (and `validation_fraction` as many
  from its validation split) as a corpus in the mixture's own layout; returns the manifest's path."""
  data_config, seq_len = config.data, config.train.seq_len
  layout = corpus.layout_of_data_config(data_config)
  if layout.latent_dim:
    width = pipeline.Packer(data_config, split="train", seq_len=seq_len).patch_dim
    layout = dataclasses.replace(layout, latent_dim=width)
  splits = {"train": mixture_documents(data_config, "train", seq_len, documents)}
  if validation_fraction:
    splits["validation"] = mixture_documents(data_config, "validation", seq_len,
                                             max(1, round(documents * validation_fraction)))
  return corpus.write(output, _in_shards(splits, shards), corpus.write_shard, layout,
               dict(from_mixture=True, documents=documents, seq_len=seq_len), workers)


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}; flags are --name=value")
  if not _OUTPUT.value:
    raise ValueError("--output is missing: name the corpus directory to write")
  if (_INPUT.value is None) == (_FROM_MIXTURE.value is None):
    raise ValueError("give one of --input=GLOB (JSONL documents) or --from_mixture=CONFIG")
  if _FROM_MIXTURE.value is not None:
    path = from_mixture(_FROM_MIXTURE.value, _OUTPUT.value, _DOCUMENTS.value, _SHARDS.value,
                        _VALIDATION_FRACTION.value, _WORKERS.value)
  else:
    path = from_jsonl(_INPUT.value, _OUTPUT.value, _TEXT_TOKENIZER.value, _IMAGE_CODEBOOK.value,
                      _AUDIO_CODEBOOK.value, _LATENT_DIM.value, _LATENT_DTYPE.value, _SHARDS.value,
                      _VALIDATION_FRACTION.value, _WORKERS.value)
  with open(path, encoding="utf-8") as f:
    splits = json.load(f)["splits"]
  print(" ".join(f"{name}: {s['documents']} documents, {s['tokens']} tokens in {len(s['shards'])} shards;"
                 for name, s in splits.items()) + f" {path}")


if __name__ == "__main__":
  cli.run(main)
