"""A records corpus: pre-tokenized mixed-modal documents in ArrayRecord shards plus `manifest.json`.

`python -m moma.data.convert` writes one (from JSONL or from the embedded mixture); `config.data.corpus=DIR`
trains on it, and `corpus_entry(DIR)` puts it in a mixture beside TFDS and generated entries. The manifest
(docs/data.md "Train on your own corpus", field by field) declares the token layout: 8 specials (moma's
fixed ids), the text tokenizer's ids, the image codebook, the audio codebook, in that order; latent images
hold the `IMG` placeholder at each patch position and their vectors beside the tokens.

A record is one document, already in the shared vocabulary (BOS … EOS, media between their markers):
  int32 [3]            token count n, image count m, 1 if the document is text only
  int32 [m], int32 [m] each latent image's first position and patch count
  token_dtype [n]      the tokens
  latent_dtype [Σ, P]  the latent images' patch vectors (latent images only)
Shards are read by index (`ArrayRecordReader.read`), never whole, so host memory does not grow with the
corpus. The manifest is written last, by an atomic rename: a directory without one is no corpus.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
from typing import Sequence

import ml_collections
import numpy as np
import tqdm

from moma.data import vocab as vocab_lib

FORMAT, VERSION = "moma-corpus", 1
MANIFEST = "manifest.json"
TEMPLATE = "corpus"  # the mixture-entry template of a corpus (its `dataset` is the directory)
SPLITS = ("train", "validation")
WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: a read decodes only its document
# Without a validation split in the manifest, every HOLD_OUT-th train document (index % HOLD_OUT ==
# HOLD_OUT - 1) is the validation split and the train split skips it.
HOLD_OUT = 100


@dataclasses.dataclass(frozen=True)
class Layout:
  """The shared vocabulary a corpus is written in: specials, text ids, image codes, audio codes."""

  text_tokenizer: str  # tokenizer spec: bytes | sentencepiece:PATH | hf:PATH
  text_fingerprint: str
  text_vocab_size: int
  image_codebook: int = 0  # discrete image codes (0: none)
  audio_codebook: int = 0
  latent_dim: int = 0  # width P of a latent image's patch vectors (0: no latent images)
  latent_dtype: str = "float32"

  @property
  def used(self) -> int:
    """Ids the layout assigns: specials, text, image codes, audio codes."""
    return self.vocab().used

  @property
  def token_dtype(self) -> str:
    return "uint16" if self.used <= 2**16 else "int32"

  @property
  def modalities(self) -> tuple[str, ...]:
    return ("text",) + (("image",) if self.image_codebook or self.latent_dim else ()) + (
        ("audio",) if self.audio_codebook else ())

  def describe(self) -> str:
    parts = [f"text {self.text_tokenizer} ({self.text_vocab_size} ids)"]
    if self.image_codebook:
      parts.append(f"image {self.image_codebook} codes")
    if self.latent_dim:
      parts.append(f"image latents of width {self.latent_dim}")
    if self.audio_codebook:
      parts.append(f"audio {self.audio_codebook} codes")
    return ", ".join(parts)

  def vocab(self, modalities=(), size: int = 0) -> vocab_lib.Vocab:
    """The `Vocab` of this layout (modalities: the data config's order, default the layout's own),
    padded to `size` (0: exactly the ids used)."""
    exact = vocab_lib.Vocab(tuple(modalities) or self.modalities, self.image_codebook, self.audio_codebook, 0,
                            self.text_vocab_size, self.text_tokenizer, self.text_fingerprint)
    return dataclasses.replace(exact, size=size or exact.used)

  def to_json(self) -> dict:
    vocab = self.vocab()
    specials = {name: i for i, name in enumerate(vocab_lib.SPECIALS)}
    return dict(
        specials=specials,
        text=dict(tokenizer=self.text_tokenizer, fingerprint=self.text_fingerprint,
                  vocab_size=self.text_vocab_size, offset=vocab_lib.TEXT_OFFSET),
        image=dict(codebook_size=self.image_codebook, offset=vocab.image_offset, latent_dim=self.latent_dim,
                   latent_dtype=self.latent_dtype),
        audio=dict(codebook_size=self.audio_codebook, offset=vocab.audio_offset),
        vocab_size=self.used, token_dtype=self.token_dtype)


def layout_of_data_config(config) -> Layout:
  """The layout that the embedded mixture, TFDS and generated entries of a data config are rendered in."""
  vocab = vocab_lib.vocabulary(config, with_corpus=False)
  patches = "image" in config.modalities and config.image_form == "patches"
  return Layout(vocab.text_tokenizer, vocab.text_fingerprint, vocab.text_ids, vocab.image_codes,
                vocab.audio_codes, latent_dim=-1 if patches else 0)  # -1: latents, of the width the
  # images' channels give


def _fail(path: str, message: str):
  raise ValueError(f"corpus {path}: {message}")


def read_manifest(directory: str, field: str) -> dict:
  """The manifest of the corpus in `directory` (`field` names the config field that points there)."""
  path = os.path.join(os.path.expanduser(directory), MANIFEST)
  if not os.path.isfile(path):
    why = "is not a directory" if not os.path.isdir(os.path.dirname(path)) else f"has no {MANIFEST}"
    raise ValueError(f"{field}={directory!r} {why}; make a corpus with `python -m moma.data.convert` (an "
                     "interrupted conversion writes no manifest)")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"corpus {path} is not JSON ({e}); convert the corpus again") from e
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    _fail(path, f"format={manifest.get('format')!r} version={manifest.get('version')!r}: this moma reads "
          f"format {FORMAT!r} version {VERSION}; convert the corpus again")
  return manifest


def layout_of(manifest: dict, path: str) -> Layout:
  """The manifest's layout; raises ValueError naming the manifest field that is missing or inconsistent."""
  try:
    text, image, audio = manifest["text"], manifest["image"], manifest["audio"]
    layout = Layout(text["tokenizer"], text["fingerprint"], int(text["vocab_size"]),
                    int(image["codebook_size"]), int(audio["codebook_size"]), int(image["latent_dim"]),
                    image["latent_dtype"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"corpus {path}: the manifest field {e} is missing or malformed; convert the corpus "
                     "again") from e
  expected = layout.to_json()
  for key in ("specials", "vocab_size", "token_dtype"):
    if manifest.get(key) != expected[key]:
      _fail(path, f"{key}={manifest.get(key)!r} disagrees with the layout ({expected[key]!r})")
  for key in ("text", "image", "audio"):
    if manifest[key]["offset"] != expected[key]["offset"]:
      _fail(path, f"{key}.offset={manifest[key]['offset']} disagrees with the layout "
            f"({expected[key]['offset']}: specials, text ids, image codes, audio codes in that order)")
  if layout.image_codebook and layout.latent_dim:
    _fail(path, "image.codebook_size and image.latent_dim are both set; a corpus holds images as codes or "
          "as latents")
  if layout.latent_dtype not in ("float16", "float32"):
    _fail(path, f"image.latent_dtype={layout.latent_dtype!r} must be 'float16' or 'float32'")
  return layout


def corpus_entry(directory: str, weight: float = 1.0) -> ml_collections.ConfigDict:
  """A mixture entry reading the corpus in `directory` (its layout must agree with the other entries')."""
  return ml_collections.ConfigDict(dict(dataset=directory, template=TEMPLATE, weight=float(weight),
                                        features={}, splits={}, data_dir=""))


def entries(config) -> dict:
  """The mixture a data config trains on: `data.corpus` alone when set, else `data.mixture`."""
  if config.get("corpus"):
    return {"corpus": corpus_entry(config.corpus)}
  return dict(config.mixture.items())


def field_of(name: str, config) -> str:
  return "data.corpus" if config.get("corpus") else f"data.mixture.{name}.dataset"


def manifest_path(config) -> str:
  """The manifest of the data config's first corpus entry."""
  directory = next(e.dataset for e in entries(config).values() if e.template == TEMPLATE and e.weight > 0)
  return os.path.join(directory, MANIFEST)


def layout(config) -> Layout | None:
  """The layout of the corpora in the data config's mixture (None: no corpus). Refuses corpora whose
  layouts disagree with each other or with the mixture's other entries, naming the entry, and a
  `data.text_tokenizer` other than bytes (the default, which a corpus's own tokenizer replaces) that is
  not the corpus's."""
  found, others = None, []
  for name, entry in entries(config).items():
    if entry.weight <= 0:
      continue
    if entry.template != TEMPLATE:
      others.append(name)
      continue
    path = os.path.join(entry.dataset, MANIFEST)
    this = layout_of(read_manifest(entry.dataset, field_of(name, config)), path)
    if found is None:
      found = (name, this)
    elif this != found[1]:
      raise ValueError(f"data.mixture.{name}: corpus {path} has layout {this.describe()}, unlike "
                       f"data.mixture.{found[0]} ({found[1].describe()}); a mixture shares one vocabulary")
  if found is None:
    return None
  name, this = found
  manifest = os.path.join(entries(config)[name].dataset, MANIFEST)
  if others or config.get("text_tokenizer", "bytes") != "bytes":
    theirs = layout_of_data_config(config)
    if (theirs.text_fingerprint, theirs.text_vocab_size) != (this.text_fingerprint, this.text_vocab_size):
      who = f"data.mixture.{others[0]}: its text tokenizer" if others else "data.text_tokenizer"
      raise ValueError(f"{who} {theirs.text_tokenizer!r} (fingerprint {theirs.text_fingerprint}, "
                       f"{theirs.text_vocab_size} ids) is not the one corpus {manifest} was tokenized with, "
                       f"{this.text_tokenizer!r} (fingerprint {this.text_fingerprint}, "
                       f"{this.text_vocab_size} ids); a mixture shares one vocabulary: set "
                       f"--config.data.text_tokenizer={this.text_tokenizer}"
                       + (", or the entry's weight to 0" if others else ""))
    same = (theirs.audio_codebook == this.audio_codebook and theirs.image_codebook == this.image_codebook and
            (theirs.latent_dim == 0) == (this.latent_dim == 0))
    if others and not same:
      raise ValueError(f"data.mixture.{others[0]}: its layout (data.image_levels / data.audio_levels / "
                       f"data.image_form) disagrees with corpus {manifest} ({this.describe()}); a mixture "
                       "shares one vocabulary: set its weight to 0 or convert the corpus to match")
  missing = set(this.modalities) - set(config.modalities)
  if missing:
    raise ValueError(f"data.modalities={tuple(config.modalities)} lacks {sorted(missing)}, which corpus "
                     f"{entries(config)[name].dataset} holds; set --config.data.modalities (and "
                     "config.model.modalities) to include them, e.g. "
                     "configs/mot.py:modalities=text+image+audio")
  if this.latent_dim and config.image_form != "patches":
    raise ValueError(f"data.image_form={config.image_form!r}: corpus {entries(config)[name].dataset} holds "
                     "latent images; set --config.data.image_form=patches (Transfusion)")
  if this.image_codebook and config.image_form == "patches":
    raise ValueError(f"data.image_form='patches': corpus {entries(config)[name].dataset} holds image codes; "
                     "set --config.data.image_form=discrete")
  return this


# Records.


def encode_record(tokens: np.ndarray, images: Sequence, layout: Layout, text_only: bool) -> bytes:
  """One document's record: `tokens` in the shared vocabulary, `images` [(first position, patches [k,
  P])] for latent images."""
  header = np.array([len(tokens), len(images), int(text_only)], np.int32)
  starts = np.array([start for start, _ in images], np.int32)
  counts = np.array([len(patches) for _, patches in images], np.int32)
  parts = [header, starts, counts, np.asarray(tokens).astype(layout.token_dtype)]
  parts += [np.asarray(patches, layout.latent_dtype) for _, patches in images]
  return b"".join(part.tobytes() for part in parts)


def decode_record(record: bytes, layout: Layout):
  """(int32 tokens, [(first position, float32 patches)], text only) of one record."""
  n, m, text_only = np.frombuffer(record, np.int32, 3)
  at = 12 + 8 * int(m)
  placement = np.frombuffer(record, np.int32, 2 * int(m), 12).reshape(2, int(m))
  tokens = np.frombuffer(record, layout.token_dtype, int(n), at).astype(np.int32)
  at += tokens.size * np.dtype(layout.token_dtype).itemsize
  images = []
  for start, count in placement.T.tolist():
    patches = np.frombuffer(record, layout.latent_dtype, count * layout.latent_dim, at)
    images.append((start, patches.reshape(count, layout.latent_dim).astype(np.float32)))
    at += patches.nbytes
  if at != len(record):
    raise ValueError(f"a record of {len(record)} bytes holds {at}")
  return tokens, images, bool(text_only)


# Reading.


class Split:
  """One split of a corpus, read by document index; `len()` is its document count (the Packer's examples)."""

  def __init__(self, directory: str, manifest: dict, layout: Layout, split: str):
    self.layout, self.directory = layout, directory
    splits = manifest.get("splits", {})
    held_out = "validation" not in splits
    if split not in SPLITS:
      raise ValueError(f"split={split!r} is not a split of corpus {directory}; use 'train' or 'validation'")
    info = splits.get("train" if held_out else split)
    path = os.path.join(directory, MANIFEST)
    if not info or not info.get("shards"):
      _fail(path, f"splits.{split} is missing or has no shards")
    self.shards = info["shards"]
    self.paths = [os.path.join(directory, shard["file"]) for shard in self.shards]
    self.counts = np.array([shard["documents"] for shard in self.shards], np.int64)
    self.bounds = np.cumsum(self.counts)
    total = int(self.bounds[-1])
    # Held out: validation document j is train document HOLD_OUT·j + HOLD_OUT − 1; train skips those.
    self.hold_out = (split if held_out else None)
    if not held_out:
      self.size = total
    else:
      self.size = total // HOLD_OUT if split == "validation" else total - total // HOLD_OUT
    if self.size < 1:
      _fail(path, f"splits.train holds {total} documents, too few to hold out a validation split "
            f"(every {HOLD_OUT}th document); convert with --validation_fraction")
    self.longest_media_document = int(info.get("longest_media_document", 0))
    self.text_only_documents = int(info.get("text_only_documents", 0))
    for shard, file in zip(self.shards, self.paths):
      size = os.path.getsize(file) if os.path.isfile(file) else None
      if size != shard.get("bytes"):
        raise ValueError(f"corpus shard {file} is {'missing' if size is None else f'{size} bytes'}, the "
                         f"manifest {path} says {shard.get('bytes')} bytes (splits.{split}.shards); copy it "
                         "again or convert the corpus again")
    self._readers = [None] * len(self.paths)
    self._stats_field = f"{path}: splits.{'train' if held_out else split}"

  def too_long(self, seq_len: int) -> str:
    """The refusal of a `seq_len` shorter than the longest document that may not be cut."""
    return (f"corpus {self._stats_field}.longest_media_document={self.longest_media_document} tokens is "
            f"longer than train.seq_len={seq_len} (a document with an image or audio is never cut); raise "
            f"--config.train.seq_len to >= {self.longest_media_document}")

  def __len__(self) -> int:
    return self.size

  def _reader(self, shard: int):
    if self._readers[shard] is None:
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
      reader = array_record_module.ArrayRecordReader(self.paths[shard], "readahead_buffer_size:0")
      if reader.num_records() != self.counts[shard]:
        raise ValueError(f"corpus shard {self.paths[shard]} holds {reader.num_records()} records, the "
                         f"manifest says {self.counts[shard]} (documents); convert the corpus again")
      self._readers[shard] = reader
    return self._readers[shard]

  def documents(self, indices) -> list:
    """[(int32 tokens, latent images, text only)] of documents `indices`, one read per shard."""
    indices = np.asarray(indices, np.int64)
    if self.hold_out == "validation":
      indices = HOLD_OUT * indices + HOLD_OUT - 1
    elif self.hold_out == "train":
      indices = indices + indices // (HOLD_OUT - 1)
    shards = np.searchsorted(self.bounds, indices, side="right")
    local = indices - (self.bounds[shards] - self.counts[shards])
    out = [None] * len(indices)
    for shard in np.unique(shards).tolist():
      at = np.flatnonzero(shards == shard)
      records = self._reader(shard).read(local[at].tolist())
      for j, record in zip(at.tolist(), records):
        try:
          out[j] = decode_record(record, self.layout)
        except ValueError as e:
          raise ValueError(f"corpus shard {self.paths[shard]}: record {int(local[j])} is damaged ({e}); "
                           "convert the corpus again") from e
    return out


def open_split(directory: str, split: str, field: str) -> Split:
  """One split of the corpus in `directory` (`field`: the config field naming it)."""
  manifest = read_manifest(directory, field)
  directory = os.path.expanduser(directory)
  return Split(directory, manifest, layout_of(manifest, os.path.join(directory, MANIFEST)), split)


# Writing.


def write_shard(path: str, documents, layout: Layout) -> dict:
  """Writes `documents` [(tokens, latent images, text only)] as one shard; returns its manifest entry.
  The same documents give the same bytes."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
  count = tokens = longest = text_only = 0
  try:
    for doc_tokens, images, is_text in documents:
      writer.write(encode_record(doc_tokens, images, layout, is_text))
      count, tokens = count + 1, tokens + len(doc_tokens)
      text_only += is_text
      longest = longest if is_text else max(longest, len(doc_tokens))
  finally:
    writer.close()
  return dict(file=os.path.basename(path), documents=count, tokens=tokens, bytes=os.path.getsize(path),
              longest_media_document=longest, text_only_documents=text_only)


def split_summary(shards: list[dict]) -> dict:
  """A split's manifest entry from its shards' entries."""
  return dict(documents=sum(s["documents"] for s in shards), tokens=sum(s["tokens"] for s in shards),
              longest_media_document=max((s["longest_media_document"] for s in shards), default=0),
              text_only_documents=sum(s["text_only_documents"] for s in shards), shards=shards)


def write_manifest(directory: str, layout: Layout, splits: dict, made_by: dict) -> str:
  """Writes `manifest.json` (atomically: a temporary file renamed) once every shard is written."""
  manifest = dict(format=FORMAT, version=VERSION, **layout.to_json(),
                  splits={name: split_summary(shards) for name, shards in splits.items()}, made_by=made_by)
  path = os.path.join(directory, MANIFEST)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  os.replace(path + ".tmp", path)
  return path


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def write(output: str, shards: dict, write_shard, layout: Layout, made_by: dict, workers: int = 0) -> str:
  """Writes each split's shards (`shards`: split → per shard, what `write_shard(path, it, layout)` writes)
  in parallel processes, then the manifest; returns its path."""
  os.makedirs(output, exist_ok=True)
  manifest = os.path.join(output, MANIFEST)
  if os.path.exists(manifest):
    os.remove(manifest)  # the old corpus is gone from here on; a new one appears only when complete
  tasks = {(split, i): (os.path.join(output, shard_name(split, i, len(runs))), run)
           for split, runs in shards.items() for i, run in enumerate(runs)}
  progress = tqdm.tqdm(total=len(tasks), unit="shard", desc=f"writing {output}", disable=None)
  results = {}
  if workers == 1:
    for key, (path, run) in tasks.items():
      results[key] = write_shard(path, run, layout)
      progress.update()
  else:  # spawned workers: forking a process that runs JAX's threads may deadlock
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers or os.cpu_count(), mp_context=context) as pool:
      futures = {pool.submit(write_shard, path, run, layout): key for key, (path, run) in tasks.items()}
      for future in concurrent.futures.as_completed(futures):
        results[futures[future]] = future.result()
        progress.update()
  progress.close()
  splits = {split: [results[split, i] for i in range(len(runs))] for split, runs in shards.items()}
  return write_manifest(output, layout, splits, made_by)
