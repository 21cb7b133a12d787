"""`data.text_tokenizer` on the mixture's entries (issue 30, item 3): bytes keeps today's batches; a
SentencePiece tokenizer encodes text documents and captions, sizes the vocabulary, packs by the same
rules, decodes captions back, and is recorded so that a run's resume or samples refuse another file."""

import hashlib
import json
import os

import numpy as np
import pytest

from moma import checkpoint
from moma import data
from moma.data import melodies
from moma.data import scenes
from moma.data import sources
from moma.data import tokenizers
from moma.data import vocab as vocab_lib
from tests import tokenizer_fixtures
from tests.test_corpus import jsonl_corpus

# sha256 (first 16 hex digits) of the Packer batches below, computed with the code of commit 385b062,
# before data.text_tokenizer existed (/tmp script: the same `batch_hash`, run on that checkout). Bytes
# must keep every id, segment, position, mask and patch of them.
BEFORE_TEXT_TOKENIZER = {"default": "80fcf52eb2927ca0", "patches": "941d4247ea097101",
                         "validation": "f8aef29b2415c55c"}


def batch_hash(config, split="train", seq_len=256, batch_size=8, steps=3):
  packer = data.Packer(config, split=split, seq_len=seq_len)
  digest = hashlib.sha256()
  for step in range(steps):
    batch = packer.batch(0, step, batch_size)
    for key in sorted(batch):
      digest.update(key.encode())
      digest.update(np.ascontiguousarray(batch[key]).tobytes())
  return digest.hexdigest()[:16]


def make_config(cache_dir, modalities=("text", "image", "audio"), **overrides):
  config = data.default_config(modalities)
  config.cache_dir = cache_dir
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def sentencepiece_spec(tmp_path_factory):
  path = tokenizer_fixtures.train_sentencepiece(tokenizer_fixtures.embedded_prose(400),
                                                str(tmp_path_factory.mktemp("sp")))
  return f"sentencepiece:{path}"


def test_bytes_keeps_every_id_of_todays_batches(data_cache_dir):
  assert batch_hash(make_config(data_cache_dir)) == BEFORE_TEXT_TOKENIZER["default"]
  assert batch_hash(make_config(data_cache_dir, text_tokenizer="bytes"),
                    split="validation") == BEFORE_TEXT_TOKENIZER["validation"]
  patches = make_config(data_cache_dir, ("text", "image"), image_form="patches")
  assert batch_hash(patches) == BEFORE_TEXT_TOKENIZER["patches"]
  assert data.vocab_size(make_config(data_cache_dir)) == 8 + 256 + 256 + 64


def segments(batch, row):
  """(start, end) of each segment of a row."""
  seg = batch["segment"][row]
  starts = np.flatnonzero(np.diff(seg, prepend=0) != 0)
  return [(int(a), int(b)) for a, b in zip(starts, list(starts[1:]) + [len(seg)]) if seg[a] > 0]


def test_sentencepiece_text_ids_fill_the_text_range_and_pack_by_the_same_rules(data_cache_dir,
                                                                               sentencepiece_spec):
  config = make_config(data_cache_dir, text_tokenizer=sentencepiece_spec)
  tokenizer = tokenizers.load(sentencepiece_spec)
  vocab = data.vocabulary(config)
  assert tokenizer.vocab_size == 500
  assert (vocab.text_ids, vocab.image_offset, vocab.size) == (500, 8 + 500, 8 + 500 + 256 + 64)
  packer = data.Packer(config, split="train", seq_len=256)
  image_tokens = {source.name: source.image_tokens for source in packer.sources}
  cut_tails = 0
  for step in range(3):
    batch = packer.batch(0, step, 8, with_source=True)
    tokens = batch["tokens"]
    text = batch["modality"] == 0
    assert (tokens[text] < 8 + 500).all() and (tokens[~text] >= 8 + 500).all()
    assert (batch["segment"] > 0).mean() > 0.97  # rows full (text fills the room media leave)
    for row in range(len(tokens)):
      for start, end in segments(batch, row):
        doc = tokens[row, start:end]
        cut_tails += doc[0] != vocab_lib.BOS
        name = packer.source_names[batch["source"][row, start]]
        for begin, close in ((vocab_lib.BOI, vocab_lib.EOI), (vocab_lib.BOA, vocab_lib.EOA)):
          opens, closes = np.flatnonzero(doc == begin), np.flatnonzero(doc == close)
          assert len(opens) == len(closes), (row, doc)  # media are never cut
          lengths = closes - opens - 1
          assert (lengths == image_tokens[name]).all() if begin == vocab_lib.BOI else (
              (lengths > 0) & (lengths <= config.audio_max_samples)).all()
  assert cut_tails > 0  # text is still cut across rows
  # Text documents are tokens now: far fewer than their bytes (0.55 tokens per byte on held-out prose).
  text_source = next(s for s in packer.sources if s.name == "text")
  docs = sources.render_block(text_source, range(50), [0] * 50, packer.vocab, config)
  chunks = [text_source.examples[i]["text"] for i in range(50)]
  assert sum(len(t) - 2 for t, _ in docs) < 0.75 * sum(len(c) for c in chunks)
  for (doc, _), chunk in zip(docs, chunks):  # cut to data.text_max_bytes before encoding, whole characters
    cut = chunk[:config.text_max_bytes].decode("utf-8", errors="ignore")
    np.testing.assert_array_equal(doc[1:-1], tokenizer.encode(cut) + vocab_lib.TEXT_OFFSET)


def test_sentencepiece_captions_decode_back_to_their_text(data_cache_dir, sentencepiece_spec):
  config = make_config(data_cache_dir, text_tokenizer=sentencepiece_spec)
  packer = data.Packer(config, split="validation", seq_len=256)
  digit_captions = {c.format(name=n) for c in config.captions.image + config.captions.audio +
                    config.captions.image_audio for n in ("zero", "one", "two", "three", "four", "five",
                                                          "six", "seven", "eight", "nine")}
  seen = set()
  for source in packer.sources:
    if "caption" not in source.parts:
      continue
    indices = np.arange(20)
    docs = sources.render_block(source, indices, indices, packer.vocab, config)
    wanted = sources._columns(source, indices).get("caption")  # pylint: disable=protected-access
    for j, (doc, _) in enumerate(docs):
      caption = data.decode_document(doc, config)
      texts = [value for kind, value in caption if kind == "text"]
      assert len(texts) == 1, caption
      if wanted is None:  # digits: rendered from the label
        assert texts[0] in digit_captions
      else:
        want = wanted[j].decode() if isinstance(wanted[j], bytes) else wanted[j]
        assert texts[0] == want
        parse = scenes.parse_caption if "scene" in source.name else melodies.parse_caption
        args = (config.shapes,) if "scene" in source.name else ()
        assert parse(texts[0], *args) == parse(want, *args)
      seen.add(source.name)
  assert {"scene_caption", "caption_melody", "image_caption", "caption_audio"} <= seen


def test_the_tokenizer_fingerprint_is_recorded_and_a_changed_file_refused(data_cache_dir, tmp_path):
  prose = tokenizer_fixtures.embedded_prose(400)
  path = tokenizer_fixtures.train_sentencepiece(prose, str(tmp_path))
  config = make_config(data_cache_dir, text_tokenizer=f"sentencepiece:{path}")
  assert data.text_tokenizer_fingerprint(make_config(data_cache_dir)) == ""  # bytes: runs before it resume
  recorded = data.text_tokenizer_fingerprint(config)
  assert recorded == tokenizers.load(f"sentencepiece:{path}").fingerprint
  config.text_tokenizer_fingerprint = recorded
  workdir = tmp_path / "run"
  workdir.mkdir()
  with open(workdir / "config.json", "w", encoding="utf-8") as f:
    json.dump({"data": config.to_dict()}, f)
  tokenizer_fixtures.train_sentencepiece(prose, str(tmp_path), vocab_size=450)  # the same path, rewritten
  with pytest.raises(ValueError, match=r"data.text_tokenizer='sentencepiece:.*' has fingerprint \w+, but "
                     rf"data.text_tokenizer_fingerprint='{recorded}' was recorded"):
    data.vocabulary(config)  # what moma.sample meets with the run's config.json
  resumed = make_config(data_cache_dir, text_tokenizer=f"sentencepiece:{path}")
  resumed.text_tokenizer_fingerprint = data.text_tokenizer_fingerprint(resumed)
  with pytest.raises(ValueError, match=rf"config.data.text_tokenizer_fingerprint: workdir has '{recorded}'"):
    checkpoint.check_compatible(_run_config(resumed), str(workdir))


def _run_config(data_config):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(data=data_config.to_dict()))


def test_a_corpus_with_another_tokenizer_is_refused_by_name(data_cache_dir, sentencepiece_spec, tmp_path):
  directory = jsonl_corpus(tmp_path, [[{"text": "a red square."}, {"image": {"codes": [1, 2]}}]] * 4)
  mixed = make_config(data_cache_dir, text_tokenizer=sentencepiece_spec)
  mixed.mixture.mine = data.corpus_entry(directory)
  with pytest.raises(ValueError, match=r"data.mixture.\w+: its text tokenizer 'sentencepiece:.*' "
                     r"\(fingerprint \w+, 500 ids\) is not the one corpus .*manifest.json was tokenized "
                     r"with, 'bytes' .* set --config.data.text_tokenizer=bytes, or the entry's weight to 0"):
    data.vocabulary(mixed)
  alone = make_config(data_cache_dir, text_tokenizer=sentencepiece_spec, corpus=directory)
  with pytest.raises(ValueError, match=r"^data.text_tokenizer 'sentencepiece:.*' .* set "
                     r"--config.data.text_tokenizer=bytes$"):
    data.vocabulary(alone)


def test_a_text_tokenizer_that_does_not_exist_is_named(data_cache_dir):
  config = make_config(data_cache_dir, text_tokenizer="sentencepiece:/nowhere/sp.model")
  with pytest.raises(ValueError, match=r"^data.text_tokenizer='sentencepiece:/nowhere/sp.model': "
                     r"/nowhere/sp.model does not exist"):
    data.Packer(config, split="train", seq_len=256)


@pytest.mark.slow
def test_tiny_mot_trains_on_the_mixture_with_sentencepiece_and_samples_decode_with_it(tmp_path, tiny_config):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from moma import train  # pylint: disable=g-import-not-at-top
  path = tokenizer_fixtures.train_sentencepiece(tokenizer_fixtures.embedded_prose(400), str(tmp_path))
  tiny_config.data.text_tokenizer = f"sentencepiece:{path}"
  tiny_config.train.update(steps=60, log_every=10, eval_every=0)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    curve = [row["loss"] for row in map(json.loads, f) if "loss" in row]
  assert curve[-1] < curve[0] - 1.0, curve
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["model"]["vocab_size"] == 8 + 500 + 256 + 64
  assert saved["data"]["text_tokenizer"] == f"sentencepiece:{path}"
  printed = subprocess.run([sys.executable, "-m", "moma.sample", f"--workdir={workdir}", "--prompt=The list",
                            "--num_tokens=20", "--num_samples=1", "--temperature=0"], capture_output=True,
                           text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
  text = printed.splitlines()[1]
  tokenizer = tokenizers.load(f"sentencepiece:{path}")
  assert text.startswith("The list") and len(text) > len("The list") and (
      text == tokenizer.decode(tokenizer.encode(text))), printed
  print(f"\nlosses {curve}; sample: {text!r}")
