"""moma.evaluate and the Transfusion run end to end: trainer metrics, sampling, captioning, evaluation.json.

The end-to-end tests train a 2-step run (~80 s of CPU with compiles) and are marked slow; the default run
covers the pieces (tests/test_transfusion.py: model, cache, sampler; here: the classifier and distances)."""

import json
import os

import numpy as np
import pytest

from configs import transfusion
from moma import evaluate
from moma import metrics
from moma import sample
from moma import train
from tests.test_sample import run_cli


def test_frechet_distance_closed_form():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((400, 3))
  a -= a.mean(0)
  assert evaluate.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
  shift = np.array([1.0, -2.0, 0.5])
  assert evaluate.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
  assert evaluate.frechet_distance(a, 2 * a) == pytest.approx(np.trace(np.cov(a, rowvar=False)), rel=1e-4)


def test_named_digit_is_the_first_name_in_the_caption():
  assert evaluate.named_digit("the digit seven, written by hand.") == 7
  assert evaluate.named_digit("a handwritten two. one") == 2
  assert evaluate.named_digit("an image of a") == -1


def test_digit_classifier_is_cached_and_recognises_held_out_digits(data_cache_dir):
  first = evaluate.Classifier(data_cache_dir)
  assert os.path.exists(os.path.join(data_cache_dir, evaluate.CLASSIFIER_FILE))
  images, labels = evaluate.digits(data_cache_dir, "validation")
  assert np.mean(first.predict(images) == labels) > 0.9
  np.testing.assert_array_equal(evaluate.Classifier(data_cache_dir).features(images), first.features(images))
  assert first.features(images).shape == (len(images), evaluate.HIDDEN)


@pytest.fixture(scope="module")
def transfusion_run(tmp_path_factory, data_cache_dir):
  config = transfusion.get_config("arch=mot")
  config.data.cache_dir = data_cache_dir
  config.train.update(steps=2, eval_every=2, eval_steps=1, progress_bar=False)
  workdir = str(tmp_path_factory.mktemp("transfusion_run"))
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow
def test_trainer_logs_the_diffusion_loss(transfusion_run):
  rows = metrics.read(transfusion_run)
  train_row = next(r for r in rows if "loss" in r)
  eval_row = next(r for r in rows if "eval/loss" in r)
  assert {"loss/text", "loss/image_diffusion"} <= set(train_row) and "eval/loss/image_diffusion" in eval_row
  assert train_row["loss"] > train_row["loss/text"]  # + λ·L_diffusion


@pytest.mark.slow
def test_sample_then_image_denoises_and_captions(transfusion_run, capsys):
  run_cli([f"--workdir={transfusion_run}", "--prompt=the digit one.", "--then=image", "--steps=3",
           "--num_tokens=3", "--num_samples=2", "--cfg_scale=2", "--temperature=0"])
  out = capsys.readouterr().out
  assert out.count("--- sample") == 2 and out.count("\n") > 2 * 8  # each sample prints 8 image rows
  docs = sample.sample(transfusion_run, "the digit one.", then="image", num_tokens=2, num_samples=2,
                       temperature=0, num_steps=3, seed=5)
  again = sample.sample(transfusion_run, "the digit one.", then="image", num_tokens=2, num_samples=2,
                        temperature=0, num_steps=3, seed=5)
  image = dict(docs[0])["image"]
  assert image.shape == (8, 8, 1) and image.dtype == np.uint8
  np.testing.assert_array_equal(image, dict(again[0])["image"])  # deterministic given the seed
  assert not np.array_equal(image, dict(docs[1])["image"])  # rows draw their own noise


@pytest.mark.slow
def test_evaluate_writes_every_number(transfusion_run):
  out = evaluate.evaluate(transfusion_run, per_digit=1, num_captions=3, eval_batches=1, num_steps=2)
  with open(os.path.join(transfusion_run, "evaluation.json")) as f:
    assert json.load(f) == out
  keys = {"generation/accuracy", "generation/frechet", "captioning/accuracy", "classifier/accuracy",
          "diffusion_loss/t=100", "diffusion_loss/t=900"}
  assert keys <= set(out) and all(np.isfinite(out[k]) for k in keys)
