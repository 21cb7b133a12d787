"""Block rendering (what the packer uses) against its per-example reference twins, bit for bit."""

import numpy as np
import pytest

from moma import data
from moma.data import melodies
from moma.data import scenes
from moma.data import shapes
from moma.data import sources
from moma.data import vocab as vocab_lib

from test_data import cache_dir, make_config  # pylint: disable=unused-import


@pytest.mark.parametrize("overrides, patch_size", [
    (dict(), 2), (dict(), 0), (dict(image_size=24, max_objects=9, palette=10), 1),
    (dict(image_size=32, min_objects=3, max_objects=16), 2)])
def test_scene_blocks_equal_the_per_scene_renderer(overrides, patch_size):
  knobs = scenes.default_knobs()
  knobs.update(overrides)
  examples = shapes.Examples(knobs, "train", patch_size)
  indices = list(range(300)) + [2**31 - 2]
  block = examples.block(indices)
  feature = "codes" if patch_size else "image"
  assert set(block) == {"caption", feature}
  for j, index in enumerate(indices):
    reference = examples[index]
    assert block["caption"][j] == reference["caption"]
    np.testing.assert_array_equal(block[feature][j], reference[feature])
    assert block[feature][j].dtype == reference[feature].dtype


@pytest.mark.parametrize("max_notes", [2, 4, 8])
def test_melody_blocks_equal_the_per_melody_renderer(max_notes):
  knobs = melodies.default_knobs()
  knobs.max_notes = max_notes
  examples = melodies.Examples(knobs, "validation")
  block = examples.block(range(300))
  for i in range(300):
    assert block["caption"][i] == examples[i]["caption"]
    np.testing.assert_array_equal(block["audio"][i], examples[i]["audio"])


def reference_document(source, index, variant, vocab, config):
  """One document from `source.examples[index]` alone, the plain way (BOS, parts, EOS)."""
  example, pieces, images = source.examples[index], [[data.BOS]], []
  for part in source.parts:
    if part == "image" and config.image_form == "patches":
      image = np.asarray(example[source.roles["image"]])
      if image.ndim == 2 or image.shape[-1] == 1:
        image = np.repeat(image.reshape(image.shape[:2] + (1,)), source.patch_channels, -1)
      patches = vocab_lib.image_patches(image, config.patch_size)
      images.append((sum(map(len, pieces)) + 1, patches))
      pieces += [[data.BOI], [data.IMG] * len(patches), [data.EOI]]
    elif part == "image":
      codes = (np.asarray(example["codes"]) + vocab.image_offset if source.codes_feature
               else vocab.encode_image(example[source.roles["image"]]))
      pieces += [[data.BOI], codes, [data.EOI]]
    elif part == "audio":
      wave = np.asarray(example[source.roles["audio"]]).reshape(-1)
      if wave.dtype.kind in "iu":
        wave = wave.astype(np.float32) / np.iinfo(wave.dtype).max
      pieces += [[data.BOA], vocab.encode_audio(wave[:config.audio_max_samples]), [data.EOA]]
    else:
      if part == "caption" and "caption" not in source.roles:
        label = int(example[source.roles["label"]])
        name = source.label_names[label] if source.label_names else str(label)
        text = source.captions[variant % len(source.captions)].format(name=name)
      else:
        text = example[source.roles[part]]
      text = text.encode() if isinstance(text, str) else bytes(text)
      pieces.append(vocab.encode_text(text[:config.text_max_bytes]))
  return np.concatenate(pieces + [[data.EOS]]).astype(np.int32), images


@pytest.mark.parametrize("form", ["discrete", "patches"])
def test_render_block_equals_the_per_document_reference(cache_dir, form):
  config = make_config(cache_dir, image_form=form)
  packer = data.Packer(config, split="validation", seq_len=512)
  rng = np.random.default_rng(0)
  for source in packer.sources:
    indices = rng.integers(0, min(len(source.examples), 500), 40)
    variants = rng.integers(0, 2**31, 40)
    block = sources.render_block(source, indices, variants, packer.vocab, config)
    for (tokens, images), index, variant in zip(block, indices, variants):
      want_tokens, want_images = reference_document(source, int(index), int(variant), packer.vocab, config)
      np.testing.assert_array_equal(tokens, want_tokens, err_msg=source.name)
      assert tokens.dtype == np.int32
      assert [o for o, _ in images] == [o for o, _ in want_images]
      for (_, got), (_, want) in zip(images, want_images):
        np.testing.assert_array_equal(got, want)


def test_render_block_sizes_change_no_batch(cache_dir):
  """The packer sizes its render blocks from earlier batches; a fresh packer (small blocks) and a used
  one (large blocks) give the same batch."""
  config = make_config(cache_dir)
  used = data.Packer(config, split="train", seq_len=256)
  for step in range(3):
    used.batch(0, step, 8)
  fresh = data.Packer(config, split="train", seq_len=256)
  assert fresh._tokens_per_document != used._tokens_per_document  # pylint: disable=protected-access
  for key, value in fresh.batch(0, 3, 8).items():
    np.testing.assert_array_equal(value, used.batch(0, 3, 8)[key], err_msg=key)
