"""Tiny text tokenizers trained at test time on the embedded prose, so that nothing downloads.

`train_sentencepiece` and `train_hf_bpe` each take well under a second on a few hundred prose chunks;
`embedded_prose` gives those chunks (the `moma_text` dataset's text, read from `pydoc_data` directly).
"""

from __future__ import annotations

import functools
import os

from moma.data.builders import text_chunks


@functools.cache
def _prose_chunks() -> tuple[str, ...]:
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  return tuple(chunk for topic in sorted(topics) for chunk in text_chunks(topics[topic]))


def embedded_prose(n: int, offset: int = 0) -> list[str]:
  """Chunks offset..offset+n-1 of the embedded text dataset (both splits, topics in name order)."""
  chunks = _prose_chunks()
  if not 0 <= offset <= offset + n <= len(chunks):
    raise ValueError(f"the embedded prose has {len(chunks)} chunks; asked for {n} from {offset}")
  return list(chunks[offset:offset + n])


def train_sentencepiece(texts, directory, vocab_size: int = 500, name: str = "sentencepiece",
                        **options) -> str:
  """A SentencePiece model trained on `texts`, written to `directory/name.model`; returns its path.

  byte_fallback (256 byte pieces, hence vocab_size >= ~360) so that any UTF-8 text encodes without unk;
  `options` go to the trainer as they are (e.g. normalization_rule_name="identity").
  """
  import sentencepiece  # pylint: disable=g-import-not-at-top
  prefix = os.path.join(directory, name)
  options = dict(byte_fallback=True, num_threads=1, minloglevel=2) | options
  sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=prefix,
                                           vocab_size=vocab_size, **options)
  return prefix + ".model"


def train_hf_bpe(texts, directory, vocab_size: int = 400, special_tokens=("<|endoftext|>",),
                 name: str = "tokenizer.json") -> str:
  """A byte-level BPE `tokenizers` tokenizer (GPT-2 style: any UTF-8 text round-trips exactly) trained
  on `texts`, saved to `directory/name`; returns its path."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(texts, trainer)
  path = os.path.join(directory, name)
  tokenizer.save(path)
  return path
