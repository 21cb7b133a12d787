"""Evaluate a Transfusion run with nothing to download: `python -m moma.evaluate --workdir=DIR`.

Writes DIR/evaluation.json (and returns the same dict from `evaluate(workdir, ...)`, for notebooks):

  diffusion_loss/t=<t>  validation diffusion loss at fixed times (ddpm t ∈ {100, 300, 500, 700, 900} of
                        T = 1000; flow the same fractions), fixed noise, every image of `eval_batches`
                        validation batches (the grid MoT reports);
  generation/accuracy   the digit classifier's accuracy on images generated from the caption "the digit
                        <name>, written by hand." (`per_digit` per digit), i.e. the label is recognised;
  generation/frechet    Fréchet distance between the classifier's penultimate (hidden-layer) features of
                        those images and of the held-out (validation split) real digits;
  captioning/accuracy   greedy captions of `num_captions` validation images that name the right digit
                        (the first digit name in the caption);
  classifier/accuracy   the classifier's own accuracy on the real validation digits (the ceiling).

Captions are encoded, and generated captions decoded, with the run's own text tokenizer (its
data.text_tokenizer) before `named_digit` reads them.

The digit classifier is a one-hidden-layer MLP (scikit-learn, fixed seed) trained on the embedded digits'
training split and cached next to the data (`data.cache_dir/moma_digits_classifier.npz`).
"""

from __future__ import annotations

import json
import os

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from moma import cli
from moma import data
from moma import diffusion
from moma import sample
from moma import transfusion_sample
from moma.data import builders
from moma.data import vocab as vocab_lib

GRID = (0.1, 0.3, 0.5, 0.7, 0.9)
CAPTION = "the digit {name}, written by hand."
CLASSIFIER_FILE = "moma_digits_classifier.npz"
HIDDEN = 32


def digits(cache_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [N, 8, 8], int labels [N]) of the embedded digits' `split`."""
  source = data.prepare("moma_digits", os.path.expanduser(cache_dir)).as_data_source(split=split)
  examples = source.__getitems__(range(len(source)))
  return (np.stack([e["image"][..., 0] for e in examples]), np.array([e["label"] for e in examples]))


class Classifier:
  """The cached digit MLP: `features(images)` (its hidden layer) and `predict(images)`."""

  def __init__(self, cache_dir: str):
    path = os.path.join(os.path.expanduser(cache_dir), CLASSIFIER_FILE)
    if not os.path.exists(path):
      from sklearn.neural_network import MLPClassifier  # pylint: disable=g-import-not-at-top
      images, labels = digits(cache_dir, "train")
      mlp = MLPClassifier(hidden_layer_sizes=(HIDDEN,), alpha=1e-3, max_iter=2000, random_state=0)
      mlp.fit(self._inputs(images), labels)
      tmp = f"{path}.{os.getpid()}.tmp.npz"
      np.savez(tmp, w0=mlp.coefs_[0], b0=mlp.intercepts_[0], w1=mlp.coefs_[1], b1=mlp.intercepts_[1])
      os.replace(tmp, path)  # atomic: concurrent first uses never read half a file
    with np.load(path) as f:
      self.w0, self.b0, self.w1, self.b1 = (f[k] for k in ("w0", "b0", "w1", "b1"))

  @staticmethod
  def _inputs(images) -> np.ndarray:
    images = np.asarray(images, np.float64)
    return images.reshape(len(images), -1) / 255.0

  def features(self, images) -> np.ndarray:
    return np.maximum(self._inputs(images) @ self.w0 + self.b0, 0.0)

  def predict(self, images) -> np.ndarray:
    return np.argmax(self.features(images) @ self.w1 + self.b1, axis=-1)


def frechet_distance(a_ND: np.ndarray, b_MD: np.ndarray) -> float:
  """‖μ_a - μ_b‖² + tr(Σ_a + Σ_b - 2 (Σ_a Σ_b)^½) between two feature sets (FID's formula)."""
  mu_a, mu_b = a_ND.mean(0), b_MD.mean(0)
  cov_a, cov_b = np.cov(a_ND, rowvar=False), np.cov(b_MD, rowvar=False)
  root = linalg.sqrtm(cov_a @ cov_b).real
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root))


def named_digit(text: str) -> int:
  """The digit whose name occurs first in `text`, -1 when none does."""
  hits = [(text.find(name), d) for d, name in enumerate(builders.DIGIT_NAMES) if name in text]
  return min(hits)[1] if hits else -1


def diffusion_losses(config, model, variables, eval_batches: int) -> dict[str, float]:
  """Validation diffusion loss at each time of `GRID` (fixed noise, every image of the batches)."""
  settings = model.config.diffusion
  apply = jax.jit(model.apply)
  totals = {t: [0.0, 0.0] for t in GRID}
  it = data.batches(config.data, split="validation", batch_size=config.train.batch_size,
                    seq_len=config.train.seq_len, seed=config.train.seed)
  for i in range(eval_batches):
    batch = {k: jnp.asarray(v) for k, v in next(it).items()}
    weight_BL = (batch["image_block"] > 0).astype(jnp.float32)
    eps = jax.random.normal(jax.random.key(i), batch["patches"].shape)
    for t in GRID:
      time_BL = t * weight_BL
      x_t, target = diffusion.add_noise(batch["patches"], eps, time_BL[..., None], settings)
      out = apply(variables, dict(batch, patches=x_t, timestep=time_BL))
      mse, count = diffusion.loss(out.prediction, target * weight_BL[..., None], weight_BL)
      totals[t][0] += float(mse) * float(count)
      totals[t][1] += float(count)
  scale = settings.timesteps if settings.objective == "ddpm" else 1
  return {f"diffusion_loss/t={t * scale:g}": s / max(n, 1.0) for t, (s, n) in totals.items()}


def evaluate(workdir: str, *, per_digit: int = 10, num_captions: int = 100, eval_batches: int = 4,
             num_steps: int = 250, cfg_scale: float = 1.0, seed: int = 0) -> dict[str, float]:
  """All of the module docstring's numbers for the Transfusion run in `workdir`; also written to
  `workdir/evaluation.json`."""
  config, model, variables = sample.load(workdir)
  if not model.config.patch_dim:
    raise ValueError(f"--workdir={workdir!r} is not a Transfusion run (config.model.patch_dim=0); "
                     "train one with configs/transfusion.py")
  classifier = Classifier(config.data.cache_dir)
  real_images, real_labels = digits(config.data.cache_dir, "validation")
  out = {"classifier/accuracy": float(np.mean(classifier.predict(real_images) == real_labels))}
  out.update(diffusion_losses(config, model, variables, eval_batches))

  labels = np.repeat(np.arange(10), per_digit)
  captions = [CAPTION.format(name=builders.DIGIT_NAMES[d]) for d in labels]
  patches = transfusion_sample.generate_patches(config, model, variables, captions, num_steps=num_steps,
                                                cfg_scale=cfg_scale, seed=seed)
  shape = transfusion_sample.image_shape(config)
  generated = np.stack([vocab_lib.unpatch(p, shape)[..., 0] for p in patches])
  out["generation/accuracy"] = float(np.mean(classifier.predict(generated) == labels))
  out["generation/frechet"] = frechet_distance(classifier.features(generated),
                                               classifier.features(real_images))

  pick = np.random.default_rng(seed).permutation(len(real_images))[:num_captions]
  texts = transfusion_sample.caption_images(config, model, variables, real_images[pick, ..., None])
  out["captioning/accuracy"] = float(np.mean([named_digit(t) == y for t, y in
                                              zip(texts, real_labels[pick])]))
  out.update(per_digit=per_digit, num_captions=len(pick), num_steps=num_steps, cfg_scale=cfg_scale)
  with open(os.path.join(workdir, "evaluation.json"), "w") as f:
    json.dump(out, f, indent=1, sort_keys=True)
  return out


# --workdir, --steps, --cfg_scale and --seed are moma.sample's flags (same meaning, defined once).
_PER_DIGIT = flags.DEFINE_integer("per_digit", 10, "Images generated per digit.", lower_bound=1)
_NUM_CAPTIONS = flags.DEFINE_integer("num_captions", 100, "Validation images to caption.", lower_bound=1)
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 4, "Validation batches for the diffusion losses.",
                                     lower_bound=1)


def main(_):
  out = evaluate(flags.FLAGS.workdir, per_digit=_PER_DIGIT.value, num_captions=_NUM_CAPTIONS.value,
                 eval_batches=_EVAL_BATCHES.value, num_steps=flags.FLAGS.steps,
                 cfg_scale=flags.FLAGS.cfg_scale, seed=flags.FLAGS.seed)
  print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
