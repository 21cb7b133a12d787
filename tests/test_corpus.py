"""Records corpora (moma.data.corpus, moma.data.convert): the format, conversion from JSONL and from the
embedded mixture, training on `data.corpus`, and bad input refused in one line naming the file and field."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moma import data
from moma import steps
from moma import train
from moma.data import convert
from moma.data import corpus
from moma.data import tokenizers
from tests import tokenizer_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(directory, documents, name="docs.jsonl"):
  path = os.path.join(directory, name)
  with open(path, "w", encoding="utf-8") as f:
    for parts in documents:
      f.write(json.dumps({"parts": parts}) + "\n")
  return path


def jsonl_corpus(tmp_path, documents, **kw):
  """Converts `documents` (lists of spans) to a corpus in tmp_path/corpus; returns its directory."""
  source = tmp_path / "in"
  source.mkdir(exist_ok=True)
  write_jsonl(str(source), documents)
  args = dict(text_tokenizer="bytes", image_codebook=16, audio_codebook=8, latent_dim=0,
              latent_dtype="float32", shards=2, validation_fraction=0.0, workers=1) | kw
  output = str(tmp_path / "corpus")
  convert.from_jsonl(str(source / "*.jsonl"), output, **args)
  return output


def corpus_config(directory, modalities=("text", "image", "audio"), **overrides):
  config = data.default_config(modalities)
  config.corpus = directory
  config.update(overrides)
  return config


MIXED = [
    [{"text": "a red square."}, {"image": {"codes": [1, 2, 3, 15]}}, {"audio": {"codes": [0, 7]}}],
    [{"text": "plain text, é."}],
    [{"image": {"codes": "codes.npy"}}, {"text": "from a file"}],
]


def test_jsonl_documents_are_read_back_in_the_shared_vocabulary(tmp_path):
  (tmp_path / "in").mkdir()
  np.save(tmp_path / "in" / "codes.npy", np.array([4, 5], np.int32))
  directory = jsonl_corpus(tmp_path, MIXED * 40)
  manifest = json.loads((tmp_path / "corpus" / corpus.MANIFEST).read_text())
  assert manifest["image"] == dict(codebook_size=16, offset=264, latent_dim=0, latent_dtype="float32")
  assert manifest["audio"]["offset"] == 280 and manifest["vocab_size"] == 288
  assert manifest["splits"]["train"]["documents"] == 120 and len(manifest["splits"]["train"]["shards"]) == 2
  split = corpus.open_split(directory, "train", "data.corpus")
  assert len(split) == 120 - 1  # no validation split: every 100th document is held out
  assert len(corpus.open_split(directory, "validation", "data.corpus")) == 1
  tokens, images, text_only = split.documents([0])[0]
  text = list(b"a red square.")
  want = [data.BOS] + [t + 8 for t in text] + [data.BOI, 265, 266, 267, 279, data.EOI, data.BOA, 280, 287,
                                               data.EOA, data.EOS]
  assert tokens.tolist() == want and images == [] and not text_only
  assert split.documents([1])[0][2]  # text only: the packer may cut it
  assert split.documents([2])[0][0][:5].tolist() == [data.BOS, data.BOI, 268, 269, data.EOI]
  vocab = data.vocabulary(corpus_config(directory))
  assert (vocab.size, vocab.image_offset, vocab.audio_offset) == (288, 264, 280)
  assert vocab.modality_table()[[9, 270, 284, data.BOI]].tolist() == [0, 1, 2, 0]


def test_conversion_is_byte_identical_on_rerun_and_parallel(tmp_path):
  first = jsonl_corpus(tmp_path, [[{"text": f"document {i}"}] for i in range(50)], shards=3, workers=2,
                       validation_fraction=0.2)
  shards = {name: (tmp_path / "corpus" / name).read_bytes() for name in os.listdir(first)
            if name.endswith(".array_record")}
  assert len(shards) == 4  # 3 train + 1 validation
  jsonl_corpus(tmp_path, [[{"text": f"document {i}"}] for i in range(50)], shards=3, workers=1,
               validation_fraction=0.2)
  for name, content in shards.items():
    assert (tmp_path / "corpus" / name).read_bytes() == content, name


def test_from_mixture_corpus_holds_the_mixtures_documents_and_packs_like_it(tmp_path, data_cache_dir):
  """--from_mixture writes the documents the mixture's packer draws (equal tokens and cut rules); a
  packer on the corpus then obeys the batch contract, depends on (seed, step) only, and gives
  processes disjoint documents."""
  from configs import mot
  config = mot.get_config("size=tiny")
  config.data.cache_dir = data_cache_dir
  convert.from_mixture(config, str(tmp_path), documents=300, shards=3, validation_fraction=0.1, workers=1)
  want = convert.mixture_documents(config.data, "train", config.train.seq_len, 300)
  got = corpus.open_split(str(tmp_path), "train", "data.corpus").documents(range(300))
  for (want_tokens, _, want_cut), (tokens, images, cut) in zip(want, got):
    np.testing.assert_array_equal(tokens, want_tokens)
    assert (cut, images) == (want_cut, [])
  data_config = corpus_config(str(tmp_path), cache_dir=data_cache_dir)
  assert data.vocab_size(data_config) == data.vocab_size(config.data)
  packer = data.Packer(data_config, split="train", seq_len=256)
  batch = packer.batch(0, 3, 4)
  again = data.Packer(data_config, split="train", seq_len=256).batch(0, 3, 4)
  for key in batch:
    np.testing.assert_array_equal(batch[key], again[key])
  assert batch["loss_mask"].mean() > 0.9  # rows full: text cut across rows
  np.testing.assert_array_equal(batch["modality"], packer.modality_table[batch["tokens"]])
  assert set(np.unique(batch["modality"])) == {0, 1, 2}
  read = [set(), set()]
  for p in range(2):
    share = data.Packer(data_config, split="train", seq_len=256, process_index=p, process_count=2)
    documents = share.sources[0].examples.documents
    share.sources[0].examples.documents = lambda i, p=p, documents=documents: (
        read[p].update(np.asarray(i).tolist()) or documents(i))
    share.batch(0, 0, 4)
  assert read[0] and read[1] and not read[0] & read[1]
  assert data.Packer(data_config, split="validation", seq_len=256).batch(0, 0, 2)["tokens"].any()


def test_from_transfusion_mixture_latents_are_its_patches(tmp_path, data_cache_dir):
  """A Transfusion mixture's images become latent images of the mixture's patch width, equal to its
  patches, and the corpus packer gives the batch the same width."""
  from configs import transfusion
  config = transfusion.get_config("size=tiny")
  config.data.cache_dir = data_cache_dir
  convert.from_mixture(config, str(tmp_path), documents=60, shards=1, validation_fraction=0, workers=1)
  manifest = json.loads((tmp_path / corpus.MANIFEST).read_text())
  patch_dim = data.Packer(config.data, split="train", seq_len=config.train.seq_len).patch_dim
  assert manifest["image"]["latent_dim"] == patch_dim and manifest["image"]["codebook_size"] == 0
  want = convert.mixture_documents(config.data, "train", config.train.seq_len, 60)
  got = corpus.open_split(str(tmp_path), "train", "data.corpus").documents(range(60))
  assert any(images for _, images, _ in want)
  for (want_tokens, want_images, _), (tokens, images, _) in zip(want, got):
    np.testing.assert_array_equal(tokens, want_tokens)
    assert [start for start, _ in images] == [start for start, _ in want_images]
    for (_, patches), (_, want_patches) in zip(images, want_images):
      np.testing.assert_array_equal(patches, want_patches)
  assert data.Packer(corpus_config(str(tmp_path), ("text", "image"), image_form="patches"), split="train",
                     seq_len=config.train.seq_len).patch_dim == patch_dim


def test_latent_images_fill_the_patches_of_the_batch(tmp_path):
  latents = np.linspace(-1, 1, 4 * 12, dtype=np.float32).reshape(4, 12)
  (tmp_path / "in").mkdir()
  np.save(tmp_path / "in" / "latents.npy", latents)
  docs = [[{"text": "an image:"}, {"image": {"latents": "latents.npy"}}],
          [{"image": {"latents": latents[:2].tolist()}}]] * 20
  directory = jsonl_corpus(tmp_path, docs, image_codebook=0, latent_dim=12)
  config = corpus_config(directory, image_form="patches")
  packer = data.Packer(config, split="train", seq_len=64)
  assert packer.patch_dim == 12
  batch = packer.batch(0, 0, 2)
  at = batch["tokens"] == data.IMG
  assert at.any() and (batch["image_block"][at] > 0).all()
  assert (batch["loss_mask"][:, :-1][at[:, 1:]] == 0).all()  # no cross-entropy on patch placeholders
  rows = batch["patches"][at]
  assert {tuple(r) for r in rows} <= {tuple(r) for r in latents}
  assert np.abs(batch["patches"][~at]).max() == 0


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_a_tokenizer_corpus_holds_its_ids_and_decodes_with_it(tmp_path, kind):
  prose = tokenizer_fixtures.embedded_prose(120)
  train_tokenizer = (tokenizer_fixtures.train_sentencepiece if kind == "sentencepiece"
                     else tokenizer_fixtures.train_hf_bpe)
  path = train_tokenizer(prose, str(tmp_path))
  tokenizer = tokenizers.load(f"{kind}:{path}")
  directory = jsonl_corpus(tmp_path, [[{"text": text}, {"image": {"codes": [1]}}] for text in prose[:20]],
                           text_tokenizer=f"{kind}:{path}", audio_codebook=0)
  vocab = data.vocabulary(corpus_config(directory, modalities=("text", "image")))
  assert vocab.image_offset == 8 + tokenizer.vocab_size and vocab.size == 8 + tokenizer.vocab_size + 16
  tokens = corpus.open_split(directory, "train", "data.corpus").documents([3])[0][0]
  np.testing.assert_array_equal(tokens[1:-4], tokenizer.encode(prose[3]) + 8)
  assert vocab.decode_text(tokens) == tokenizer.decode(tokenizer.encode(prose[3]))
  np.testing.assert_array_equal(vocab.encode_text("the list"), tokenizer.encode("the list") + 8)


def test_a_tokenizer_file_that_does_not_exist_is_named(tmp_path):
  with pytest.raises(ValueError, match=r"--text_tokenizer='sentencepiece:/nowhere/sp.model': "
                     "/nowhere/sp.model does not exist"):
    jsonl_corpus(tmp_path, [[{"text": "x"}]], text_tokenizer="sentencepiece:/nowhere/sp.model")
  assert not (tmp_path / "corpus" / corpus.MANIFEST).exists()


# Bad input: one line naming the file and the field; convert writes no manifest, training writes nothing.


@pytest.mark.parametrize("parts, field", [
    ([{"image": {"codes": [3, 16]}}], "parts[0].image.codes holds code 16, outside [0, --image_codebook=16)"),
    ([{"audio": {"codes": [-1]}}], "parts[0].audio.codes holds code -1"),
    ([{"text": "x"}, {"video": {"codes": [1]}}], "parts[1]: unknown span kind 'video'"),
    ([{"image": {"latents": [[0.5]]}}], "parts[0].image.latents: shape (1, 1)"),
    ([{"image": {"codes": "missing.npy"}}], "parts[0].image.codes: "),
])
def test_bad_jsonl_names_file_line_and_field_and_writes_no_manifest(tmp_path, parts, field):
  with pytest.raises(ValueError) as e:
    jsonl_corpus(tmp_path, [[{"text": "fine"}], parts])
  message = str(e.value)
  assert f"docs.jsonl:2: {field}" in message.replace(str(tmp_path / "in") + "/", "") and "\n" not in message
  assert not (tmp_path / "corpus" / corpus.MANIFEST).exists()


@pytest.fixture
def small_corpus(tmp_path):
  return jsonl_corpus(tmp_path, MIXED[:2] * 100)


def test_missing_or_truncated_shard_is_named(small_corpus):
  shard = os.path.join(small_corpus, corpus.shard_name("train", 1, 2))
  content = open(shard, "rb").read()
  with open(shard, "wb") as f:
    f.write(content[:len(content) // 2])
  with pytest.raises(ValueError, match=f"corpus shard {shard} is {len(content) // 2} bytes.*splits.train"):
    data.Packer(corpus_config(small_corpus), split="train", seq_len=256)
  os.remove(shard)
  with pytest.raises(ValueError, match=f"corpus shard {shard} is missing"):
    data.Packer(corpus_config(small_corpus), split="train", seq_len=256)


def test_layout_disagreements_are_refused_naming_the_entry(small_corpus, tmp_path):
  mixed = data.default_config()
  mixed.mixture.mine = corpus.corpus_entry(small_corpus, weight=2.0)
  with pytest.raises(ValueError, match=r"data.mixture.\w+: its layout .* disagrees with corpus "
                     r".*manifest.json \(text bytes \(256 ids\), image 16 codes, audio 8 codes\)"):
    data.vocabulary(mixed)
  with pytest.raises(ValueError, match=r"data.modalities=\('text', 'image'\) lacks \['audio'\]"):
    data.vocabulary(corpus_config(small_corpus, modalities=("text", "image")))
  with pytest.raises(ValueError, match="data.image_form='patches': corpus .* holds image codes"):
    data.vocabulary(corpus_config(small_corpus, image_form="patches"))
  with pytest.raises(ValueError, match=f"data.corpus='{tmp_path}' has no manifest.json"):
    data.vocabulary(corpus_config(str(tmp_path)))
  with pytest.raises(ValueError, match="model.vocab_size=100 is smaller than the 288 ids of corpus"):
    data.check_model_vocab(corpus_config(small_corpus), 100)


def test_a_document_that_may_not_be_cut_must_fit_seq_len(small_corpus):
  with pytest.raises(ValueError, match=r"manifest.json: splits.train.longest_media_document=\d+ tokens is "
                     "longer than train.seq_len=8"):
    data.Packer(corpus_config(small_corpus), split="train", seq_len=8)


def test_training_refuses_a_bad_corpus_in_one_line_and_writes_nothing(small_corpus, tmp_path):
  os.remove(os.path.join(small_corpus, corpus.shard_name("train", 0, 2)))
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "moma.main", "--config=configs/mot.py:size=tiny", f"--workdir={workdir}",
       f"--config.data.corpus={small_corpus}"], cwd=REPO, capture_output=True, text=True, check=False,
      env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})  # one device: no mesh warning
  assert result.returncode == 1, result.stderr
  assert result.stderr.count("\n") == 1 and "train-00000-of-00002.array_record is missing" in result.stderr
  assert not workdir.exists()


def test_convert_cli_refuses_in_one_line(tmp_path):
  write_jsonl(str(tmp_path), [[{"image": {"codes": [300]}}]])
  result = subprocess.run(
      [sys.executable, "-m", "moma.data.convert", f"--input={tmp_path}/*.jsonl", f"--output={tmp_path}/c",
       "--image_codebook=256", "--workers=1"], cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 1
  assert result.stderr == (f"error: {tmp_path}/docs.jsonl:1: parts[0].image.codes holds code 300, outside "
                           "[0, --image_codebook=256)\n")
  assert not os.path.exists(f"{tmp_path}/c/{corpus.MANIFEST}")


# Training.


def test_the_trainer_takes_its_vocabulary_and_batches_from_the_corpus(tmp_path, tiny_config):
  """The trainer's config resolution and host batches on `data.corpus` (the slow test below trains)."""
  convert.from_mixture(tiny_config, str(tmp_path), documents=200, shards=2, validation_fraction=0, workers=1)
  tiny_config.data.corpus = str(tmp_path)
  config = train.resolve_config(tiny_config)
  assert config.model.vocab_size == 584
  batch = train.host_batches(config, "train")(5)
  steps.model_module(config).validate_batch(batch, model_config=config.model)
  assert batch["tokens"].shape == (config.train.batch_size, config.train.seq_len)


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [row["loss"] for row in map(json.loads, f) if "loss" in row]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_a_tokenizer_corpus_trains_tiny_mot_and_samples_decode_with_its_tokenizer(tmp_path, tiny_config,
                                                                                  kind):
  prose = tokenizer_fixtures.embedded_prose(1000)
  trainers = dict(sentencepiece=tokenizer_fixtures.train_sentencepiece, hf=tokenizer_fixtures.train_hf_bpe)
  path = trainers[kind](prose[:400], str(tmp_path))
  directory = jsonl_corpus(tmp_path, [[{"text": text}] for text in prose], text_tokenizer=f"{kind}:{path}",
                           image_codebook=0, audio_codebook=0, validation_fraction=0.05)
  tiny_config.data.corpus = directory
  tiny_config.train.update(steps=60, log_every=10, eval_every=0)
  train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  curve = losses(str(tmp_path / "run"))
  assert curve[-1] < curve[0] - 1.0, curve
  from moma import sample
  documents = sample.sample(str(tmp_path / "run"), prompt="The list", num_tokens=20, num_samples=1,
                            temperature=0)
  text = documents[0][0][1]
  tokenizer = tokenizers.load(f"{kind}:{path}")
  assert text.startswith("The list") and text == tokenizer.decode(tokenizer.encode(text))


@pytest.mark.slow
def test_a_latent_image_corpus_trains_the_transfusion_mot(tmp_path, data_cache_dir):
  from configs import transfusion
  config = transfusion.get_config("size=tiny")
  config.data.cache_dir = data_cache_dir
  config.train.update(steps=40, log_every=10, eval_every=0, progress_bar=False)
  convert.from_mixture(config, str(tmp_path / "corpus"), documents=4000, shards=2, validation_fraction=0.05)
  config.data.corpus = str(tmp_path / "corpus")
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  curve = losses(str(tmp_path / "run"))
  assert metrics["loss/image_diffusion"] > 0 and curve[-1] < curve[0], curve


@pytest.mark.slow
def test_corpus_from_mixture_trains_like_the_mixture(tmp_path, tiny_config):
  """The tiny MoT, 60 steps, on the mixture and on a corpus of 20,000 of its documents: both losses fall
  alike (the corpus draws its documents uniformly, so the batches differ; the documents are equal, as
  test_from_mixture_corpus_holds_the_mixtures_documents_and_packs_like_it checks)."""
  tiny_config.train.update(steps=60, log_every=10, eval_every=60, eval_steps=4)
  mixture = train.train_and_evaluate(tiny_config, str(tmp_path / "mixture"))
  convert.from_mixture(tiny_config, str(tmp_path / "corpus"), documents=20000, shards=4,
                       validation_fraction=0.05)
  tiny_config.data.corpus = str(tmp_path / "corpus")
  on_corpus = train.train_and_evaluate(tiny_config, str(tmp_path / "corpus_run"))
  print(f"\nmixture: train loss {mixture['loss']:.4f}, eval {mixture['eval/loss']:.4f}; corpus: train loss "
        f"{on_corpus['loss']:.4f}, eval {on_corpus['eval/loss']:.4f}")
  assert abs(on_corpus["loss"] - mixture["loss"]) < 0.3, (on_corpus, mixture)
