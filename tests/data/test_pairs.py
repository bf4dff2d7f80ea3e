"""Pair / N-view data: record errors, batch format, sampler, tasks, mining."""

import itertools
import json

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignax.data import embedded
from alignax.data import pairs
from alignax.data import retrieval_task
from alignax.data import sources
from alignax.data import tokenizer as tok_lib


class CharBackend:
  """A tiny deterministic vocabulary: one id per character (ord % 90 + 4)."""
  size, bos_id, eos_id = 100, 2, 3

  def encode(self, text):
    return [ord(ch) % 90 + 4 for ch in text]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]

  def decode(self, ids):
    return "".join(chr(i) for i in ids)


TOKENIZER = tok_lib.Tokenizer(CharBackend(), num_sentinels=4)
EOS = TOKENIZER.eos_id


def data_config(**fields):
  c = ml_collections.ConfigDict(dict(
      source="jsonl", paths=(), eval_paths=(), skip_malformed=False,
      num_threads=1, prefetch_buffer_size=2))
  c.update(fields)
  return c


def write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


@pytest.mark.parametrize("bad,match", [
    ({"positive": "p"}, "missing field 'query'"),
    ({"query": 3, "positive": "p"}, "field 'query' must be a non-empty string"),
    ({"query": "q", "positive": "p", "negatives": "n"},
     "field 'negatives' must be a list of strings"),
    ({"query": "q", "positive": "p", "negatives": ["a"]},
     "field 'negatives' has 1 entries"),
    ({"views": ["a", 2, "c"]}, "field 'views' must be a list of strings"),
    ("[1, 2]", "not a JSON object"),
    ("{not json", "malformed JSON"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, bad, match):
  good = {"query": "q", "positive": "p", "negatives": ["a", "b"]}
  path = write_jsonl(tmp_path / "pairs.jsonl", [good, good, bad])
  source = pairs.PairSource(sources.JsonlSource(path, None),
                            num_views=4 if "views" not in str(bad) else 3)
  assert source[0] == good or "views" in str(bad)
  with pytest.raises(ValueError, match=f"pairs.jsonl:3: .*{match}"):
    source[2]


def test_parquet_errors_name_file_row_and_field(tmp_path):
  path = str(tmp_path / "pairs.parquet")
  pq.write_table(pa.table({"query": ["q1", "q2"], "positive": ["p1", None]}),
                 path)
  source = pairs.build_pair_source(
      data_config(source="parquet", paths=(path,)), "train")
  assert source[0]["positive"] == "p1"
  with pytest.raises(ValueError, match="pairs.parquet:row 1: field 'positive'"):
    source[1]


def test_view_batches_format_prefixes_and_truncation(tmp_path):
  records = [{"query": "qq", "positive": "pos", "negatives": ["n" * 20]},
             {"views": ["aa", "bbb", "c"]}]
  path = write_jsonl(tmp_path / "a.jsonl", records)
  cfg = data_config(paths=(path,), eval_paths=(path,), num_views=3,
                    query_prefix="Q:", doc_prefix="D:")
  batches = pairs.build_pair_eval_batches(cfg, TOKENIZER, seq_len=8,
                                          batch_size=2)
  assert len(batches) == 1
  tokens, segs = batches[0]["tokens"], batches[0]["segment_ids"]
  assert tokens.shape == segs.shape == (2, 3, 8)
  enc = CharBackend().encode
  np.testing.assert_array_equal(tokens[0, 0, :5], enc("Q:qq") + [EOS])
  np.testing.assert_array_equal(segs[0, 0], [1] * 5 + [0] * 3)
  np.testing.assert_array_equal(tokens[0, 1, :6], enc("D:pos") + [EOS])
  # Truncated: 7 text tokens, then EOS in the last slot.
  np.testing.assert_array_equal(tokens[0, 2], enc("D:nnnnn") + [EOS])
  # N-view records are symmetric: no prefixes.
  np.testing.assert_array_equal(tokens[1, :, 0], enc("abc"))
  assert (tokens * (1 - segs) == 0).all()  # padding is 0


def test_no_duplicates_batches_and_resume(tmp_path):
  # 40 pairs over only 10 distinct positives: duplicates are everywhere.
  records = [{"query": f"q{i}", "positive": f"p{i % 10}"} for i in range(40)]
  path = write_jsonl(tmp_path / "dup.jsonl", records)
  cfg = data_config(paths=(path,), dedupe_window=3)
  ds = pairs.build_pairs_dataset(cfg, TOKENIZER, split="train", seed=3,
                                 seq_len=16, batch_size=4)
  it = iter(ds)
  seen = list(itertools.islice(it, 6))
  for batch in seen:
    assert batch["tokens"].shape == (4, 2, 16)
    rows = {tuple(r) for r in batch["tokens"].reshape(8, 16)}
    assert len(rows) == 8  # 8 distinct texts in every batch
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  it2 = iter(ds)
  it2.set_state(state)
  for a, b in zip(want, (next(it2) for _ in range(3))):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  # Hand case of the greedy sampler: a window of 5 examples into 2 batches of
  # 2; (x, y) repeats y of the first batch, so it opens the second one.
  ex = lambda *texts: {"texts": texts, "tokens": np.zeros((2, 1)),
                       "segment_ids": np.zeros((2, 1))}
  out = pairs.NoDuplicateBatches(2, 2).flat_map(
      [ex("a", "y"), ex("x", "y"), ex("b", "c"), ex("a", "z"), ex("d", "e")])
  assert len(out) == 2  # [a y, b c] and [x y, a z]; (d, e) finds no room


def test_cafe_batches_carry_both(tmp_path):
  path = write_jsonl(tmp_path / "p.jsonl",
                     [{"query": f"q{i}", "positive": f"p{i}"} for i in range(8)])
  text = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world " * 5}] * 4)
  cfg = data_config(paths=(path,), eval_paths=(path,), lm_source="jsonl",
                    lm_paths=(text,), lm_eval_paths=(text,), text_field="text")
  batch = next(iter(pairs.build_cafe_dataset(
      cfg, TOKENIZER, split="train", seed=0, seq_len=8, batch_size=4)))
  assert batch["tokens"].shape == (4, 2, 8)
  assert batch["lm_inputs"].shape == batch["lm_segment_ids"].shape == (4, 8)
  evals = pairs.build_cafe_eval_batches(cfg, TOKENIZER, seq_len=8,
                                        batch_size=4, num_batches=5)
  assert len(evals) == 2 and "lm_targets" in evals[1]
  with pytest.raises(ValueError, match="too few"):
    pairs.build_pair_eval_batches(cfg, TOKENIZER, seq_len=8, batch_size=9)


SOURCE = '''
def documented(a, b):
    """Add two numbers and return the sum.

    Longer description.
    """
    total = a + b
    return total

class K:
    async def method(self):
        """Fetch the thing from the remote."""
        # a comment kept
        x = await self.get()
        return x

def short(): """One line docstring here."""; return 1

def tiny():
    """Too short."""
    return 1

def only_doc():
    """Has nothing but a docstring body."""
'''


def test_function_pairs_strip_docstrings():
  got = retrieval_task.function_pairs(SOURCE, "stdlib/x.py")
  assert [p["name"] for p in got] == ["stdlib/x.py:2", "stdlib/x.py:11"]
  assert got[0]["query"] == "Add two numbers and return the sum."
  assert got[0]["positive"] == ("def documented(a, b):\n    total = a + b\n"
                                "    return total")
  assert got[1]["query"] == "Fetch the thing from the remote."
  assert got[1]["positive"].startswith("async def method(self):\n    # a")
  assert retrieval_task.function_pairs("def (", "bad.py") == []


def test_embedded_task_split_does_not_leak():
  heldout = retrieval_task.code_search_pairs("heldout")
  train = retrieval_task.code_search_pairs("train")
  assert len(heldout) > 50 and len(train) > 1000
  doc = lambda p: p["name"].rsplit(":", 1)[0]
  assert all(embedded.is_heldout(doc(p)) for p in heldout)
  assert not any(embedded.is_heldout(doc(p)) for p in train)
  # The pretraining train split holds none of the held-out documents.
  train_docs = {d["name"] for d in embedded.embedded_documents("train")}
  assert not {doc(p) for p in heldout} & train_docs
  assert not {p["positive"] for p in heldout} & {p["positive"] for p in train}
  with pytest.raises(ValueError, match="no hard negatives"):
    pairs.build_pair_source(data_config(source="embedded", num_views=3),
                            "train")


def test_retrieval_set_and_hard_negative_selection(tmp_path):
  records = [{"query": "q0", "positive": "p0", "negatives": ["p1"]},
             {"query": "q1", "positive": "p1", "negatives": ["p0"]},
             {"query": "q2", "positive": "p2", "negatives": ["n"]}]
  path = write_jsonl(tmp_path / "r.jsonl", records)
  cfg = data_config(eval_paths=(path,), num_views=3)
  queries, corpus, relevant, is_pair = pairs.retrieval_set(cfg, "eval")
  assert queries == ["q0", "q1", "q2"] and is_pair
  assert corpus == ["p0", "p1", "p2", "n"]
  assert relevant == [[0], [1], [2]]
  # Hand case: query 0's ranking is [3, 0, 2, 1] with scores 9, 8, 7.5, 1.
  scores = np.array([[9.0, 8.0, 7.5, 1.0]])
  ids = np.array([[3, 0, 2, 1]])
  pick = lambda **kw: pairs.select_hard_negatives(scores, ids, [0], **kw)
  np.testing.assert_array_equal(pick(num_negatives=2), [[3, 2]])
  np.testing.assert_array_equal(pick(num_negatives=2, skip_top=1), [[2, 1]])
  # margin 0.4: only documents scoring <= 8 - 0.4 qualify (2, 1).
  np.testing.assert_array_equal(pick(num_negatives=2, margin=0.4), [[2, 1]])
  np.testing.assert_array_equal(pick(num_negatives=3, margin=0.4),
                                [[2, 1, -1]])
  out = tmp_path / "mined.jsonl"
  n = pairs.write_with_negatives(
      [{"query": "a", "positive": "p0"}, {"query": "b", "positive": "p1"}],
      np.array([[3, 2], [0, -1]]), corpus, out)
  assert n == 1
  assert json.loads(out.read_text()) == {"query": "a", "positive": "p0",
                                         "negatives": ["n", "p2"]}
