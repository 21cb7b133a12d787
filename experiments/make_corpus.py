"""Generate a large synthetic records corpus for `experiments/bench_data.py --corpus=DIR` (not committed).

Chameleon-sized layout: 65,000 text ids, an 8,192-code image codebook (1,024 codes per image) and a 1,024-code
audio codebook. Documents: 60% text (200-3,000 ids), 25% caption + image, 15% caption + audio clip
(200-1,500 codes); random ids, drawn per shard from (--seed, shard), written in parallel by
`moma.data.corpus.write` (manifest last).

  python -m experiments.make_corpus --output=/tmp/corpus_1b --tokens=1e9 --shards=64
"""

import time

from absl import flags
import numpy as np

from moma import cli
from moma.data import corpus
from moma.data import vocab as vocab_lib

_OUTPUT = flags.DEFINE_string("output", None, "Corpus directory.", required=True)
_TOKENS = flags.DEFINE_float("tokens", 1e9, "Train tokens in all (validation adds 1%).", lower_bound=1e4)
_SHARDS = flags.DEFINE_integer("shards", 64, "Train shards.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Generator seed.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Writing processes (0: one per CPU).", lower_bound=0)

LAYOUT = corpus.Layout("synthetic", "synthetic", 65000, image_codebook=8192, audio_codebook=1024)
IMAGE_CODES = 1024


def documents(seed: int, shard: int, tokens: int):
  """Random documents of one shard until it holds `tokens` tokens: (tokens, [], text only)."""
  rng = np.random.default_rng([seed, shard])
  vocab = LAYOUT.vocab()
  written = 0
  while written < tokens:
    kind = rng.random()
    if kind < 0.6:
      doc = rng.integers(0, LAYOUT.text_vocab_size, rng.integers(200, 3001)) + vocab_lib.TEXT_OFFSET
    else:
      caption = rng.integers(0, LAYOUT.text_vocab_size, rng.integers(10, 61)) + vocab_lib.TEXT_OFFSET
      if kind < 0.85:
        media = [[vocab_lib.BOI], rng.integers(0, 8192, IMAGE_CODES) + vocab.image_offset, [vocab_lib.EOI]]
      else:
        media = [[vocab_lib.BOA], rng.integers(0, 1024, rng.integers(200, 1501)) + vocab.audio_offset,
                 [vocab_lib.EOA]]
      doc = np.concatenate([caption, *media])
    doc = np.concatenate([[vocab_lib.BOS], doc, [vocab_lib.EOS]]).astype(np.int32)
    written += len(doc)
    yield doc, [], kind < 0.6


def write_shard(path: str, run, layout: corpus.Layout) -> dict:
  seed, shard, tokens = run
  return corpus.write_shard(path, documents(seed, shard, tokens), layout)


def main(argv):
  del argv
  start = time.perf_counter()
  per_shard = int(_TOKENS.value / _SHARDS.value)
  validation_shards = max(1, _SHARDS.value // 64)
  shards = {"train": [(_SEED.value, i, per_shard) for i in range(_SHARDS.value)],
            "validation": [(_SEED.value, _SHARDS.value + i, per_shard // 100 + 1)
                           for i in range(validation_shards)]}
  path = corpus.write(_OUTPUT.value, shards, write_shard, LAYOUT, dict(synthetic=True, seed=_SEED.value),
                       _WORKERS.value)
  print(f"{path}: {_TOKENS.value:.3g} tokens in {_SHARDS.value} shards, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  cli.run(main)
