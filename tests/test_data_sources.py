"""moma.data sources: named TFDS datasets through mock data, the build, and one clear error per bad field."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from moma import data
from moma.data import builders

from test_data import SEQ, cache_dir  # pylint: disable=unused-import  (the session cache fixture)


def only(config, **entries):
  config.mixture = {}
  for name, entry in entries.items():
    config.mixture[name] = entry
  return config


def test_named_tfds_datasets_through_mock_data(tmp_path):
  config = data.default_config(("text", "image"))
  config.cache_dir = str(tmp_path)
  only(config,
       mnist=data.mixture_entry("mnist", "caption_image", 1.0, dict(image="image", label="label"),
                                splits=dict(validation="test")),
       reviews=data.mixture_entry("imdb_reviews", "text", 1.0, dict(text="text")))
  with tfds.testing.mock_data(num_examples=12):
    batch = next(data.batches(config, split="validation", batch_size=4, seq_len=1024, seed=0))
  seg, tokens = batch["segment"], batch["tokens"]
  vocab = data.vocabulary(config)
  assert set(np.unique(batch["modality"][seg > 0])) == {0, 1}
  image_tokens = (tokens >= vocab.image_offset) & (tokens < vocab.audio_offset)
  assert image_tokens.sum() % (28 * 28) == 0 and image_tokens.sum() > 0  # whole 28×28 images
  assert np.array_equal(batch["loss_mask"][:, :-1] > 0, (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0))


def test_mock_images_as_patches(tmp_path):
  config = data.default_config(("text", "image"))
  config.update(cache_dir=str(tmp_path), image_form="patches", patch_size=4)
  only(config, mnist=data.mixture_entry("mnist", "image_caption", 1.0,
                                        dict(image="image", label="label")))
  with tfds.testing.mock_data(num_examples=6):
    batch = next(data.batches(config, split="train", batch_size=2, seq_len=128, seed=1))
  assert batch["patches"].shape == (2, 128, 16)
  assert np.all(batch["image_block"][batch["tokens"] == data.IMG] > 0)
  assert np.abs(batch["patches"]).max() <= 1.0


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.mixture.text.update(dataset="no_such_dataset_xyz"), "data.mixture.text.dataset"),
    (lambda c: c.mixture.text.update(template="poem"), "data.mixture.text.template"),
    (lambda c: c.mixture.text.update(weight=-1.0), "data.mixture.text.weight"),
    (lambda c: [e.update(weight=0.0) for e in c.mixture.values()], "weights are all zero"),
    (lambda c: c.update(image_levels=300), "data.image_levels"),
    (lambda c: c.update(vocab_size=100), "data.vocab_size"),
    (lambda c: c.update(image_form="pixels"), "data.image_form"),
    (lambda c: c.update(modalities=("text", "image")), "data.mixture.audio_caption.template"),
    (lambda c: c.mixture.image_caption.features.update(image="pixels"),
     "data.mixture.image_caption.features.image"),
    (lambda c: c.update(cache_dir=c.cache_dir + "/moma_text/1.0.0/features.json/sub"),
     "data.cache_dir"),
])
def test_bad_fields_name_themselves(cache_dir, edit, field):
  config = data.default_config()
  config.cache_dir = cache_dir
  edit(config)
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    data.batches(config, split="train", batch_size=2, seq_len=SEQ, seed=0)


def test_seq_len_must_hold_the_longest_document(cache_dir):
  config = data.default_config()
  config.cache_dir = cache_dir
  with pytest.raises(ValueError, match="seq_len=200"):
    data.batches(config, split="train", batch_size=2, seq_len=200, seed=0)
  with pytest.raises(ValueError, match="split="):
    data.batches(config, split="test", batch_size=2, seq_len=SEQ, seed=0)


def test_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
  def broken(self, validation):
    yield "a/0", {"text": "half", "topic": "a"}
    raise RuntimeError("interrupted")

  monkeypatch.setattr(builders.MomaText, "_generate_examples", broken)
  with pytest.raises(RuntimeError, match="interrupted"):
    data.prepare("moma_text", str(tmp_path))
  assert not (tmp_path / "moma_text" / "1.0.0").exists()
  monkeypatch.undo()
  builder = data.prepare("moma_text", str(tmp_path))
  assert builder.is_prepared() and builder.info.splits["train"].num_examples > 1000


def test_build_is_deterministic(cache_dir, tmp_path):
  again = data.prepare("moma_digits", str(tmp_path)).as_data_source("train")
  cached = data.prepare("moma_digits", cache_dir).as_data_source("train")
  for i in (0, 17, len(cached) - 1):
    for key in ("image", "label", "audio"):
      np.testing.assert_array_equal(again[i][key], cached[i][key])
