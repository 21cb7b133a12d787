"""Sample from a trained run: `python -m moma.sample --workdir=runs/quickstart --prompt="a handwritten "`.

Reads the run's config.json and latest checkpoint, encodes the prompt as the start of a document (BOS,
its text ids, then BOI or BOA with `--then=image|audio` so the model continues with image or audio codes),
generates `--num_tokens` with the KV / recurrent cache (`moma.models.generate`) and prints each sample,
text decoded and images as ASCII art (scenes of shapes as coloured blocks on a terminal, `--colour`). On
a Transfusion run (data.image_form='patches') `--then=image` denoises the image instead (`--steps`,
`--cfg_scale`, `--eta`; `moma.transfusion_sample`) and then decodes text after its EOI. Text goes through
the run's own tokenizer (its data.text_tokenizer, or its corpus's); a tokenizer file whose fingerprint is
not the one the run recorded (data.text_tokenizer_fingerprint) is refused:

  python -m moma.sample --workdir=runs/quickstart --prompt="the digit seven, written by hand." --then=image
  python -m moma.sample --workdir=runs/quickstart --prompt="The " --num_samples=4 --temperature=0.8
  python -m moma.sample --workdir=runs/quickstart --prompt="a large red circle at top right." --then=image
"""

from __future__ import annotations

import sys

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moma import checkpoint
from moma import cli
from moma import data
from moma import steps
from moma import transfusion_sample
from moma.models import generate

MARKERS = {"text": (), "image": (data.BOI,), "audio": (data.BOA,)}
_ASCII_RAMP = " .:-=+*#%@"

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of a trained decoder (moma.main).")
_PROMPT = flags.DEFINE_string("prompt", "", "Text that starts the document.")
_THEN = flags.DEFINE_enum("then", "text", list(MARKERS), "What follows the prompt: more text, or an image "
                          "or audio part (the prompt is then its caption).")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 80, "Tokens to generate per sample.", lower_bound=1)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 2, "Samples (decoded together as one batch).",
                                     lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 = greedy.", lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEPS = flags.DEFINE_integer("steps", 250, "Transfusion runs, --then=image: denoising steps (DDIM / DDPM "
                              "for objective ddpm, Euler for flow).", lower_bound=1)
_CFG_SCALE = flags.DEFINE_float("cfg_scale", 1.0, "Transfusion runs: classifier-free guidance scale "
                                "(1: the caption-conditioned prediction alone).")
_COLOUR = flags.DEFINE_enum("colour", "auto", ["auto", "always", "never"], "Print RGB images (scenes of "
                             "shapes) as coloured blocks: auto = when stdout is a terminal.")
_ETA = flags.DEFINE_float("eta", 0.0, "Transfusion runs, objective ddpm: 0 = DDIM, 1 = DDPM ancestral.",
                         lower_bound=0, upper_bound=1)


def load(workdir: str):
  """(config, model, variables) of the run in `workdir` (its config.json and latest checkpoint)."""
  config = ml_collections.ConfigDict(checkpoint.read_config(workdir, "--workdir"))
  if config.model.get("name", "decoder") != "decoder":
    raise ValueError(f"--workdir={workdir!r} holds a config.model.name={config.model.name!r} run; sampling "
                     "needs a decoder LM (configs/dense.py, mot.py, moma.py, mamba.py, mom.py)")
  return config, steps.build_model(config), {"params": checkpoint.restore_params(workdir, "--workdir")}


def prompt_batch(config, prompt: str, then: str, num_samples: int) -> dict[str, jax.Array]:
  """The prompt as the first tokens of one document, repeated over `num_samples` rows (docs/design.md batch)."""
  if then != "text" and then not in config.data.modalities:
    raise ValueError(f"--then={then!r}: this run's data has modalities {tuple(config.data.modalities)}")
  vocab = data.vocabulary(config.data)
  tokens = np.concatenate([[data.BOS], vocab.encode_text(prompt), MARKERS[then]]).astype(np.int32)
  rows = lambda x: jnp.asarray(np.broadcast_to(x, (num_samples, len(tokens))), jnp.int32)
  return dict(tokens=rows(tokens), modality=rows(vocab.modality_table()[tokens]),
              segment=rows(np.ones_like(tokens)), position=rows(np.arange(len(tokens))))


def sample(workdir: str, prompt: str = "", then: str = "text", num_tokens: int = 80, num_samples: int = 2,
           temperature: float = 1.0, seed: int = 0, **image_flags) -> list[list[tuple[str, object]]]:
  """Each sample's document as `moma.data.decode_document` parts ([("text", str), ("image", uint8), …]),
  prompt included and cut at the first EOS. On a Transfusion run (data.image_form='patches'),
  `then="image"` denoises the image (`moma.transfusion_sample.generate_patches`, `image_flags`: num_steps,
  cfg_scale, eta) and then continues in text after its EOI."""
  config, model, variables = load(workdir)
  batch = prompt_batch(config, prompt, then, num_samples)
  if then == "image" and config.data.image_form == "patches":
    image_BLP = transfusion_sample.generate_patches(config, model, variables, [prompt] * num_samples,
                                                    seed=seed, **image_flags)
    batch = transfusion_sample.with_image(config, batch, image_BLP)
  prompt_len, max_len = batch["tokens"].shape[1], config.model.max_seq_len
  if prompt_len + num_tokens > max_len:
    raise ValueError(f"--num_tokens={num_tokens}: the prompt's {prompt_len} tokens and {num_tokens} more exceed "
                     f"the run's config.model.max_seq_len={max_len}; set --num_tokens <= "
                     f"{max(max_len - prompt_len, 0)} or shorten --prompt")
  table = jnp.asarray(data.vocabulary(config.data).modality_table())
  rng = None if temperature == 0 else jax.random.key(seed)
  tokens_BT, _ = generate.generate(model, variables, batch, num_tokens, rng=rng,
                                   temperature=temperature or 1.0, modality_table=table)
  documents = []
  shape = transfusion_sample.image_shape(config) if "patches" in batch else None
  patches = batch.get("patches", [None] * num_samples)
  for row, row_patches in zip(np.concatenate([np.asarray(batch["tokens"]), np.asarray(tokens_BT)], axis=1),
                              patches):
    ends = np.flatnonzero(row == data.EOS)
    documents.append(data.decode_document(row[:ends[0]] if ends.size else row, config.data,
                                          patches=row_patches, image_shape=shape))
  return documents


def ascii_image(image: np.ndarray, colour: bool = False) -> str:
  """A uint8 image [H, W] (or [H, W, C], averaged) as lines of characters, darkest to brightest; with
  `colour`, an RGB image [H, W, 3] as coloured blocks (ANSI 24-bit escapes, black as blank)."""
  image = np.asarray(image)
  if colour and image.ndim == 3 and image.shape[-1] == 3:
    cell = lambda rgb: "  " if not any(rgb) else "\x1b[38;2;{};{};{}m██\x1b[0m".format(*rgb)  # pylint: disable=unnecessary-lambda-assignment
    return "\n".join("".join(cell(rgb) for rgb in row) for row in image.tolist())
  image = image.astype(np.float32)
  if image.ndim == 3:
    image = image.mean(-1)
  levels = np.round(image / 255.0 * (len(_ASCII_RAMP) - 1)).astype(int)
  return "\n".join("".join(_ASCII_RAMP[v] * 2 for v in row) for row in levels)


def main(_):
  documents = sample(_WORKDIR.value, _PROMPT.value, _THEN.value, _NUM_TOKENS.value, _NUM_SAMPLES.value,
                     _TEMPERATURE.value, _SEED.value, num_steps=_STEPS.value, cfg_scale=_CFG_SCALE.value,
                     eta=_ETA.value)
  for i, parts in enumerate(documents):
    print(f"--- sample {i}")
    for kind, value in parts:
      if kind == "text":
        print(value)
      elif kind == "image":
        print(ascii_image(value, colour=_COLOUR.value == "always" or (
            _COLOUR.value == "auto" and sys.stdout.isatty())))
      else:
        print(f"[audio: {value.size} samples]")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
