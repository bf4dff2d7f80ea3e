"""Tests for the SentencePiece / HF tokenizers and their reserved ids."""

import os
import pickle

import ml_collections
import pytest
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import trainers

from alignax.data import embedded
from alignax.data import tokenizer as tokenizer_lib

PIECES = 400  # SentencePiece base vocabulary of the test model.
SENTINELS = 16
VOCAB = PIECES + 3 + SENTINELS  # base | [NLU] [NLG] [S2S] | sentinels.
# Awkward text: tabs, CRLF, runs of spaces, leading/trailing whitespace,
# non-ASCII letters, CJK, emoji, SentencePiece's own U+2581 and the literal
# names of reserved tokens (which must stay ordinary text).
TRICKY = ("  def f(x):\n\tif x:\r\n        return 'héllo ▁ 世界 🙂'\n\n\n"
          "[NLU] <extra_id_0>  \t\n ")


def _train_docs():
  return [d["text"] for d in embedded.embedded_documents("train")[:60]]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def spm_tok(cache_dir):
  return tokenizer_lib.train_or_load_sentencepiece(
      cache_dir, PIECES, SENTINELS, documents=_train_docs(),
      max_chars=300_000)


def test_sentencepiece_round_trips_real_code_exactly(spm_tok):
  texts = [d["text"] for d in embedded.embedded_documents("heldout")]
  texts += _train_docs()[:10] + [TRICKY, "", " ", "\n", "0123456789"]
  for text in texts:
    ids = spm_tok.encode(text)
    assert spm_tok.decode(ids) == text
    assert not any(spm_tok.is_reserved(i) for i in ids)
  assert spm_tok.encode_batch(texts[-6:]) == [spm_tok.encode(t)
                                              for t in texts[-6:]]
  # Picklable, for grain's multiprocess prefetch.
  clone = pickle.loads(pickle.dumps(spm_tok))
  assert clone.encode(TRICKY) == spm_tok.encode(TRICKY)
  # The learned vocabulary compresses code (byte fallback alone would not).
  code = texts[0]
  assert len(spm_tok.encode(code)) < 0.8 * len(code.encode("utf-8"))


def test_sentencepiece_keeps_newline_and_digits_as_pieces(spm_tok):
  newline = spm_tok.encode("\n")
  assert len(newline) == 1 and not spm_tok.is_reserved(newline[0])
  # split_digits: one piece per digit.
  assert len(spm_tok.encode("1234567")) == 7


def test_reserved_ids_layout(spm_tok):
  tok = spm_tok
  assert tok.vocab_size == VOCAB
  base = PIECES
  assert tok.base_vocab_size == base
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  assert tok.num_sentinels == SENTINELS
  assert tok.sentinel_id(0) == VOCAB - 1
  assert tok.sentinel_id(7) == VOCAB - 8
  assert tok.sentinel_id(SENTINELS - 1) == VOCAB - SENTINELS
  modes = [tok.mode_id(m) for m in ("[NLU]", "[NLG]", "[S2S]")]
  assert modes == [base, base + 1, base + 2]
  assert all(tok.is_reserved(i) for i in modes + [tok.sentinel_id(3)])
  assert not tok.is_reserved(base - 1) and not tok.is_reserved(VOCAB)
  with pytest.raises(ValueError, match="sentinel index"):
    tok.sentinel_id(SENTINELS)
  with pytest.raises(ValueError, match=r"Unknown mode token.*\[NLU\]"):
    tok.mode_id("[XYZ]")


def test_decode_renders_reserved_ids(spm_tok):
  tok = spm_tok
  ids = ([tok.mode_id("[NLU]")] + tok.encode("a = 1") + [tok.sentinel_id(7)]
         + tok.encode("\tb") + [tok.sentinel_id(0), tok.eos_id, tok.pad_id])
  assert tok.decode(ids) == "[NLU]a = 1<extra_id_7>\tb<extra_id_0>"
  assert tok.decode([tok.mode_id("[S2S]"), tok.mode_id("[NLG]")]) == (
      "[S2S][NLG]")
  with pytest.raises(ValueError, match="not in"):
    tok.decode([VOCAB])


def test_cache_is_reused_without_retraining(cache_dir, spm_tok, monkeypatch):
  files = [f for f in os.listdir(cache_dir) if f.endswith(".model")]
  assert len(files) == 1 and files[0].startswith(f"spm_v{PIECES}_")

  def fail(*args, **kwargs):
    raise AssertionError("retrained although the model is cached")

  monkeypatch.setattr(tokenizer_lib, "_train_sentencepiece", fail)
  again = tokenizer_lib.train_or_load_sentencepiece(
      cache_dir, PIECES, SENTINELS + 4, documents=_train_docs(),
      max_chars=300_000)
  assert again.encode(TRICKY) == spm_tok.encode(TRICKY)
  assert again.vocab_size == VOCAB + 4
  # Different settings or training text -> a different file: training.
  with pytest.raises(AssertionError, match="retrained"):
    tokenizer_lib.train_or_load_sentencepiece(
        cache_dir, PIECES + 8, SENTINELS, documents=_train_docs(),
        max_chars=300_000)
  with pytest.raises(AssertionError, match="retrained"):
    tokenizer_lib.train_or_load_sentencepiece(
        cache_dir, PIECES, SENTINELS, documents=_train_docs()[1:],
        max_chars=300_000)
  assert not [f for f in os.listdir(cache_dir) if f.endswith(".tmp")]


def test_training_is_deterministic(tmp_path, spm_tok):
  other = tokenizer_lib.train_or_load_sentencepiece(
      str(tmp_path), PIECES, SENTINELS, documents=_train_docs(),
      max_chars=300_000)
  text = _train_docs()[3]
  assert other.encode(text) == spm_tok.encode(text)


def test_too_small_vocab_is_a_clear_error(tmp_path):
  # Byte fallback alone needs 256 pieces + specials + the corpus's chars.
  with pytest.raises(ValueError, match="vocab_size=280"):
    tokenizer_lib.train_or_load_sentencepiece(
        str(tmp_path), 280, 10, documents=_train_docs()[:5])


def _train_hf(path, special_tokens):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=400, special_tokens=special_tokens,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_train_docs()[:20], trainer)
  tok.save(str(path))
  return str(path)


def test_hf_tokenizer_with_its_own_bos_eos(tmp_path):
  path = _train_hf(tmp_path / "tokenizer.json", ["<pad>", "<s>", "</s>"])
  tok = tokenizer_lib.load_hf_tokenizer(path, num_sentinels=10)
  assert tok.base_vocab_size == 400
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  assert tok.vocab_size == 400 + 3 + 10
  assert tok.mode_id("[NLU]") == 400 and tok.sentinel_id(0) == 412
  for text in [TRICKY, _train_docs()[0]]:
    assert tok.decode(tok.encode(text)) == text
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode(TRICKY) == tok.encode(TRICKY)
  assert tok.decode([tok.sentinel_id(2)] + tok.encode("x")) == "<extra_id_2>x"


def test_hf_tokenizer_reserves_missing_bos_eos_and_pads_vocab(tmp_path):
  path = _train_hf(tmp_path / "plain.json", [])
  tok = tokenizer_lib.load_hf_tokenizer(path, num_sentinels=4,
                                        vocab_size=512)
  # Hand-derived layout: 400 base | [BOS] [EOS] | 3 modes | unused | 4 top.
  assert (tok.bos_id, tok.eos_id) == (400, 401)
  assert tok.mode_id("[NLU]") == 402 and tok.mode_id("[S2S]") == 404
  assert tok.sentinel_id(0) == 511 and tok.sentinel_id(3) == 508
  assert tok.decode([400, 401, 405, 511]) == (
      "[BOS][EOS]<unused_405><extra_id_0>")
  with pytest.raises(ValueError, match="too small"):
    tokenizer_lib.load_hf_tokenizer(path, num_sentinels=4, vocab_size=405)


def test_build_tokenizer_from_config(tmp_path, cache_dir, spm_tok):
  cfg = ml_collections.ConfigDict(dict(
      kind="sentencepiece", vocab_size=PIECES, num_sentinels=SENTINELS,
      path="", cache_dir=""))
  model = [f for f in os.listdir(cache_dir) if f.endswith(".model")][0]
  cfg.path = os.path.join(cache_dir, model)
  loaded = tokenizer_lib.build_tokenizer(cfg, str(tmp_path))
  assert loaded.vocab_size == VOCAB
  assert loaded.encode(TRICKY) == spm_tok.encode(TRICKY)
  # No path: train on the embedded corpus, cached under <workdir>/tokenizer.
  cfg.path = ""
  trained = tokenizer_lib.build_tokenizer(cfg, str(tmp_path))
  assert trained.vocab_size == VOCAB
  assert trained.decode(trained.encode(TRICKY)) == TRICKY
  assert any(f.endswith(".model")
             for f in os.listdir(tmp_path / "tokenizer"))
  with pytest.raises(ValueError, match="needs tokenizer.vocab_size"):
    tokenizer_lib.build_tokenizer(ml_collections.ConfigDict(dict(
        kind="sentencepiece", vocab_size=0, num_sentinels=5, path="",
        cache_dir="")), str(tmp_path))
  hf_path = _train_hf(tmp_path / "tokenizer.json", ["<s>", "</s>"])
  hf = tokenizer_lib.build_tokenizer(ml_collections.ConfigDict(dict(
      kind="hf", vocab_size=2048, num_sentinels=5, path=hf_path,
      cache_dir="")), str(tmp_path))
  assert hf.vocab_size == 400 + 3 + 5
  with pytest.raises(ValueError, match="Unknown tokenizer kind 'bpe'"):
    tokenizer_lib.build_tokenizer(ml_collections.ConfigDict(dict(
        kind="bpe", vocab_size=0, num_sentinels=5, path="", cache_dir="")),
                                  str(tmp_path))
  with pytest.raises(ValueError, match="needs tokenizer.path"):
    tokenizer_lib.build_tokenizer(ml_collections.ConfigDict(dict(
        kind="hf", vocab_size=0, num_sentinels=5, path="", cache_dir="")),
                                  str(tmp_path))
