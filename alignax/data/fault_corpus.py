"""A malformed-record corpus for fault trials of the data layer.

:func:`write_corpus` writes files of every source format (JSONL, Parquet,
ArrayRecord) and record kind (text; contrastive pairs; preference pairs,
lists and binary) in which good records are interleaved with bad ones of
every fault of :mod:`alignax.data.records` (and with blank lines, which are
no records). Each file comes with the expected outcome of every record: good,
or the ``(where, reason)`` of its error. :func:`check` reads a file through
the real builders and compares::

  files = fault_corpus.write_corpus("/tmp/faults", repeats=8)
  for f in files:
    report = fault_corpus.check(f, skip_malformed=False)  # located
    report = fault_corpus.check(f, skip_malformed=True)   # counted

The tests run it (``tests/data/test_fault_corpus.py``); a fault-trial script
can import it too.
"""

import dataclasses
import json
import os

import ml_collections
import numpy as np

from alignax.data import pairs
from alignax.data import preference
from alignax.data import records
from alignax.data import sources

DEEP_OBJECT = b'{"text": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3001
DEEP_LIST = b"[" * 3000 + b"]" * 3000
BLANK_LINES = (b"", b"   ", b"\r", b"\t \r", b"\f")

# Line-level faults of any JSONL file (bytes, reason).
JSON_FAULTS = [
    (b'\xff\xfe{"text": "x"}', "bad_utf8"),
    (b'{"text": "caf\xc3"}', "bad_utf8"),
    (b'{"text": "unterminated', "bad_json"),
    (b'{"text": "a"} trailing', "bad_json"),
    (b"{'text': 'single quotes'}", "bad_json"),
    (DEEP_OBJECT, "too_deep"),
    (DEEP_LIST, "too_deep"),
    (b"[1, 2]", "not_object"),
    (b'"just a string"', "not_object"),
    (b"null", "not_object"),
]
# Record-level faults, per kind: (record, reason). A record given as bytes
# is written as is (JSON escapes that json.dumps would not produce).
TEXT_FAULTS = [
    ({"body": "x"}, "missing_field"), ({}, "missing_field"),
    ({"text": 3}, "wrong_type"), ({"text": None}, "wrong_type"),
    ({"text": ["a"]}, "wrong_type"), ({"text": True}, "wrong_type"),
    (b'{"text": "\\ud800"}', "surrogate"),
    (b'{"text": "ok \\udfff end"}', "surrogate"),
]
TEXT_GOOD = [{"text": "good"}, {"text": ""}, {"text": "\U0001F600 ok"},
             {"text": "x", "extra": [[[1]]]}]
_PAIR = {"prompt": "p", "chosen": "a", "rejected": "b", "chosen_safety": 1,
         "rejected_safety": 0}
PAIRS_FAULTS = [
    ({"prompt": "p", "chosen": "a", "chosen_safety": 1, "rejected_safety": 0},
     "missing_field"),
    (dict(_PAIR, chosen_safety=None), "wrong_type"),
    ({k: v for k, v in _PAIR.items() if k != "chosen"}, "missing_field"),
    (dict(_PAIR, chosen=3), "wrong_type"),
    (dict(_PAIR, prompt=None), "wrong_type"),
    (dict(_PAIR, prompt=[{"role": "user"}]), "wrong_type"),
    (dict(_PAIR, prompt=[]), "wrong_type"),
    (dict(_PAIR, chosen="same", rejected="same"), "identical"),
    (dict(_PAIR, chosen_safety=float("nan")), "non_finite"),
    (dict(_PAIR, rejected_safety=float("inf")), "non_finite"),
    (b'{"prompt": "p", "chosen": "\\ud800", "rejected": "b", '
     b'"chosen_safety": 1, "rejected_safety": 0}', "surrogate"),
    (b'{"prompt": [{"role": "user", "content": "\\udc00"}], "chosen": "a", '
     b'"rejected": "b", "chosen_safety": 1, "rejected_safety": 0}',
     "surrogate"),
]
# (A record without "prompt" is TRL's implicit-prompt format, good in JSONL;
# tests/data/test_formats_issue14.py covers it.)
PAIRS_GOOD = [_PAIR, dict(_PAIR, prompt=""), dict(_PAIR, chosen=""),
              dict(_PAIR, prompt=[{"role": "user", "content": "hi"}])]
_LIST = {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 0.5, 0]}
LISTS_FAULTS = [
    (dict(_LIST, scores=[1, float("inf"), 0]), "non_finite"),
    (dict(_LIST, scores=[float("nan"), 0, 0]), "non_finite"),
    (dict(_LIST, scores=[1, 0, float("-inf")]), "non_finite"),
    (dict(_LIST, scores=[1, 0]), "bad_value"),
    (dict(_LIST, scores=[1, "high", 0]), "wrong_type"),
    (dict(_LIST, scores=1), "wrong_type"),
    ({"prompt": "p", "scores": [1]}, "missing_field"),
    ({"prompt": "p", "responses": ["a"]}, "missing_field"),
    (dict(_LIST, responses=[]), "wrong_type"),
    (dict(_LIST, responses=["a", "a", "a"]), "identical"),
    (dict(_LIST, responses=[3, "b", "c"]), "wrong_type"),
    (b'{"prompt": "p", "responses": ["a", "\\ud83d", "c"], '
     b'"scores": [1, 0, 0]}', "surrogate"),
]
LISTS_GOOD = [_LIST, dict(_LIST, prompt=""), dict(_LIST, responses=["", "b",
                                                                     "c"])]
_BINARY = {"prompt": "p", "completion": "c", "label": True}
BINARY_FAULTS = [
    (dict(_BINARY, label=2), "bad_value"),
    (dict(_BINARY, label="yes"), "wrong_type"),
    (dict(_BINARY, label=float("nan")), "non_finite"),
    ({"prompt": "p", "completion": "c"}, "missing_field"),
    (dict(_BINARY, completion=3), "wrong_type"),
    ({"prompt": "p", "label": 0}, "missing_field"),
    (b'{"prompt": "\\udbff", "completion": "c", "label": 1}', "surrogate"),
]
BINARY_GOOD = [_BINARY, dict(_BINARY, completion="", label=0),
               dict(_BINARY, prompt="", label=1.0)]
_VIEWS = {"query": "q", "positive": "p", "negatives": ["n"]}
VIEWS_FAULTS = [
    ({"positive": "p", "negatives": ["n"]}, "missing_field"),
    ({"query": "q", "positive": "p"}, "missing_field"),
    (dict(_VIEWS, query=3), "wrong_type"),
    (dict(_VIEWS, query=""), "empty"),
    (dict(_VIEWS, positive=""), "empty"),
    (dict(_VIEWS, negatives=[]), "too_few"),
    (dict(_VIEWS, negatives="n"), "wrong_type"),
    ({"views": ["a", 2, "c"]}, "wrong_type"),
    ({"views": ["a", "b"]}, "too_few"),
    (b'{"query": "\\ud800", "positive": "p", "negatives": ["n"]}',
     "surrogate"),
    (b'{"views": ["a", "\\udfff", "c"]}', "surrogate"),
]
VIEWS_GOOD = [_VIEWS, {"views": ["a", "b", "c", "d"]}]
KINDS = {  # kind -> (faults, good records, config overrides)
    "text": (TEXT_FAULTS, TEXT_GOOD, {"text_field": "text"}),
    "pairs": (PAIRS_FAULTS, PAIRS_GOOD, {"format": "pairs",
                                         "reward_fields": ("safety",)}),
    "lists": (LISTS_FAULTS, LISTS_GOOD, {"format": "lists"}),
    "binary": (BINARY_FAULTS, BINARY_GOOD, {"format": "binary"}),
    "views": (VIEWS_FAULTS, VIEWS_GOOD, {"num_views": 3}),
}


@dataclasses.dataclass
class CorpusFile:
  """One written file and the expected outcome of each of its records.

  Attributes:
    kind: a key of ``KINDS``.
    source: ``'jsonl'``, ``'parquet'`` or ``'array_record'``.
    path: the file.
    expected: per record (blank lines excluded), ``None`` for a good record
      or ``(where, reason)`` of its error.
  """
  kind: str
  source: str
  path: str
  expected: list


def _encode(record):
  return record if isinstance(record, bytes) else json.dumps(record).encode()


def _mixed(kind, repeats, seed, line_faults=True):
  """``[(bytes, reason or None)]``: good and bad records, shuffled."""
  faults, good, _ = KINDS[kind]
  items = [(_encode(r), reason) for r, reason in faults]
  if line_faults:
    items += JSON_FAULTS
  items = items * repeats + [(_encode(r), None) for r in good] * repeats
  order = np.random.default_rng(seed).permutation(len(items))
  return [items[i] for i in order]


def _write_jsonl(path, kind, repeats, seed):
  rng = np.random.default_rng(seed + 1)
  expected, lineno = [], 0
  with open(path, "wb") as f:
    for line, reason in _mixed(kind, repeats, seed):
      for _ in range(int(rng.integers(0, 2))):  # blank lines in between
        f.write(BLANK_LINES[int(rng.integers(len(BLANK_LINES)))] + b"\n")
        lineno += 1
      f.write(line + b"\n")
      lineno += 1
      expected.append(reason and (f"{path}:{lineno}", reason))
  return CorpusFile(kind, "jsonl", path, expected)


def _write_array_record(path, kind, repeats, seed):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  # Raw text is a valid text record, and bad JSON starting with '{' is raw
  # text (ArrayRecordSource's rule): only object-level faults apply.
  items = _mixed(kind, repeats, seed, line_faults=False)
  items += [(JSON_FAULTS[0][0], "bad_utf8"), (DEEP_OBJECT, "too_deep")] * (
      repeats)
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  expected = []
  for i, (record, reason) in enumerate(items):
    writer.write(record)
    expected.append(reason and (f"{path}:record {i}", reason))
  writer.close()
  return CorpusFile(kind, "array_record", path, expected)


def _signature(value):
  """A Parquet column type for ``value``; None fits any, 'mixed' none."""
  if value is None:
    return None
  if isinstance(value, list):
    inner = {_signature(v) for v in value} - {None}
    return "mixed" if len(inner) > 1 or "mixed" in inner else (
        f"list:{inner.pop() if inner else ''}")
  if isinstance(value, (bool, int, float)):
    return "bool" if isinstance(value, bool) else "number"
  return "str" if isinstance(value, str) else "mixed"


def _parquet_rows(kind, repeats, seed):
  """The records a Parquet file can hold, with their reasons.

  A column holds one type: records whose fields do not fit the types of the
  good records are left out, and a field a record lacks is a null (so
  ``missing_field`` becomes ``wrong_type``).
  """
  types = {}
  for record in KINDS[kind][1]:
    for key, value in record.items():
      types.setdefault(key, _signature(value))
  rows = []
  for raw, reason in _mixed(kind, repeats, seed, line_faults=False):
    record = json.loads(raw)
    if any(types.get(k, "absent") not in (_signature(v), "list:")
           and _signature(v) is not None for k, v in record.items()):
      continue
    if reason == "surrogate":  # pyarrow stores only valid UTF-8 text
      continue
    rows.append(({k: record.get(k) for k in types},
                 "wrong_type" if reason == "missing_field" else reason))
  return rows


def _write_parquet(path, kind, repeats, seed):
  """Parquet rows of the records that fit typed columns, plus bad bytes."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rows = _parquet_rows(kind, repeats, seed)
  columns = {k: [r[k] for r, _ in rows] for k in rows[0][0]}
  reasons = [reason for _, reason in rows]
  if kind == "text":  # a bytes column: invalid UTF-8 (and surrogates) too
    bad = [b"\xff", b"\xed\xa0\x80"] * repeats
    columns = {"text": [None if t is None else t.encode()
                        for t in columns["text"]] + bad}
    columns = {"text": pa.array(columns["text"], pa.binary())}
    reasons += ["bad_utf8"] * len(bad)
  pq.write_table(pa.table(columns), path)
  expected = [reason and (f"{path}:row {i}", reason)
              for i, reason in enumerate(reasons)]
  return CorpusFile(kind, "parquet", path, expected)


def write_corpus(directory, repeats=8, seed=0):
  """Writes the corpus under ``directory``; returns its ``CorpusFile``s.

  Every kind in every format; ``repeats`` copies of each fault and of each
  good record per file, in a random order.
  """
  os.makedirs(directory, exist_ok=True)
  files = []
  for i, kind in enumerate(KINDS):
    for writer, ext in ((_write_jsonl, "jsonl"), (_write_parquet, "parquet"),
                        (_write_array_record, "array_record")):
      path = os.path.join(directory, f"{kind}.{ext}")
      files.append(writer(path, kind, repeats, seed + i))
  return files


def data_config(corpus_file, skip_malformed):
  """The ``data`` config that reads ``corpus_file``."""
  overrides = dict(KINDS[corpus_file.kind][2])
  pref = ml_collections.ConfigDict(dict(
      format=overrides.pop("format", "pairs"),
      reward_fields=overrides.pop("reward_fields", ()), list_size=4,
      chat_template="", task_repeats=1))
  cfg = ml_collections.ConfigDict(dict(
      source=corpus_file.source, paths=(corpus_file.path,),
      eval_paths=(corpus_file.path,), text_field="text", tfds_name="",
      tfds_data_dir="", skip_malformed=skip_malformed, preference=pref))
  cfg.update(overrides)
  return cfg


def build(corpus_file, skip_malformed):
  """The checked source of ``corpus_file``, as the train builders make it."""
  cfg = data_config(corpus_file, skip_malformed)
  if corpus_file.kind == "text":
    return sources.build_source(cfg, "train")
  if corpus_file.kind == "views":
    return pairs.build_pair_source(cfg, "train")
  return preference.record_source(cfg, "train")


def check(corpus_file, skip_malformed):
  """Reads every record of ``corpus_file``; returns what went wrong.

  Returns:
    a list of problems (empty when every bad record was located with the
    right reason, or skipped and counted, and every good record read).
  """
  expected = corpus_file.expected
  want_bad = [e for e in expected if e is not None]
  source = build(corpus_file, skip_malformed)
  problems = []
  if skip_malformed:
    want = {}
    for _, reason in want_bad:
      want[reason] = want.get(reason, 0) + 1
    if records.skip_counts(source) != want:
      problems.append(f"counts {records.skip_counts(source)} != {want}")
    if len(source) != len(expected) - len(want_bad):
      problems.append(f"{len(source)} records kept, want "
                      f"{len(expected) - len(want_bad)}")
    for i in range(len(source)):
      _read_good(source, i, f"kept record {i}", problems)
    return problems
  if len(source) != len(expected):
    return [f"{len(source)} records indexed, want {len(expected)}"]
  for i, want_error in enumerate(expected):
    if want_error is None and corpus_file.kind == "binary":
      # A binary record reads the next one too (KTO's KL completion), so a
      # bad next record fails this read, naming the bad one.
      want_error = expected[(i + 1) % len(expected)]
    if want_error is None:
      _read_good(source, i, f"record {i}", problems)
      continue
    try:
      source[i]  # pylint: disable=pointless-statement
      problems.append(f"{want_error}: passed silently")
    except records.MalformedRecord as e:
      got = (e.where, e.reason)
      if got != tuple(want_error) or "\n" in str(e) or (
          not str(e).startswith(f"{e.where}: ")):
        problems.append(f"{want_error}: got {got}: {e}")
  return problems


def _read_good(source, index, name, problems):
  try:
    record = source[index]
    # What the tokenizer will see must be encodable text.
    json.dumps(record, ensure_ascii=False).encode("utf-8")
  except (ValueError, RecursionError) as e:  # UnicodeError is a ValueError.
    problems.append(f"{name}: {type(e).__name__}: {e}")
