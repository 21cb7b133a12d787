"""Text tokenizers (moma.data.tokenizers): bytes keeps moma's text ids; tiny SentencePiece and HF BPE
tokenizers, trained here on the embedded prose, round-trip it, compress it and never emit specials."""

import os
import pickle
import re
import shutil
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from moma import data
from moma.data import tokenizers
from tests import tokenizer_fixtures

HELD_OUT = tokenizer_fixtures.embedded_prose(100, offset=1500)  # the tokenizers train on chunks 0..399
UNSEEN = ["naïve café ☃ 日本語 🙂 ﬁ", "tabs\tand  runs   of spaces\n\nand newlines\n", "", " lead and trail "]


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
  pytest.importorskip("sentencepiece")
  directory = tmp_path_factory.mktemp("sentencepiece")
  return tokenizer_fixtures.train_sentencepiece(tokenizer_fixtures.embedded_prose(400), str(directory))


@pytest.fixture(scope="module")
def sp_identity_path(tmp_path_factory):
  """A SentencePiece model trained to keep text as it is (no normaliser, whitespace kept)."""
  pytest.importorskip("sentencepiece")
  return tokenizer_fixtures.train_sentencepiece(
      tokenizer_fixtures.embedded_prose(400), str(tmp_path_factory.mktemp("identity")),
      normalization_rule_name="identity", remove_extra_whitespaces=False)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  pytest.importorskip("tokenizers")
  directory = tmp_path_factory.mktemp("hf")
  tokenizer_fixtures.train_hf_bpe(tokenizer_fixtures.embedded_prose(400), str(directory))
  return str(directory)


@pytest.fixture
def spec_of(request):
  """kind ("bytes", "sentencepiece", "hf") → the spec of that tokenizer, trained here."""
  def spec(kind):
    if kind == "bytes":
      return "bytes"
    return f"{kind}:{request.getfixturevalue('sp_path' if kind == 'sentencepiece' else 'hf_dir')}"
  return spec


@pytest.fixture(params=["sentencepiece", "sentencepiece_identity", "hf"])
def trained(request, spec_of):
  """(spec, normalise): the decoded text of encode(x) is normalise(x)."""
  if request.param == "sentencepiece":
    # SentencePiece's default normaliser (nmt_nfkc): NFKC, whitespace runs to one space, trimmed.
    return spec_of("sentencepiece"), lambda text: " ".join(unicodedata.normalize("NFKC", text).split())
  if request.param == "sentencepiece_identity":  # exact, as docs/data.md says
    return f"sentencepiece:{request.getfixturevalue('sp_identity_path')}", lambda text: text
  return spec_of("hf"), lambda text: text  # byte-level BPE: exact


def test_bytes_keeps_moma_text_ids():
  vocab = data.vocabulary(data.default_config())
  tokenizer = tokenizers.load("bytes")
  assert tokenizer is tokenizers.load("bytes")
  assert (tokenizer.vocab_size, tokenizer.fingerprint, tokenizer.spec) == (256, "bytes", "bytes")
  for text in HELD_OUT[:10] + UNSEEN + [b"raw \xff\xfe bytes"]:
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids + data.TEXT_OFFSET, vocab.encode_text(text))
    assert tokenizer.decode(ids) == vocab.decode_text(ids + data.TEXT_OFFSET)
  cut_snowman = np.array([0xE2, 0x98])  # a character cut short: U+FFFD, as today
  assert tokenizer.decode(cut_snowman) == vocab.decode_text(cut_snowman + data.TEXT_OFFSET) == "\ufffd"


def test_round_trip(trained):
  spec, normalise = trained
  tokenizer = tokenizers.load(spec)
  for text in HELD_OUT + UNSEEN:
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ((ids >= 0) & (ids < tokenizer.vocab_size)).all()
    assert tokenizer.decode(ids) == normalise(text)
  assert tokenizer.encode("café".encode()).tolist() == tokenizer.encode("café").tolist()


def test_trained_tokenizers_compress_prose(trained):
  tokenizer = tokenizers.load(trained[0])
  tokens = sum(tokenizer.encode(text).size for text in HELD_OUT)
  assert tokens / sum(len(text.encode()) for text in HELD_OUT) < 1  # ~0.55 at these vocabulary sizes


def test_sentencepiece_encode_emits_no_special_piece(sp_path):
  import sentencepiece  # pylint: disable=g-import-not-at-top
  model = sentencepiece.SentencePieceProcessor(model_file=sp_path)
  assert (model.unk_id(), model.bos_id(), model.eos_id(), model.pad_id()) == (0, 1, 2, -1)
  tokenizer = tokenizers.load(f"sentencepiece:{sp_path}")
  assert tokenizer.vocab_size == model.get_piece_size() == 500  # the special pieces count
  ids = tokenizer.encode("<s> text </s> <unk> <pad> " + UNSEEN[0]).tolist()
  assert not any(model.is_control(i) or model.is_unknown(i) for i in ids)  # byte_fallback: no unk


def test_hf_encode_emits_no_special_token(hf_dir):
  tokenizer = tokenizers.load(f"hf:{hf_dir}")
  special = tokenizer.encode("<|endoftext|>")  # the special token's id when added tokens are split out
  assert special.size > 1 and 0 not in tokenizer.encode("a <|endoftext|> b " + UNSEEN[0]).tolist()
  assert tokenizer.decode(special) == "<|endoftext|>"
  assert tokenizer.decode([0]) == ""  # the special token decodes to nothing


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece", "hf"])
def test_decode_refuses_ids_outside_the_text_vocabulary(kind, spec_of):
  spec = spec_of(kind)
  tokenizer = tokenizers.load(spec)
  n = tokenizer.vocab_size
  for ids, outside in (([5, n], n), ([-1, 3], -1)):
    with pytest.raises(ValueError, match=rf"^text ids \[{outside}\] are outside \[0, {n}\), the ids of text "
                                         rf"tokenizer '{re.escape(spec)}'\.$"):
      tokenizer.decode(ids)


def test_fingerprints_name_the_file_bytes(spec_of, sp_path, hf_dir, tmp_path):
  other_hf = tokenizer_fixtures.train_hf_bpe(tokenizer_fixtures.embedded_prose(400), str(tmp_path), 300)
  specs = [spec_of("bytes"), spec_of("sentencepiece"), spec_of("hf"), f"hf:{other_hf}"]
  fingerprints = [tokenizers.load(spec).fingerprint for spec in specs]
  assert len(set(fingerprints)) == 4 and all(len(f) == 16 for f in fingerprints[1:])
  copy = shutil.copyfile(sp_path, tmp_path / "copy.model")  # another path, same bytes
  assert tokenizers.load(f"sentencepiece:{copy}").fingerprint == fingerprints[1]
  assert tokenizers.load(f"hf:{hf_dir}/tokenizer.json").fingerprint == fingerprints[2]
  tokenizers._read.cache_clear()  # pylint: disable=protected-access
  assert [tokenizers.load(spec).fingerprint for spec in specs] == fingerprints


def test_loads_are_cached_until_the_file_changes(hf_dir, tmp_path):
  shutil.copyfile(os.path.join(hf_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
  first = tokenizers.load(f"hf:{tmp_path}")
  assert tokenizers.load(f"hf:{tmp_path}") is first
  tokenizer_fixtures.train_hf_bpe(tokenizer_fixtures.embedded_prose(200), str(tmp_path), 300)  # rewrites it
  second = tokenizers.load(f"hf:{tmp_path}")
  assert second.fingerprint != first.fingerprint and second.vocab_size == 300


def _file_of(spec: str) -> str:
  path = spec.partition(":")[2]
  return os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path


def test_tokenizers_pickle_without_their_file(trained, tmp_path):
  spec = trained[0]
  moved = shutil.copyfile(_file_of(spec), tmp_path / "moved")
  tokenizer = tokenizers.load(f"{spec.partition(':')[0]}:{moved}")
  os.remove(moved)
  copy = pickle.loads(pickle.dumps(tokenizer))
  assert (copy.spec, copy.fingerprint, copy.vocab_size) == (tokenizer.spec, tokenizer.fingerprint,
                                                            tokenizer.vocab_size)
  assert copy.encode(HELD_OUT[0]).tolist() == tokenizer.encode(HELD_OUT[0]).tolist()


def _bad_files(directory, sp_path, hf_dir):
  """(spec, the path its error must name) for every kind of bad spec."""
  garbage = directory / "garbage.model"
  garbage.write_bytes(b"not a model \xff\x00")
  empty = directory / "empty.model"
  empty.write_bytes(b"")
  bad_json = directory / "bad.json"
  bad_json.write_text('{"version": "1.0"}')
  no_tokenizer = directory / "no_tokenizer"
  no_tokenizer.mkdir()
  hf_file = os.path.join(hf_dir, "tokenizer.json")
  return [
      ("wordpiece:vocab.txt", "wordpiece:vocab.txt"), ("sentencepiece:", "sentencepiece:"),
      ("bytes:x", "bytes:x"), ("BYTES", "BYTES"),
      (f"sentencepiece:{directory}/missing.model", f"{directory}/missing.model"),
      (f"sentencepiece:{directory}", str(directory)),
      (f"sentencepiece:{garbage}", str(garbage)), (f"sentencepiece:{empty}", str(empty)),
      (f"sentencepiece:{hf_file}", hf_file),
      (f"hf:{directory}/missing.json", f"{directory}/missing.json"),
      (f"hf:{no_tokenizer}", f"{no_tokenizer}/tokenizer.json"),
      (f"hf:{bad_json}", str(bad_json)), (f"hf:{garbage}", str(garbage)), (f"hf:{sp_path}", sp_path),
  ]


@pytest.mark.parametrize("field", [tokenizers.FIELD, "config.data.text_tokenizer"])
def test_bad_specs_are_one_line_naming_the_field_and_path(field, sp_path, hf_dir, tmp_path):
  for spec, path in _bad_files(tmp_path, sp_path, hf_dir):
    with pytest.raises(ValueError) as error:
      tokenizers.load(spec, field=field)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{field}={spec!r}") and path in message, message
    assert "; " in message, message  # the problem, then the fix


@pytest.mark.parametrize("package,kind", [("sentencepiece", "sentencepiece"), ("tokenizers", "hf")])
def test_a_missing_package_names_the_extra(package, kind, spec_of, tmp_path, monkeypatch):
  uncached = shutil.copyfile(_file_of(spec_of(kind)), tmp_path / "uncached")  # a path not in load's cache
  monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
  with pytest.raises(ValueError, match=rf"without the {package} package; install it: pip install -e "
                                       r'"\.\[tokenizers\]"\.$'):
    tokenizers.load(f"{kind}:{uncached}")


def test_bytes_imports_neither_package():
  code = ("import sys; from moma.data import tokenizers; tokenizers.load('bytes').encode('x'); "
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'sentencepiece', 'tokenizers'}))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.stdout.strip() == "[]"
