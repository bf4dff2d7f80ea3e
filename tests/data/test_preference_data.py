"""Preference records, truncation, packed layouts and the embedded task."""

import difflib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignax import defaults
from alignax.data import embedded
from alignax.data import preference
from alignax.data import preference_packing as packing
from alignax.data import preference_task
from alignax.data import tokenizer as tok_lib

DOCS = ["def foo(bar):\n  return bar + 1  # the quick brown fox\n",
        "Which name fits? Pick the best answer, please.\n",
        "<|user|>\nhello there\n<|assistant|>\nhi!\n"] * 40


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tok_lib.train_or_load_sentencepiece(
      str(tmp_path_factory.mktemp("tok")), 300, 8, documents=DOCS)


def data_cfg(tmp_path, records, fmt="pairs", **pref):
  path = tmp_path / "train.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  c = defaults.base_config().data
  c.update(source="jsonl", paths=(str(path),), eval_paths=(str(path),),
           task="preference")
  c.preference.update(format=fmt, **pref)
  return c


PAIRS = [{"prompt": f"fox {i} " * (1 + i % 3), "chosen": "foo(" * (1 + i % 2),
          "rejected": "bar+1"} for i in range(12)]


def test_parse_plain_chat_lists_and_binary():
  chat = {"prompt": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "hello"}],
          "chosen": [{"role": "assistant", "content": "hi"}],
          "rejected": "go away"}
  ex = preference.parse_pair(chat)
  # The documented template, written out by hand.
  assert ex["prompt"] == ("<|system|>\nbe brief\n<|user|>\nhello\n"
                          "<|assistant|>\n")
  assert ex["responses"] == ["hi\n", "go away"] and ex["labels"] == [1.0, 0.0]
  ex = preference.parse_list({"prompt": "p", "responses": ["a", "b", "c"],
                              "scores": [0.5, 2, -1], "safety": [1, 2, 3]},
                             reward_fields=("safety",))
  assert ex["labels"] == [0.5, 2.0, -1.0]
  assert ex["rewards"] == [[1.0], [2.0], [3.0]]
  ex = preference.parse_pair({"prompt": "p", "chosen": "a", "rejected": "b",
                              "chosen_safety": 1, "rejected_safety": -2.5},
                             reward_fields=("safety",))
  assert ex["rewards"] == [[1.0], [-2.5]]
  ex = preference.parse_binary({"prompt": "p", "completion": "c",
                                "label": True})
  assert ex["responses"] == ["c"] and ex["labels"] == [1.0]


@pytest.mark.parametrize("record,line,field", [
    ({"prompt": "p", "chosen": "a"}, 3, "'rejected'"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, 3, "'chosen'"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, 3,
     "'prompt'\\[0\\]"),
])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, record, line,
                                                   field):
  path = tmp_path / "bad.jsonl"
  # Line 2 is blank (ignored); the bad record is on line 3.
  path.write_text(json.dumps(PAIRS[0]) + "\n\n" + json.dumps(record) + "\n")
  c = data_cfg(tmp_path, PAIRS)
  c.paths = (str(path),)
  records = preference.record_source(c, "train")
  assert records[0]["responses"][1] == "bar+1"
  with pytest.raises(ValueError, match=f"bad.jsonl:{line}: .*{field}"):
    records[1]  # pylint: disable=pointless-statement
  c.skip_malformed = True
  records = preference.record_source(c, "train")
  assert len(records) == 1 and records.num_skipped == 1


def test_malformed_lists_and_parquet_rows_are_located(tmp_path):
  c = data_cfg(tmp_path, [{"prompt": "p", "responses": ["a", "b"],
                           "scores": [1.0]}], fmt="lists")
  with pytest.raises(ValueError, match=r"train.jsonl:1: .*'scores'.*2 numbers"):
    preference.record_source(c, "train")[0]
  path = tmp_path / "pairs.parquet"
  pq.write_table(pa.Table.from_pylist(
      [{"prompt": "p", "chosen": "a", "rejected": "b"},
       {"prompt": "p", "chosen": "a", "rejected": None}]), path)
  c.update(source="parquet", paths=(str(path),))
  c.preference.format = "pairs"
  records = preference.record_source(c, "train")
  assert records[0]["responses"] == ["a", "b"]
  with pytest.raises(ValueError, match="pairs.parquet:row 1: .*'rejected'"):
    records[1]  # pylint: disable=pointless-statement


def test_truncation_keeps_prompt_end_and_response_start(tok):
  c = defaults.base_config().data.preference
  c.update(max_prompt_len=5, max_response_len=3)
  prompt = "fox " * 20
  mapped = preference.TokenizeExample(tok, c, seq_len=64).map(
      {"index": 0, "prompt": prompt, "responses": ["foo(bar) " * 5, "x"],
       "labels": [1.0, 0.0], "rewards": [[], []]})
  full_prompt = [tok.bos_id] + tok.encode(prompt)
  assert mapped["prompt"] == [tok.bos_id] + full_prompt[-4:]
  assert mapped["responses"][0] == tok.encode("foo(bar) " * 5)[:3]
  assert mapped["responses"][1] == tok.encode("x") + [tok.eos_id]
  # Too long for the row: responses shrink to a common length first...
  p, rs = preference.fit_group(list(range(10)), [list(range(8))] * 2,
                               seq_len=15, shared_prompt=True)
  assert (len(p), [len(r) for r in rs]) == (10, [3, 3])  # 9 + 3 + 3 = 15
  p, rs = preference.fit_group(list(range(10)), [list(range(8))] * 2,
                               seq_len=24, shared_prompt=False)
  assert [len(r) for r in rs] == [3, 3]  # 2 * (10 + 3 - 1) = 24
  # ...then the prompt loses its start (BOS kept).
  p, rs = preference.fit_group(list(range(10)), [list(range(8))] * 3,
                               seq_len=6, shared_prompt=True)
  assert p == [0, 7, 8, 9] and [len(r) for r in rs] == [1, 1, 1]


def test_trl_max_length_keeps_trls_sequences_and_fits_one_row(tok):
  """data.preference.max_length = TRL's max_length (keep_start): each
  prompt + response is the first max_length tokens of TRL's sequence, and
  the seq_len the config check asks for holds the pair uncut."""
  c = defaults.base_config()
  c.data.task, c.data.preference.max_length = "preference", 24
  prompt, long, short = "fox " * 2, "foo(bar) " * 20, "x"
  ids_p = [tok.bos_id] + tok.encode(prompt)
  assert 1 < len(ids_p) < 23 and len(tok.encode(long)) > 30
  mapped = preference.TokenizeExample(
      tok, c.data.preference, seq_len=2 * (24 - 1)).map(
          {"index": 0, "prompt": prompt, "responses": [long, short],
           "labels": [1.0, 0.0], "rewards": [[], []]})
  # TRL's collator: (prompt_ids + completion_ids)[:max_length].
  trl = lambda r: (ids_p + tok.encode(r) + [tok.eos_id])[:24]
  assert mapped["prompt"] + mapped["responses"][0] == trl(long)
  assert mapped["prompt"] + mapped["responses"][1] == trl(short)
  assert len(mapped["prompt"]) + len(mapped["responses"][0]) == 24
  # A reward model scores the rows it was trained on (no EOS appended).
  from alignax import onpolicy  # pylint: disable=import-outside-toplevel
  ids, prompt_len = onpolicy.score_row(tok, c.data.preference, prompt, long)
  assert ids == trl(long) and prompt_len == len(ids_p)  # cut: no EOS left
  ids, _ = onpolicy.score_row(tok, c.data.preference, prompt, short)
  assert ids == trl(short)[:-1] and trl(short)[-1] == tok.eos_id
  # max_prompt_len / max_response_len (5 and 3 here) no longer apply.
  c.data.preference.update(max_prompt_len=5, max_response_len=3)
  again = preference.TokenizeExample(tok, c.data.preference, seq_len=46).map(
      {"index": 0, "prompt": prompt, "responses": [long, short],
       "labels": [1.0, 0.0], "rewards": [[], []]})
  assert again["responses"] == mapped["responses"]
  # A prompt that alone fills max_length keeps its end and one response token.
  huge = preference.TokenizeExample(tok, c.data.preference, seq_len=46).map(
      {"index": 0, "prompt": "fox " * 40, "responses": [long, short],
       "labels": [1.0, 0.0], "rewards": [[], []]})
  assert len(huge["prompt"]) == 23 and huge["prompt"][0] == tok.bos_id
  assert [len(r) for r in huge["responses"]] == [1, 1]
  # The row check: K (max_length - 1) positions, a pair of TRL's 256 -> 510.
  c.data.preference.max_length = 256
  c.model.max_seq_len = c.train.seq_len = 509
  with pytest.raises(ValueError, match=r"seq_len=509 cannot hold 2 responses"
                     r".*max_length=256.*seq_len >= 510"):
    defaults.check_values(c)
  c.model.max_seq_len = c.train.seq_len = 510
  defaults.check_values(c)
  c.data.preference.update(format="lists", list_size=4)
  with pytest.raises(ValueError, match=r"seq_len >= 1020"):
    defaults.check_values(c)
  # Worst case: a 1-token prompt, every response max_length - 1 tokens.
  p, rs = preference.fit_group([1], [list(range(255))] * 2, seq_len=510,
                               shared_prompt=True)
  assert (len(p), [len(r) for r in rs]) == (1, [255, 255])
  p, rs = preference.fit_group([1], [list(range(255))] * 2, seq_len=510,
                               shared_prompt=False)
  assert [len(r) for r in rs] == [255, 255]


def _groups(batch, k):
  """Rebuilds each valid response's full (prompt + response) token list."""
  out = {}
  for b in range(batch["inputs"].shape[0]):
    seg, att = batch["segment_ids"][b], batch["attend_to"][b]
    for s in np.nonzero(batch["valid"][b])[0]:
      on = (batch["slot"][b] == s) & (batch["weights"][b] > 0)
      sid = seg[on][0]
      own = seg == sid
      prompt_seg = att[own][0]
      prompt = list(batch["inputs"][b][seg == prompt_seg]) if prompt_seg else []
      tokens = prompt + list(batch["inputs"][b][own]) + [
          batch["targets"][b][own][-1]]
      # Positions run on from the prompt: the padded layout's arange.
      assert list(batch["positions"][b][own]) == list(
          range(len(prompt), len(prompt) + own.sum()))
      out[(int(batch["index"][b, s]), int(s % k))] = (
          tokens, list(batch["targets"][b][on]), float(batch["labels"][b, s]))
  return out


@pytest.mark.parametrize("shared", [True, False])
def test_packed_groups_rebuild_the_examples(tmp_path, tok, shared):
  c = data_cfg(tmp_path, PAIRS, shared_prompt=shared, groups_per_row=3)
  ds = preference.build_preference_dataset(
      c, tok, split="train", seed=0, seq_len=64, batch_size=4, num_epochs=1)
  batches = list(ds)
  groups = {}
  for batch in batches:
    assert batch["inputs"].shape == (4, 64)
    assert batch["labels"].shape == (4, 6) and batch["rewards"].shape == (4, 6, 0)
    groups.update(_groups(batch, 2))
  for (i, k), (tokens, targets, label) in groups.items():
    rec = PAIRS[i]
    prompt = [tok.bos_id] + tok.encode(rec["prompt"])
    response = tok.encode(rec["chosen" if k == 0 else "rejected"]) + [
        tok.eos_id]
    assert tokens == prompt + response and targets == response
    assert label == (1.0 if k == 0 else 0.0)
  assert len(groups) >= 16  # most of the 12 pairs (the last rows dropped)
  # Several pairs per row.
  assert max(int(b["valid"][r].sum()) for b in batches for r in range(4)) >= 4


def test_eval_batches_pad_with_empty_rows(tmp_path, tok):
  c = data_cfg(tmp_path, PAIRS[:3])
  batches = preference.build_preference_eval_batches(
      c, tok, seq_len=48, batch_size=2, num_batches=3)
  assert len(batches) == 3
  assert int(sum(b["valid"].sum() for b in batches)) == 6
  assert not batches[-1]["valid"].any() and not batches[-1]["weights"].any()
  empty = packing.empty_rows(packing.Layout(2, 4), 2, 48)
  assert sorted(empty) == sorted(batches[0])


def test_binary_records_carry_the_next_completion(tmp_path):
  recs = [{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2}
          for i in range(3)]
  records = preference.record_source(data_cfg(tmp_path, recs, "binary"),
                                     "train")
  assert records[2]["responses"] == ["c2", "c0"]
  assert records[1]["labels"] == [1.0, 0.0]


def test_embedded_task_labels_are_computed_and_split():
  lists = preference_task.DocstringNames("eval", "lists", list_size=4)
  pairs = preference_task.DocstringNames("eval", "pairs", list_size=4)
  for i in (0, 7, 123):
    rec, pair = lists[i], pairs[i]
    prompt, name, scored = lists.candidates(i)
    assert rec["prompt"] == prompt and prompt.endswith("\ndef ")
    assert len(set(rec["responses"])) == 4
    for resp, score in zip(rec["responses"], rec["scores"]):
      ratio = difflib.SequenceMatcher(None, name, resp[:-1]).ratio()
      assert score == pytest.approx(ratio)
    assert max(rec["scores"]) == 1.0
    # Pairs come from the same draw: the true name against one distractor.
    assert pair["chosen"] == name + "(" and pair["rejected"] in rec["responses"]
    assert lists[i] == rec  # deterministic
  heldout = {n for n, _ in preference_task.documented_functions("heldout")}
  names = set()
  for doc in embedded.embedded_documents("heldout"):
    if doc["name"].endswith(".py"):
      names |= {n for n, _ in preference_task._functions_of(doc["text"])}  # pylint: disable=protected-access
  assert heldout == names and heldout
  assert len(preference_task.DocstringNames("eval", "pairs")) == 4 * len(
      preference_task.documented_functions("heldout"))
