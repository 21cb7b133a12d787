"""The generated datasets: scenes of shapes (exact evaluators, codes, knobs) and captioned melodies."""

import numpy as np
import pytest

from moma import data
from moma.data import melodies
from moma.data import scenes
from moma.data import shapes

from test_data import SEQ, cache_dir, documents, make_config  # pylint: disable=unused-import


def knobs(**overrides):
  config = scenes.default_knobs()
  config.update(overrides)
  return config


def random_scenes(config, n, seed=0):
  rng = np.random.default_rng(seed)
  return [scenes.random_scene(config, rng.random(scenes.scene_draws(config)).tolist()) for _ in range(n)]


@pytest.mark.parametrize("overrides, n", [
    (dict(), 1000),
    (dict(image_size=24, max_objects=9, palette=10), 200),
    (dict(image_size=32, min_objects=16, max_objects=16), 10),
])
def test_evaluators_round_trip_exactly(overrides, n):
  config = knobs(**overrides)
  for scene in random_scenes(config, n):
    image, codes = shapes.render(scene, config, 2)
    assert shapes.detect(image, config) == scene  # render → detect = scene
    text = scenes.caption(scene, config)
    assert scenes.parse_caption(text, config) == scene  # scene → caption → parse = scene
    assert len(text) <= scenes.max_caption_bytes(config)
    np.testing.assert_array_equal(shapes.decode_codes(codes, config, 2), image)  # lossless codes
    assert codes.max() < shapes.num_codes(config, 2)


def test_scenes_hold_counts_relations_and_every_attribute():
  drawn = random_scenes(knobs(), 1000)
  captions = [scenes.caption(s, knobs()) for s in drawn]
  assert any(" is " in c for c in captions) and any(c.startswith("two ") for c in captions)
  for field in scenes.Shape._fields:
    assert len({getattr(shape, field) for scene in drawn for shape in scene}) > 1, field
  assert {len(s) for s in drawn} == {1, 2, 3}


def test_rendering_is_deterministic_by_seed_split_and_index():
  train = shapes.Examples(knobs(), "train", 2)
  again = shapes.Examples(knobs(), "train", 2)
  for i in (0, 1, 12345, 2**31 - 2):
    for key in ("image", "codes"):
      np.testing.assert_array_equal(train[i][key], again[i][key])
    assert train[i]["caption"] == again[i]["caption"]
  validation = shapes.Examples(knobs(), "validation", 2)
  other_seed = shapes.Examples(knobs(seed=1), "train", 2)
  assert [train[i]["caption"] for i in range(20)] != [validation[i]["caption"] for i in range(20)]
  assert [train[i]["caption"] for i in range(20)] != [other_seed[i]["caption"] for i in range(20)]


def test_detector_and_parser_refuse_what_is_not_a_scene():
  config = knobs()
  scene = (scenes.Shape("circle", "red", "large", 0, 1), scenes.Shape("cross", "blue", "small", 1, 0))
  image = shapes.render(scene, config)
  assert shapes.detect(image, config) == scene
  stray = image.copy()
  stray[15, 15] = image[2, 10]  # one red pixel far from any shape
  assert shapes.detect(stray, config) is None
  shifted = np.roll(image, 1, axis=1)  # shapes off their cell positions
  assert shapes.detect(shifted, config) is None
  text = scenes.caption(scene, config)
  assert text == ("a large red circle at top right; a small blue cross at bottom left; "
                  "the red circle is above and right of the blue cross.")
  for bad in (text.replace("red", "pink"), text.replace("above", "below"),
              text.replace("a small", "two small"), text[:-1]):
    with pytest.raises(ValueError, match="caption"):
      scenes.parse_caption(bad, config)


def _shapes(**knobs):
  return lambda c: c.shapes.update(knobs)


@pytest.mark.parametrize("mutate, message", [
    (_shapes(texture="rough"), r"data\.shapes\.texture is not a scene attribute; use one of"),
    (lambda c: c.update(image_levels=64), r"data\.shapes\.palette=6 needs 91 image codes at data\.patch_size=2, "
     r"more than data\.image_levels=64; lower the palette or raise data\.image_levels"),
    (_shapes(palette=11), r"data\.shapes\.palette=11: use 1\.\.10 colours"),
    (lambda c: c.update(image_form="patches", patch_size=3), r"data\.patch_size=3 does not divide the \(\d+, \d+\) "
     r"images of data\.mixture\.\w+; set --config\.data\.patch_size to a divisor"),
    (lambda c: (c.update(image_form="patches", patch_size=16), c.shapes.update(image_size=24),
                [e.update(weight=0) for e in c.mixture.values() if e.dataset == "moma_digits"]),
     r"data\.patch_size=16 does not divide the \(24, 24\) images of data\.mixture\.(caption_)?scene"),
    (lambda c: c.update(patch_size=3), r"data\.patch_size=3 does not divide the 8-pixel cells of data\.shapes"),
    (_shapes(image_size=20), r"data\.shapes\.image_size=20: use 16, 24 or 32"),
    (_shapes(min_objects=3, max_objects=2), r"data\.shapes\.min_objects=3, max_objects=2: need"),
])
def test_bad_scene_input_is_one_line_naming_the_field(cache_dir, mutate, message):
  """An unknown scene attribute, a palette larger than the image codes or the colours, an image size the
  patch size does not divide: one ValueError line naming the field and the fix."""
  config = make_config(cache_dir)
  mutate(config)
  with pytest.raises(ValueError, match=message) as error:
    data.batches(config, split="train", batch_size=2, seq_len=SEQ, seed=0)
  assert "\n" not in str(error.value)


def test_bad_scene_shapes_name_the_attribute():
  with pytest.raises(ValueError, match=r"scene shape 0: kind='hexagon' is unknown; choose one of"):
    shapes.render((scenes.Shape("hexagon", "red", "small", 0, 0),), knobs())


def _scene_and_melody_documents(batch, config):
  vocab = data.vocabulary(config)
  for row in range(batch["tokens"].shape[0]):
    for doc, _ in documents(batch, row):
      text = vocab.decode_text(doc)
      image = doc[(doc >= vocab.image_offset) & (doc < vocab.audio_offset)] - vocab.image_offset
      audio = doc[(doc >= vocab.audio_offset) & (doc < vocab.used)] - vocab.audio_offset
      yield text, image, audio


def test_batches_hold_scenes_that_match_their_captions_and_stated_melodies(cache_dir):
  config = make_config(cache_dir)
  for name in list(config.mixture):
    if config.mixture[name].dataset not in ("moma_shapes", "moma_melodies"):
      del config.mixture[name]
  batch = next(data.batches(config, split="validation", batch_size=4, seq_len=SEQ, seed=0))
  scene_count = tune_count = 0
  for text, image, audio in _scene_and_melody_documents(batch, config):
    if " melody: " in text:
      melody = melodies.parse_caption(text)
      codes = data.vocabulary(config).encode_audio(melodies.render(melody))
      np.testing.assert_array_equal(audio, codes - data.vocabulary(config).audio_offset)
      tune_count += 1
    elif image.size:
      scene = shapes.detect(shapes.decode_codes(image, config.shapes, config.patch_size), config.shapes)
      assert scene == scenes.parse_caption(text, config.shapes)
      scene_count += 1
  assert scene_count and tune_count


def test_melodies_round_trip_and_stay_within_the_bounds():
  config = melodies.default_knobs()
  examples = melodies.Examples(config, "train")
  lengths = set()
  for i in range(500):
    example = examples[i]
    melody = melodies.parse_caption(example["caption"])
    np.testing.assert_array_equal(melodies.render(melody), example["audio"])
    assert len(example["caption"]) <= melodies.max_caption_bytes(config)
    assert len(example["audio"]) <= melodies.max_samples(config)
    lengths.add(len(melody[1]))
  assert lengths == {2, 3, 4}
  with pytest.raises(ValueError, match="caption"):
    melodies.parse_caption("a violin melody: c long.")


def test_melodies_longer_than_the_audio_cut_are_refused(cache_dir):
  config = make_config(cache_dir)
  config.melodies.max_notes = 5
  with pytest.raises(ValueError, match=r"data\.melodies\.max_notes=5"):
    data.batches(config, split="train", batch_size=2, seq_len=SEQ, seed=0)


def test_scene_documents_decode_in_colour(cache_dir):
  """A known scene's document (caption, then its codes) decodes to the RGB image `render` draws; the
  digits' documents still decode as grey intensities."""
  config = make_config(cache_dir)
  vocab = data.vocabulary(config)
  scene = (scenes.Shape("circle", "red", "large", 0, 1), scenes.Shape("square", "blue", "small", 1, 0))
  image, codes = shapes.render(scene, config.shapes, config.patch_size)
  caption = scenes.caption(scene, config.shapes)
  tokens = np.concatenate([[data.BOS], vocab.encode_text(caption), [data.BOI], codes + vocab.image_offset,
                           [data.EOI], [data.EOS]])
  (kind_t, text), (kind_i, decoded) = data.decode_document(tokens, config)
  assert (kind_t, text, kind_i) == ("text", caption, "image")
  assert decoded.shape == (16, 16, 3) and decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded, image)
  assert set(map(tuple, decoded.reshape(-1, 3))) == {(0, 0, 0), scenes.COLOURS["red"], scenes.COLOURS["blue"]}
  grey = data.decode_document(tokens, config, scene=False)[1][1]
  assert grey.shape == (8, 8)  # the same codes read as digit intensities: what was shown before
  digit = np.concatenate([[data.BOS], vocab.encode_text("a handwritten seven."), [data.BOI],
                          vocab.encode_image(np.full((8, 8), 255, np.uint8)), [data.EOI]])
  assert data.decode_document(digit, config)[1][1].shape == (8, 8)
  short = data.decode_scene(tokens[:len(caption) + 10], config)  # a sample cut short: background after
  assert short.shape == (16, 16, 3)


def test_scene_patches_decode_in_colour(cache_dir):
  config = make_config(cache_dir, image_form="patches")
  for name in list(config.mixture):
    if config.mixture[name].dataset != "moma_shapes":
      del config.mixture[name]
  batch = next(data.batches(config, split="validation", batch_size=2, seq_len=SEQ, seed=0))
  seg = batch["segment"][0]
  parts = data.decode_document(batch["tokens"][0][seg == 1], config, patches=batch["patches"][0][seg == 1])
  image = next(v for k, v in parts if k == "image")
  text = next(v for k, v in parts if k == "text")
  assert image.shape == (16, 16, 3)
  assert shapes.detect(image, config.shapes) == scenes.parse_caption(text, config.shapes)
