"""Tests for the embedded corpus and the random-access text sources."""

import hashlib
import json
import os
import pickle
import sysconfig

from array_record.python import array_record_module
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignax.data import embedded
from alignax.data import sources


def _data_cfg(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      source="embedded", paths=[], eval_paths=[], text_field="text",
      tfds_name="", tfds_data_dir="", skip_malformed=False))
  cfg.update(overrides)
  return cfg


def _write_lines(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return str(path)


# ----------------------------------------------------------------- embedded


def test_embedded_corpus_is_nonempty_and_named():
  train = embedded.embedded_documents("train")
  heldout = embedded.embedded_documents("heldout")
  assert len(train) > 300 and heldout
  names = [d["name"] for d in train + heldout]
  assert len(set(names)) == len(names)
  assert all(n.startswith(("stdlib/", "pydoc/topic/")) for n in names)
  for bad in ("/test/", "/tests/", "idlelib/", "lib2to3/", "site-packages/",
              "_sysconfigdata"):
    assert not any(bad in n for n in names), bad
  assert "pydoc/topic/assert" in names
  by_name = {d["name"]: d["text"] for d in train + heldout}
  path = os.path.join(sysconfig.get_paths()["stdlib"], "json", "decoder.py")
  with open(path, encoding="utf-8") as f:
    assert by_name["stdlib/json/decoder.py"] == f.read()
  assert all(isinstance(d["text"], str) for d in train)


def test_embedded_split_is_disjoint_deterministic_and_sorted():
  train = embedded.embedded_documents("train", 0.3)
  heldout = embedded.embedded_documents("heldout", 0.3)
  train_names = [d["name"] for d in train]
  heldout_names = [d["name"] for d in heldout]
  assert not set(train_names) & set(heldout_names)
  # Same documents in the same order on a second call (and a second split).
  assert [d["name"] for d in embedded.embedded_documents("train", 0.3)] == (
      train_names)
  stdlib = [n for n in train_names if n.startswith("stdlib/")]
  assert stdlib == sorted(stdlib)
  share = len(heldout) / (len(train) + len(heldout))
  assert 0.24 < share < 0.36  # 0.3 +- ~4 binomial standard deviations.
  for doc in heldout:
    assert embedded.is_heldout(doc["name"], 0.3)


def test_is_heldout_matches_independent_sha1_and_fraction():
  names = [f"doc/{i}" for i in range(20_000)]
  for name in names[:200]:
    # Independent reference: the top 64 bits of sha1 as a fraction of 2**64.
    u = int(hashlib.sha1(name.encode()).hexdigest()[:16], 16) / 2.0**64
    assert embedded.is_heldout(name, 0.1) == (u < 0.1)
  share = np.mean([embedded.is_heldout(n, 0.1) for n in names])
  assert abs(share - 0.1) < 0.01
  assert not any(embedded.is_heldout(n, 0.0) for n in names[:100])
  assert all(embedded.is_heldout(n, 1.0) for n in names[:100])
  with pytest.raises(ValueError, match="fraction"):
    embedded.is_heldout("x", 1.5)


def test_embedded_documents_are_cached_and_validate_split():
  embedded.embedded_documents("train")
  hits = embedded._all_documents.cache_info().hits
  embedded.embedded_documents("heldout", 0.05)
  assert embedded._all_documents.cache_info().hits == hits + 1
  with pytest.raises(ValueError, match="heldout"):
    embedded.embedded_documents("validation")


def test_embedded_source():
  source = sources.EmbeddedSource("heldout")
  docs = embedded.embedded_documents("heldout")
  assert len(source) == len(docs)
  assert source[0] == {"text": docs[0]["text"]}


# -------------------------------------------------------------------- JSONL


def test_jsonl_reads_records_across_files(tmp_path):
  a = _write_lines(tmp_path / "a.jsonl", [
      json.dumps({"text": "first", "id": 1}),
      "",  # Empty lines are ignored.
      json.dumps({"text": "sé\ncond\t✓"}),
  ])
  b = _write_lines(tmp_path / "b.jsonl", [json.dumps({"text": "third"})])
  source = sources.JsonlSource([a, b])
  assert len(source) == 3
  assert [source[i]["text"] for i in range(3)] == ["first", "sé\ncond\t✓",
                                                   "third"]
  assert source[0] == {"text": "first"}
  glob_source = sources.JsonlSource(str(tmp_path / "*.jsonl"))
  assert [glob_source[i] for i in range(3)] == [source[i] for i in range(3)]
  whole = sources.JsonlSource(a, text_field=None)
  assert whole[0] == {"text": "first", "id": 1}
  # Picklable (grain worker processes), also after file descriptors opened.
  clone = pickle.loads(pickle.dumps(source))
  assert clone[2] == {"text": "third"}


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
  path = _write_lines(tmp_path / "file.jsonl", [
      json.dumps({"text": "ok"}), json.dumps({"text": "ok2"}),
      '{"text": "unterminated', json.dumps({"text": "ok3"})])
  source = sources.JsonlSource(path)
  assert len(source) == 4
  assert source[3]["text"] == "ok3"
  with pytest.raises(ValueError, match=r"file\.jsonl:3: malformed JSON"):
    source[2]


def test_jsonl_line_numbers_count_empty_lines(tmp_path):
  path = _write_lines(tmp_path / "gaps.jsonl", [
      json.dumps({"text": "ok"}), "", "", "[1, 2]"])
  source = sources.JsonlSource(path)
  with pytest.raises(ValueError, match=r"gaps\.jsonl:4: record is a list"):
    source[1]


def test_jsonl_missing_or_non_string_field_names_the_field(tmp_path):
  path = _write_lines(tmp_path / "f.jsonl", [
      json.dumps({"content": "x"}), json.dumps({"body": 3})])
  with pytest.raises(ValueError, match=r"f\.jsonl:1: missing text field "
                     r"'text' \(record has fields \['content'\]\)"):
    sources.JsonlSource(path)[0]
  with pytest.raises(ValueError, match=r"f\.jsonl:2: text field 'body' is a "
                     r"int"):
    sources.JsonlSource(path, text_field="body")[1]


def test_jsonl_missing_file(tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    sources.JsonlSource(missing)
  with pytest.raises(FileNotFoundError, match=r"\*\.jsonl"):
    sources.JsonlSource(str(tmp_path / "*.jsonl"))


def test_jsonl_skip_malformed_counts_and_drops(tmp_path):
  path = _write_lines(tmp_path / "m.jsonl", [
      json.dumps({"text": "a"}), "not json", json.dumps({"text": "b"}),
      json.dumps({"other": "c"}), json.dumps({"text": "d"})])
  source = sources.JsonlSource(path, skip_malformed=True)
  assert source.num_skipped == 2
  assert [source[i]["text"] for i in range(len(source))] == ["a", "b", "d"]
  assert sources.JsonlSource(path).num_skipped == 0


def test_jsonl_without_trailing_newline_and_crlf(tmp_path):
  path = tmp_path / "crlf.jsonl"
  path.write_bytes(b'{"text": "a"}\r\n{"text": "b"}')
  source = sources.JsonlSource(str(path))
  assert [source[0]["text"], source[1]["text"]] == ["a", "b"]


# ------------------------------------------------ Parquet, ArrayRecord, TFDS


def test_parquet_reads_back(tmp_path):
  for i, texts in enumerate([["p0", "p1"], ["p2", "é🙂\n"]]):
    table = pa.table({"body": texts, "n": list(range(len(texts)))})
    pq.write_table(table, tmp_path / f"part{i}.parquet")
  source = sources.ParquetSource(str(tmp_path / "*.parquet"), "body")
  assert len(source) == 4
  assert [source[i]["text"] for i in range(4)] == ["p0", "p1", "p2", "é🙂\n"]
  with pytest.raises(ValueError, match=r"missing text field 'text'"):
    sources.ParquetSource(str(tmp_path / "part0.parquet"))
  with pytest.raises(IndexError):
    source[4]


def test_parquet_null_text_names_row(tmp_path):
  pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "n.parquet")
  source = sources.ParquetSource(str(tmp_path / "n.parquet"))
  with pytest.raises(ValueError, match=r"n\.parquet:row 1: text field 'text' "
                     r"is a NoneType"):
    source[1]


def test_array_record_reads_json_and_raw_text(tmp_path):
  records = [json.dumps({"text": "from json"}).encode(),
             "raw text ✓\n{not json".encode(),
             json.dumps({"text": "second"}).encode()]
  paths = []
  for i, chunk in enumerate([records[:2], records[2:]]):
    path = str(tmp_path / f"data-{i}.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for record in chunk:
      writer.write(record)
    writer.close()
    paths.append(path)
  source = sources.ArrayRecordSource(paths)
  assert len(source) == 3
  assert [source[i]["text"] for i in range(3)] == [
      "from json", "raw text ✓\n{not json", "second"]
  with pytest.raises(ValueError, match=r"data-1\.array_record:record 0: "
                     r"missing text field 'body'"):
    sources.ArrayRecordSource(paths, "body")[2]


def test_tfds_source_without_tensorflow(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class AlignaxTinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=(
          tfds.features.FeaturesDict({"text": tfds.features.Text()})))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(5),
              "validation": self._generate_examples(2)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"text": f"doc {i} ✓"}

  data_dir = str(tmp_path / "tfds")
  AlignaxTinyText(data_dir=data_dir,
                  file_format="array_record").download_and_prepare()
  cfg = _data_cfg(source="tfds", tfds_name="alignax_tiny_text",
                  tfds_data_dir=data_dir)
  train = sources.build_source(cfg, "train")
  assert len(train) == 5
  assert sorted(train[i]["text"] for i in range(5)) == [
      f"doc {i} ✓" for i in range(5)]
  assert len(sources.build_source(cfg, "eval")) == 2


# ------------------------------------------------------------- build_source


def test_build_source_dispatch_and_errors(tmp_path):
  train = _write_lines(tmp_path / "t.jsonl", [json.dumps({"text": "t"})] * 3)
  evals = _write_lines(tmp_path / "e.jsonl",
                       [json.dumps({"text": "e"}), "bad"])
  cfg = _data_cfg(source="jsonl", paths=[train], eval_paths=[evals],
                  skip_malformed=True)
  assert len(sources.build_source(cfg, "train")) == 3
  eval_source = sources.build_source(cfg, "eval")
  assert len(eval_source) == 1 and eval_source.num_skipped == 1
  embedded_eval = sources.build_source(_data_cfg(), "eval")
  assert len(embedded_eval) == len(embedded.embedded_documents("heldout"))
  with pytest.raises(ValueError, match=r"Unknown data source 'csv'.*"
                     r"'embedded', 'jsonl', 'parquet', 'array_record', "
                     r"'tfds'"):
    sources.build_source(_data_cfg(source="csv"), "train")
  with pytest.raises(ValueError, match="data.eval_paths"):
    sources.build_source(_data_cfg(source="parquet", paths=[train]), "eval")
  with pytest.raises(ValueError, match="split"):
    sources.build_source(cfg, "validation")


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8, 64])
def test_jsonl_index_is_right_across_chunk_boundaries(tmp_path, monkeypatch,
                                                       chunk):
  monkeypatch.setattr(sources, "_INDEX_CHUNK_BYTES", chunk)
  lines = [b'{"text": "a"}', b"", b"  ", b"\r", b'{"text": "b c"}\r', b"\t",
           b' {"text": "d"}', b"\f\v", b"[1]"]
  path = tmp_path / "c.jsonl"
  path.write_bytes(b"\n".join(lines))  # no final newline
  # Reference: the non-blank lines and their 1-based numbers, by hand.
  want = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
  starts, ends, linenos = sources._line_spans(str(path))
  data = path.read_bytes()
  assert [(int(n), data[s:e]) for s, e, n in zip(starts, ends, linenos)] == (
      want)
  source = sources.JsonlSource(str(path))
  assert [source[i]["text"] for i in range(3)] == ["a", "b c", "d"]
  with pytest.raises(ValueError, match=r"c\.jsonl:9: record is a list"):
    source[3]
