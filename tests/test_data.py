"""moma.data pipeline: the batch contract, determinism, sharding, packing invariants, decoding."""

import numpy as np
import pytest

from moma import data
from moma.data import builders

SEQ = 320


@pytest.fixture(scope="session")
def cache_dir(data_cache_dir):
  """The session's one build of the embedded datasets (tests/conftest.py)."""
  return data_cache_dir


def make_config(cache_dir, **overrides):
  config = data.default_config(overrides.pop("modalities", ("text", "image", "audio")))
  config.cache_dir = cache_dir
  config.update(overrides)
  return config


def first(config, **kw):
  args = dict(split="train", batch_size=4, seq_len=SEQ, seed=0) | kw
  return next(data.batches(config, **args))


def documents(batch, row):
  """[(tokens, slice)] per document of one row."""
  seg = batch["segment"][row]
  return [(batch["tokens"][row][seg == s], np.flatnonzero(seg == s)) for s in range(1, seg.max() + 1)]


@pytest.mark.parametrize("form", ["discrete", "patches"])
def test_contract(cache_dir, form):
  config = make_config(cache_dir, image_form=form)
  batch = first(config)
  keys = {"tokens", "modality", "segment", "position", "targets", "loss_mask"}
  if form == "patches":
    keys |= {"patches", "image_block"}
  assert set(batch) == keys
  for key, value in batch.items():
    want = np.float32 if key in ("loss_mask", "patches") else np.int32
    assert value.dtype == want, key
    assert value.shape[:2] == (4, SEQ), key
  if form == "patches":
    assert batch["patches"].shape == (4, SEQ, 3 * config.patch_size ** 2)  # grey digits join RGB scenes
  vocab = data.vocabulary(config)
  assert batch["tokens"].min() >= 0 and batch["tokens"].max() < vocab.size
  assert set(np.unique(batch["modality"])) == {0, 1, 2}  # three modalities present
  assert np.array_equal(batch["modality"], vocab.modality_table()[batch["tokens"]])


def test_source_ids_name_each_documents_mixture_entry(cache_dir):
  """`with_source=True` adds the mixture entry of every position's document (−1 on padding) and changes
  nothing else; a document (segment) has one source, and each source's positions hold what it makes."""
  config = make_config(cache_dir)
  packer = data.Packer(config, split="validation", seq_len=SEQ)
  plain, labelled = packer.batch(0, 3, 8), packer.batch(0, 3, 8, with_source=True)
  source = labelled.pop("source")
  for key in plain:
    np.testing.assert_array_equal(labelled[key], plain[key])
  assert source.dtype == np.int32 and source.shape == (8, SEQ)
  np.testing.assert_array_equal(source < 0, plain["segment"] == 0)
  for row in range(8):
    for s in np.unique(plain["segment"][row][plain["segment"][row] > 0]):
      assert len(set(source[row][plain["segment"][row] == s])) == 1
  names = packer.source_names
  assert set(np.unique(source[source >= 0])) <= set(range(len(names)))
  modalities = {name: set(np.unique(plain["modality"][source == i])) for i, name in enumerate(names)}
  assert modalities["text"] == {0} and 1 in modalities["scene_caption"] and 2 in modalities["melody_caption"]


def test_determinism_and_start_step(cache_dir):
  config = make_config(cache_dir)
  kw = dict(split="train", batch_size=3, seq_len=SEQ, seed=7)
  stream = data.batches(config, **kw)
  fresh = [next(stream) for _ in range(4)]
  resumed = next(data.batches(config, **kw, start_step=3))
  again = next(data.batches(config, **kw))
  for key in fresh[0]:
    np.testing.assert_array_equal(resumed[key], fresh[3][key])
    np.testing.assert_array_equal(again[key], fresh[0][key])
  assert not np.array_equal(fresh[0]["tokens"], fresh[1]["tokens"])
  other_seed = next(data.batches(config, **(kw | dict(seed=8))))
  assert not np.array_equal(other_seed["tokens"], fresh[0]["tokens"])


def test_processes_read_disjoint_shares(cache_dir):
  config = make_config(cache_dir)
  for name in list(config.mixture):
    if name != "text":
      del config.mixture[name]
  texts = []
  for process in range(2):
    stream = data.batches(config, split="train", batch_size=8, seq_len=SEQ, seed=0,
                          process_index=process, process_count=2)
    batch = next(stream)
    texts.append({data.decode_text(t, config) for r in range(8) for t, _ in documents(batch, r)})
  assert texts[0] and texts[1] and not texts[0] & texts[1]
  solo = next(data.batches(config, split="train", batch_size=8, seq_len=SEQ, seed=0))
  assert not np.array_equal(solo["tokens"], batch["tokens"])


@pytest.mark.parametrize("form", ["discrete", "patches"])
def test_targets_positions_and_masks(cache_dir, form):
  batch = first(make_config(cache_dir, image_form=form), batch_size=6)
  tokens, seg, pos = batch["tokens"], batch["segment"], batch["position"]
  tgt, mask = batch["targets"], batch["loss_mask"]
  assert np.all(seg > 0)  # text fills every row: no padding
  for row in range(tokens.shape[0]):
    docs = documents(batch, row)
    for i, (doc, at) in enumerate(docs):
      np.testing.assert_array_equal(at, np.arange(at[0], at[0] + len(at)))  # one contiguous run
      np.testing.assert_array_equal(pos[row, at], np.arange(len(at)))  # restart per segment
      # A segment without BOS is a cut text tail (no media); only a row's last segment lacks EOS.
      assert doc[0] == data.BOS or not np.isin(doc, (data.BOI, data.BOA)).any()
      assert doc[-1] == data.EOS or i == len(docs) - 1
      np.testing.assert_array_equal(tgt[row, at[:-1]], doc[1:])  # next token inside the segment
      assert mask[row, at[-1]] == 0  # never across a boundary or a cut
      want = (doc[1:] != data.IMG).astype(np.float32)
      np.testing.assert_array_equal(mask[row, at[:-1]], want)
  assert mask.mean() > (0.7 if form == "patches" else 0.95)  # patches have no cross-entropy


def test_text_cut_across_rows_continues_as_a_new_segment(cache_dir):
  """Text only: a cut document's head ends row r, its tail (no BOS, position 0, its own segment) opens
  row r+1, and head + tail is one dataset document."""
  config = make_config(cache_dir)
  for name in list(config.mixture):
    if name != "text":
      del config.mixture[name]
  batch = first(config, batch_size=8)
  chunks = {data.decode_text(doc[:config.text_max_bytes], config) for doc in _text_documents(cache_dir)}
  cuts = 0
  for row in range(7):
    head, _ = documents(batch, row)[-1]
    tail, tail_at = documents(batch, row + 1)[0]
    if head[-1] == data.EOS:
      continue
    cuts += 1
    assert head[0] == data.BOS and tail[0] != data.BOS and tail[-1] == data.EOS
    assert batch["position"][row + 1, tail_at[0]] == 0
    assert batch["segment"][row, -1] != 0 and batch["loss_mask"][row, -1] == 0
    assert data.decode_text(np.concatenate([head, tail]), config) in chunks
  assert cuts > 0


def _text_documents(cache_dir):
  vocab = data.vocabulary(data.default_config())
  examples = data.prepare("moma_text", cache_dir).as_data_source("train")
  return [vocab.encode_text(examples[i]["text"]) for i in range(len(examples))]


def test_media_only_mixture_defers_instead_of_cutting(cache_dir):
  config = make_config(cache_dir)
  for name in list(config.mixture):
    if config.mixture[name].template == "text":
      del config.mixture[name]
  batch = first(config, batch_size=6)
  for row in range(6):
    for doc, _ in documents(batch, row):
      assert doc[0] == data.BOS and doc[-1] == data.EOS  # whole documents only


def test_text_round_trip():
  vocab = data.vocabulary(data.default_config())
  text = "Mixture of Transformers — naïve façade ✓"
  tokens = vocab.encode_text(text)
  assert tokens.min() >= data.TEXT_OFFSET and len(tokens) == len(text.encode())
  assert vocab.decode_text(np.concatenate([[data.BOS], tokens, [data.EOS, data.PAD]])) == text


@pytest.mark.parametrize("levels", [17, 4])
def test_image_codes_decode_within_quantisation(levels):
  config = data.default_config()
  config.image_levels = levels
  vocab = data.vocabulary(config)
  image = np.random.default_rng(0).integers(0, 256, (8, 8, 1)).astype(np.uint8)
  tokens = vocab.encode_image(image)
  assert tokens.min() >= vocab.image_offset and tokens.max() < vocab.audio_offset
  back = vocab.decode_image(tokens, image.shape)
  assert np.abs(back.astype(int) - image).max() <= 255 / (levels - 1) / 2 + 1


def _digit_images(cache_dir):
  examples = data.prepare("moma_digits", cache_dir).as_data_source("train")
  return {(examples[i]["image"].tobytes()): int(examples[i]["label"]) for i in range(len(examples))}


@pytest.mark.parametrize("form", ["discrete", "patches"])
def test_images_in_batches_are_dataset_images_with_their_caption(cache_dir, form):
  config = make_config(cache_dir, image_form=form)
  for name in list(config.mixture):
    if config.mixture[name].dataset != "moma_digits":
      del config.mixture[name]
  batch = first(config, batch_size=6)
  images = _digit_images(cache_dir)
  seen = 0
  for row in range(6):
    for doc, at in documents(batch, row):
      parts = data.decode_document(doc, config, patches=batch.get("patches", [None])[row][at]
                                   if form == "patches" else None, image_shape=(8, 8, 1))
      kinds = dict(parts)
      if "image" in kinds:
        label = images[kinds["image"].tobytes()]  # lossless at 17 levels / exact patches
        assert builders.DIGIT_NAMES[label] in kinds["text"]
        seen += 1
  assert seen > 0
  if form == "patches":
    blocks = batch["image_block"]
    assert np.all((blocks > 0) == (batch["tokens"] == data.IMG))
    assert np.all(batch["patches"][blocks == 0] == 0)


def test_two_modality_layout(cache_dir):
  config = make_config(cache_dir, modalities=("text", "image"))
  assert all("audio" not in entry.template for entry in config.mixture.values())
  batch = first(config)
  assert set(np.unique(batch["modality"])) == {0, 1}
  assert data.vocab_size(config) == data.vocab_size(make_config(cache_dir)) - config.audio_levels


def test_audio_codes_round_trip_and_dtmf_frequencies(cache_dir):
  config = data.default_config()
  config.audio_levels = 256
  vocab = data.vocabulary(config)
  wave = builders.dtmf_tone(5, np.random.default_rng(0))
  back = vocab.decode_audio(vocab.encode_audio(wave))
  assert np.abs(back - wave).max() < 0.02  # μ-law step near |x| ~ 0.5 at 256 levels
  n = 4096
  spectrum = np.abs(np.fft.rfft(np.resize(wave, n)))
  freqs = np.fft.rfftfreq(n, 1 / builders.SAMPLE_RATE)
  peaks = sorted(freqs[np.argsort(spectrum)[-2:]])
  for found, want in zip(peaks, builders.DTMF_HZ[5]):
    assert abs(found - want) < 40
