"""The malformed-record policy over a corpus of 1,000+ bad records."""

import collections
import json
import logging
import pickle

import numpy as np
import pytest

from alignax.data import chat
from alignax.data import fault_corpus
from alignax.data import pairs
from alignax.data import pipeline
from alignax.data import preference
from alignax.data import records
from alignax.data import sources
from alignax.data import tokenizer as tok_lib


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return fault_corpus.write_corpus(str(tmp_path_factory.mktemp("faults")),
                                   repeats=6)


def test_corpus_has_every_fault_in_every_format(corpus):
  reasons = collections.Counter(e[1] for f in corpus for e in f.expected if e)
  assert sum(reasons.values()) >= 1000
  # Every reason but bad_chat (which needs a template: tested below).
  assert set(reasons) == set(records.REASONS) - {"bad_chat"}
  formats = collections.Counter(f.source for f in corpus
                                for e in f.expected if e)
  assert min(formats.values()) >= 100 and len(formats) == 3
  kinds = {(f.kind, f.source) for f in corpus if any(f.expected)}
  assert len(kinds) == len(fault_corpus.KINDS) * 3
  # Good records are mixed in, so nothing is only bad.
  assert all(None in f.expected for f in corpus)


def test_every_bad_record_is_located(corpus):
  problems = [p for f in corpus for p in fault_corpus.check(f, False)]
  assert not problems, problems[:10]


def test_every_bad_record_is_skipped_and_counted(corpus):
  problems = [p for f in corpus for p in fault_corpus.check(f, True)]
  assert not problems, problems[:10]
  total = sum(sum(records.skip_counts(fault_corpus.build(f, True)).values())
              for f in corpus)
  assert total == sum(1 for f in corpus for e in f.expected if e)


def test_check_fails_on_a_wrong_expectation(corpus):
  # The checker itself can fail: a silently passing or misreported record.
  f = next(f for f in corpus if f.kind == "text" and f.source == "jsonl")
  good, bad = f.expected.index(None), next(
      i for i, e in enumerate(f.expected) if e)
  wrong = fault_corpus.CorpusFile(f.kind, f.source, f.path, list(f.expected))
  wrong.expected[good] = (f"{f.path}:1", "bad_json")
  wrong.expected[bad] = (wrong.expected[bad][0], "empty")
  problems = fault_corpus.check(wrong, False)
  assert len(problems) == 2
  assert any("passed silently" in p for p in problems)
  assert fault_corpus.check(wrong, True)[0].startswith("counts")


def _write(tmp_path, name, lines):
  path = tmp_path / name
  path.write_bytes(b"\n".join(lines) + b"\n")
  return str(path)


def test_skip_warning_names_the_location_once(tmp_path, caplog):
  path = _write(tmp_path, "p.jsonl", [
      json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode(),
      b'{"prompt": "p", "chosen": "a"}', b"[1]"])
  with caplog.at_level(logging.WARNING):
    source = preference.RecordSource(sources.JsonlSource(path, None), "pairs",
                                     skip_malformed=True)
  assert source.skipped == {"missing_field": 1, "not_object": 1}
  assert len(source) == 1 and source.num_skipped == 2
  message = caplog.records[-1].getMessage()
  assert message.count("p.jsonl:2") == 1 and "p.jsonl:3" not in message
  assert "missing_field 1, not_object 1" in message


def test_blank_lines_of_any_whitespace_are_no_records(tmp_path):
  path = _write(tmp_path, "b.jsonl", [
      b"", b"   ", b"\r", b"\t\r", b'{"text": "a"}\r', b"\f", b"[2]"])
  source = sources.JsonlSource(path, skip_malformed=True)
  assert [source[i] for i in range(len(source))] == [{"text": "a"}]
  assert source.skipped == {"not_object": 1}  # the blank lines: no count
  with pytest.raises(ValueError, match=r"b\.jsonl:7: record is a list"):
    sources.JsonlSource(path)[1]


def test_template_refusal_is_bad_chat(tmp_path):
  template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
              "{{ raise_exception('no system messages') }}{% endif %}"
              "{{ m['content'] }}{% endfor %}")
  path = _write(tmp_path, "c.jsonl", [json.dumps(r).encode() for r in [
      {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a",
       "rejected": "b"},
      {"prompt": [{"role": "system", "content": "x"}], "chosen": "a",
       "rejected": "b"}]])
  kwargs = dict(chat=chat.TemplateChat(template))
  source = preference.RecordSource(sources.JsonlSource(path, None), "pairs",
                                   **kwargs)
  assert source[0]["prompt"] == "hi"
  with pytest.raises(records.MalformedRecord,
                     match=r"c\.jsonl:2: field 'prompt': .*no system") as e:
    source[1]  # pylint: disable=pointless-statement
  assert e.value.reason == "bad_chat"
  skipping = preference.RecordSource(sources.JsonlSource(path, None), "pairs",
                                     skip_malformed=True, **kwargs)
  assert skipping.skipped == {"bad_chat": 1}


class _Chars:
  """A byte tokenizer backend (ids 3..258); it fails on lone surrogates."""
  size, bos_id, eos_id = 259, 1, 2

  def encode(self, text):
    return [3 + b for b in text.encode("utf-8")]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]

  def decode(self, ids):
    return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", "replace")


def _config(**fields):
  cfg = fault_corpus.data_config(
      fault_corpus.CorpusFile("text", "jsonl", "", []), False)
  cfg.update(num_threads=1, prefetch_buffer_size=2)
  cfg.update(fields)
  return cfg


def test_datasets_carry_skip_counts_for_the_metrics(tmp_path):
  tok = tok_lib.Tokenizer(_Chars(), num_sentinels=4)
  text = _write(tmp_path, "t.jsonl", [b'{"text": "hello world"}'] * 4 + [
      b'{"text": "\\ud800"}', b"{bad"])
  ds = pipeline.build_lm_dataset(_config(paths=(text,), skip_malformed=True),
                                 tok, split="train",
                                 seed=0, seq_len=8, batch_size=2)
  assert records.skip_counts(ds) == {"surrogate": 1, "bad_json": 1}
  assert records.skip_metrics(ds) == {"data/skipped/bad_json": 1,
                                      "data/skipped/surrogate": 1}
  assert next(iter(ds))["inputs"].shape == (2, 8)
  views = _write(tmp_path, "v.jsonl", [
      json.dumps({"query": f"q{i}", "positive": f"p{i}"}).encode()
      for i in range(8)] + [b'{"query": "", "positive": "p"}'])
  cfg = _config(paths=(views,), lm_source="jsonl", lm_paths=(text,),
                skip_malformed=True)
  ds = pairs.build_pairs_dataset(cfg, tok, split="train", seed=0, seq_len=8,
                                 batch_size=2)
  assert records.skip_counts(ds) == {"empty": 1}
  ds = pairs.build_cafe_dataset(cfg, tok, split="train", seed=0, seq_len=8,
                                batch_size=2)
  assert records.skip_counts(ds) == {"empty": 1, "surrogate": 1,
                                     "bad_json": 1}
  assert records.skip_counts(object()) == {}


def test_non_finite_score_fails_at_once_naming_the_record(tmp_path):
  tok = tok_lib.Tokenizer(_Chars(), num_sentinels=4)
  good = {"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}
  path = _write(tmp_path, "l.jsonl", [json.dumps(good).encode()] * 3 + [
      b'{"prompt": "p", "responses": ["a", "b"], "scores": [Infinity, 0]}'])
  cfg = _config(paths=(path,))
  cfg.preference.update(format="lists", list_size=2, max_prompt_len=8,
                        max_response_len=8, groups_per_row=1,
                        shared_prompt=False, reference_cache="")
  ds = preference.build_preference_dataset(cfg, tok, split="train", seed=0,
                                           seq_len=32, batch_size=4)
  with pytest.raises(ValueError, match=r"l\.jsonl:4: field 'scores\[0\]' is "
                     r"inf, not a finite number"):
    next(iter(ds))  # the first batch holds every record
  cfg.skip_malformed = True
  ds = preference.build_preference_dataset(cfg, tok, split="train", seed=0,
                                           seq_len=32, batch_size=2)
  assert records.skip_counts(ds) == {"non_finite": 1}
  assert np.isfinite(next(iter(ds))["labels"]).all()


def test_malformed_record_is_one_line_and_pickles():
  e = records.MalformedRecord("bad_chat", "template said:\nno\r\nway")
  assert str(e) == "template said: no way" and e.where is None
  located = e.at("f.jsonl:3")
  assert str(located) == "f.jsonl:3: template said: no way"
  assert located.at("elsewhere:1") is located  # the first location stays
  clone = pickle.loads(pickle.dumps(located))
  assert (clone.reason, clone.where, str(clone)) == (
      "bad_chat", "f.jsonl:3", str(located))
  with pytest.raises(ValueError, match="unknown malformed-record reason"):
    records.MalformedRecord("oops", "x")
