"""moma.sample: a trained run's checkpoint decodes prompts into documents (text, ASCII images), clear errors."""

from absl import flags
import ml_collections
import numpy as np
import pytest

from moma import data
from moma import sample


def test_greedy_samples_continue_the_prompt(tiny_run):
  docs = sample.sample(tiny_run, "a handwritten ", then="image", num_tokens=12, num_samples=2,
                       temperature=0)
  assert len(docs) == 2 and str(docs[0]) == str(docs[1])  # greedy: every row decodes the same
  kinds = [kind for kind, _ in docs[0]]
  assert docs[0][0] == ("text", "a handwritten ") and "image" in kinds  # BOI opened an image part
  image = dict(docs[0])["image"]
  assert image.dtype == np.uint8 and image.shape[0] == image.shape[1]


def test_sampling_is_reproducible_by_seed(tiny_run):
  draw = lambda seed: sample.sample(tiny_run, "The ", num_tokens=16, num_samples=3, seed=seed)
  first = draw(1)
  assert str(first) == str(draw(1))
  assert all(doc[0][0] == "text" and doc[0][1].startswith("The ") for doc in first)


def run_cli(argv):
  """`python -m moma.sample ARGV` in-process (flags parsed, then reset for the next test)."""
  flags.FLAGS(["sample", *argv])
  try:
    sample.main(["sample"])
  finally:
    flags.FLAGS.unparse_flags()


def test_cli_prints_each_sample(tiny_run, capsys):
  run_cli([f"--workdir={tiny_run}", "--prompt=a handwritten ", "--then=image", "--num_tokens=8",
           "--num_samples=2", "--temperature=0"])
  out = capsys.readouterr().out
  assert out.count("--- sample") == 2 and "a handwritten" in out


def test_ascii_image_maps_black_to_space_and_white_to_at():
  assert sample.ascii_image(np.array([[0, 255], [255, 0]], np.uint8)) == "  @@\n@@  "


def test_non_square_image_codes_are_padded_black():
  vocab = data.vocabulary(data.default_config())
  image = vocab.decode_image(vocab.image_offset + np.full(5, vocab.image_codes - 1))  # 5 white pixels
  assert image.shape == (3, 3) and (image.reshape(-1)[:5] == 255).all() and (image.reshape(-1)[5:] == 0).all()


def test_bad_requests_name_the_flag(tmp_path):
  config = ml_collections.ConfigDict(dict(data=data.default_config()))
  config.data.modalities = ("text", "image")
  with pytest.raises(ValueError, match="--then='audio'"):
    sample.prompt_batch(config, "a ", "audio", 1)
  with pytest.raises(ValueError, match="no config.json there"):
    sample.load(str(tmp_path))


def test_rgb_images_print_as_coloured_blocks():
  image = np.zeros((2, 2, 3), np.uint8)
  image[0, 1] = (230, 25, 75)
  assert sample.ascii_image(image, colour=True) == "  \x1b[38;2;230;25;75m██\x1b[0m\n    "
  assert sample.ascii_image(image) == "  ==\n    "  # without colour: the mean intensity
