"""Mixed-modal data: embedded TFDS datasets (text, digits + DTMF audio), generated scenes of shapes
(`moma.data.shapes`, with exact evaluators) and captioned melodies (`moma.data.melodies`), one shared
vocabulary, packing into full rows.

Entry points: `default_config()`, `corpus_entry(DIR)` (a records corpus, `moma.data.corpus`),
`vocab_size(config)`, `vocabulary(config)`, `text_tokenizer_fingerprint(config)` (what a run records as
data.text_tokenizer_fingerprint), `batches(config, ...)`, and the decoders. See docs/data.md.
"""

from moma.data.builders import EMBEDDED, prepare
from moma.data.config import TEMPLATES, default_config, mixture_entry, validate
from moma.data.corpus import corpus_entry
from moma.data.decode import decode_audio, decode_document, decode_image, decode_scene, decode_text
from moma.data.pipeline import Packer, batches
from moma.data.vocab import (BOA, BOI, BOS, EOA, EOI, EOS, IMG, PAD, SPECIALS, TEXT_OFFSET, Vocab,
                             check_model_vocab, text_tokenizer_fingerprint, vocab_size, vocabulary)

__all__ = [
    "BOA", "BOI", "BOS", "EMBEDDED", "EOA", "EOI", "EOS", "IMG", "PAD", "SPECIALS", "TEMPLATES",
    "TEXT_OFFSET", "Packer", "Vocab", "batches", "check_model_vocab", "corpus_entry", "decode_audio",
    "decode_document", "decode_image", "decode_scene", "decode_text", "default_config", "mixture_entry",
    "prepare", "text_tokenizer_fingerprint", "validate", "vocab_size", "vocabulary",
]
