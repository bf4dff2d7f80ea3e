"""Tests for chunking, packing, the grain LM pipeline and its checkpoints."""

import json

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from alignax.data import embedded
from alignax.data import packing
from alignax.data import pipeline
from alignax.data import tokenizer as tokenizer_lib

EOS = 3


class _ByteBackend:
  """Test vocabulary: UTF-8 byte b -> id b + 4; 0 pad, 1 unk, 2 bos, 3 eos."""

  size, bos_id, eos_id = 260, 2, EOS

  def encode(self, text):
    return [b + 4 for b in text.encode("utf-8")]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]

  def decode(self, ids):
    return bytes(i - 4 for i in ids if i >= 4).decode("utf-8")


class _IntBackend(_ByteBackend):
  """Test vocabulary where text ``"1000 1001"`` is the ids ``[1000, 1001]``."""

  size = 100_000

  def encode(self, text):
    return [int(w) for w in text.split()]

  def decode(self, ids):
    return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.Tokenizer(_IntBackend(), num_sentinels=8)


def _doc_tokens(i):
  """Document i: unique ids 1000 (i + 1) + j, variable length, then EOS."""
  base = 1000 * (i + 1)
  return list(range(base, base + 3 + (7 * i) % 40)) + [EOS]


def _doc_of(token):
  return int(token) // 1000 - 1


@pytest.fixture(scope="module")
def jsonl_cfg(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("jsonl")
  paths = []
  for name, ids in (("train", range(40)), ("eval", range(100, 111))):
    path = tmp / f"{name}.jsonl"
    path.write_text("\n".join(
        json.dumps({"text": " ".join(map(str, _doc_tokens(i)[:-1]))})
        for i in ids) + "\n")
    paths.append(str(path))
  return ml_collections.ConfigDict(dict(
      source="jsonl", paths=[paths[0]], eval_paths=[paths[1]],
      text_field="text", tfds_name="", tfds_data_dir="",
      skip_malformed=False, num_threads=2, prefetch_buffer_size=8))


def _segments(batch):
  """NumPy reference: splits rows into segments by segment_ids runs."""
  out = []
  for b in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][b]
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # contiguous
      out.append({k: v[b, idx] for k, v in batch.items()})
  return out


def _check_row_layout(batch):
  """segment_ids count 1, 2, ... from the left; positions restart at 0."""
  for b in range(batch["inputs"].shape[0]):
    seg, pos = batch["segment_ids"][b], batch["positions"][b]
    n = int(np.sum(seg > 0))
    assert np.all(seg[n:] == 0)  # Padding only at the end of a row.
    assert np.all(np.diff(seg[:n]) >= 0) and np.all(np.diff(seg[:n]) <= 1)
    if n:
      assert seg[0] == 1
    starts = np.r_[True, np.diff(seg[:n]) != 0]
    expected = np.arange(n) - np.maximum.accumulate(
        np.where(starts, np.arange(n), 0))
    np.testing.assert_array_equal(pos[:n], expected)
    for key in ("inputs", "targets", "weights", "positions"):
      assert np.all(batch[key][b, n:] == 0), key
    assert not batch["prefix"][b, n:].any()


# ---------------------------------------------------------------- chunking


def test_chunk_tokens_hand_computed():
  chunk = packing.ChunkTokens(4, overlap=1)
  tokens = np.arange(10)
  got = [c["tokens"].tolist() for c in chunk.flat_map({"tokens": tokens})]
  assert got == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
  got = [c["tokens"].tolist() for c in chunk.flat_map({"tokens": np.arange(5)})]
  assert got == [[0, 1, 2, 3], [3, 4]]
  assert chunk.flat_map({"tokens": np.arange(1)}) == []
  no_overlap = packing.ChunkTokens(4, overlap=0)
  got = [c["tokens"].tolist()
         for c in no_overlap.flat_map({"tokens": np.arange(9)})]
  assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
  with pytest.raises(ValueError, match="overlap"):
    packing.ChunkTokens(4, overlap=4)


def test_lm_segment_hand_computed():
  seg = packing.lm_segment([5, 6, 7, EOS])
  assert seg["inputs"].tolist() == [5, 6, 7]
  assert seg["targets"].tolist() == [6, 7, EOS]
  assert seg["weights"].tolist() == [1.0, 1.0, 1.0]
  assert seg["prefix"].tolist() == [False] * 3
  assert seg["inputs"].dtype == np.int32 and seg["weights"].dtype == np.float32
  with pytest.raises(ValueError, match="shape"):
    packing.lm_segment([5])


# ----------------------------------------------------------------- packing


def _packed(segments, seq_len, batch_size, **kw):
  ds = grain.MapDataset.source(segments).to_iter_dataset()
  return list(packing.pack_and_batch(ds, seq_len=seq_len,
                                     batch_size=batch_size, **kw))


def test_packing_first_fit_layout_hand_computed():
  docs = [[10, 11, 12, EOS], [20, 21, EOS], [30, 31, 32, 33, 34, EOS],
          [40, EOS]]
  segments = [packing.lm_segment(d) for d in docs]  # Lengths 3, 2, 5, 1.
  batches = _packed(segments, seq_len=6, batch_size=2, shuffle_bins=False,
                    num_packing_bins=2, drop_remainder=False)
  assert len(batches) == 1
  batch = batches[0]
  # First fit into 2 bins of 6: row 0 gets docs 0, 1, 3 (3 + 2 + 1 = 6),
  # row 1 gets doc 2 (5) and one padding cell.
  np.testing.assert_array_equal(batch["inputs"], [
      [10, 11, 12, 20, 21, 40], [30, 31, 32, 33, 34, 0]])
  np.testing.assert_array_equal(batch["targets"], [
      [11, 12, EOS, 21, EOS, EOS], [31, 32, 33, 34, EOS, 0]])
  np.testing.assert_array_equal(batch["segment_ids"], [
      [1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(batch["positions"], [
      [0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 0]])
  np.testing.assert_array_equal(batch["weights"], [
      [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
  assert not batch["prefix"].any()
  for key, dtype in packing.BATCH_DTYPES.items():
    assert batch[key].dtype == dtype, key


def test_packing_carries_prefix_and_weights_of_custom_segments():
  # A UL2-style segment: 3 prefix tokens (bidirectional, no loss) + 2 targets.
  ul2 = {"inputs": np.array([7, 8, 9, 50, 51], np.int32),
         "targets": np.array([8, 9, 50, 51, EOS], np.int32),
         "weights": np.array([0, 0, 1, 1, 1], np.float32),
         "prefix": np.array([1, 1, 1, 0, 0], bool)}
  lm = packing.lm_segment([60, 61, EOS])
  batch = _packed([lm, ul2], seq_len=8, batch_size=1, shuffle_bins=False,
                  num_packing_bins=1)[0]
  np.testing.assert_array_equal(batch["prefix"][0], [0, 0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch["weights"][0], [1, 1, 0, 0, 1, 1, 1, 0])
  np.testing.assert_array_equal(batch["segment_ids"][0],
                                [1, 1, 2, 2, 2, 2, 2, 0])


def test_packing_rejects_bad_segments():
  too_long = packing.lm_segment(np.arange(10))
  with pytest.raises(ValueError, match="segment length 9"):
    _packed([too_long], seq_len=8, batch_size=1)
  ragged = dict(packing.lm_segment([1, 2, 3]), weights=np.ones(5, np.float32))
  with pytest.raises(ValueError, match="one length"):
    _packed([ragged], seq_len=8, batch_size=1)
  with pytest.raises(ValueError, match="lacks fields"):
    _packed([{"inputs": np.ones(3, np.int32)}], seq_len=8, batch_size=1)


def test_pad_batch_and_empty_rows():
  batch = packing.pad_batch(packing.empty_rows(1, 4) | {
      "weights": np.ones((1, 4), np.float32)}, 3)
  assert batch["weights"].tolist() == [[1] * 4, [0] * 4, [0] * 4]
  with pytest.raises(ValueError, match="more than"):
    packing.pad_batch(packing.empty_rows(4, 2), 3)


# ---------------------------------------------------------------- pipeline


def _epoch_batches(cfg, tok, **kw):
  ds = pipeline.build_lm_dataset(cfg, tok, split="train", num_epochs=1, **kw)
  return list(ds)


def _pairs_by_doc(batches):
  """NumPy reference: each segment's (input, target) pairs, keyed by doc.

  Also checks each segment is one contiguous piece of one document, so no
  target ever comes from the next segment.
  """
  pairs = {}
  for batch in batches:
    _check_row_layout(batch)
    for seg in _segments(batch):
      tokens = np.r_[seg["inputs"], seg["targets"][-1]]
      # Pre-shifted: inputs[t + 1] == targets[t] inside a segment.
      np.testing.assert_array_equal(seg["inputs"][1:], seg["targets"][:-1])
      doc = _doc_of(tokens[0])
      expected = _doc_tokens(doc)
      start = expected.index(tokens[0])
      np.testing.assert_array_equal(tokens,
                                    expected[start:start + len(tokens)])
      np.testing.assert_array_equal(seg["weights"], 1)
      assert not seg["prefix"].any()
      pairs.setdefault(doc, []).extend(zip(seg["inputs"].tolist(),
                                           seg["targets"].tolist()))
  return pairs


def test_pipeline_segments_reconstruct_documents(jsonl_cfg, tok):
  seq_len = 16  # Shorter than most documents: exercises chunking.
  batches = _epoch_batches(jsonl_cfg, tok, seed=0, seq_len=seq_len,
                           batch_size=1)
  assert all(b["inputs"].shape == (1, seq_len) for b in batches)
  pairs = _pairs_by_doc(batches)
  # Every next-token pair of every document appears exactly once: joining a
  # document's chunks gives the document (EOS included) back.
  assert sorted(pairs) == list(range(40))
  for doc, got in pairs.items():
    tokens = _doc_tokens(doc)
    assert sorted(got) == sorted(zip(tokens[:-1], tokens[1:]))
  # Rows are full except where a group of bins ran out of fitting segments.
  fill = np.mean([b["weights"].mean() for b in batches])
  assert fill > 0.7, fill


def test_pipeline_is_deterministic_and_seeded(jsonl_cfg, tok):
  def first(seed, n=4):
    ds = pipeline.build_lm_dataset(jsonl_cfg, tok, split="train", seed=seed,
                                   seq_len=32, batch_size=2)
    it = iter(ds)
    return [next(it) for _ in range(n)]

  a, b, c = first(7), first(7), first(8)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(not np.array_equal(x["inputs"], y["inputs"])
             for x, y in zip(a, c))


def _doc_ids(batches):
  return set(_pairs_by_doc(batches))


def test_processes_read_disjoint_shards(jsonl_cfg, tok):
  shards = [_doc_ids(_epoch_batches(jsonl_cfg, tok, seed=1, seq_len=64,
                                    batch_size=1, process_index=p,
                                    process_count=3))
            for p in range(3)]
  assert not (shards[0] & shards[1] or shards[0] & shards[2]
              or shards[1] & shards[2])
  assert set().union(*shards) == set(range(40))
  assert shards[1] == {i for i in range(40) if i % 3 == 1}
  with pytest.raises(ValueError, match="process_index"):
    _epoch_batches(jsonl_cfg, tok, seed=1, seq_len=64, batch_size=1,
                   process_index=3, process_count=3)


def test_each_epoch_is_reshuffled(jsonl_cfg, tok):
  ds = pipeline.build_lm_dataset(jsonl_cfg, tok, split="train", seed=2,
                                 seq_len=64, batch_size=1, num_epochs=2)
  # Document order = order of first tokens; seq_len 64 holds every document
  # whole, and bins are emitted in groups of 1 (batch_size), so row order is
  # record order.
  docs = [_doc_of(s["inputs"][0]) for b in ds for s in _segments(b)]
  assert sorted(docs[:40]) == sorted(docs[40:]) == list(range(40))
  assert docs[:40] != docs[40:] and docs[:40] != sorted(docs[:40])


def _assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_iterator_state_round_trips(jsonl_cfg, tok, prefetch):
  ds = pipeline.build_lm_dataset(jsonl_cfg, tok, split="train", seed=3,
                                 seq_len=32, batch_size=2)
  it = pipeline.make_iterator(ds, prefetch_buffer_size=prefetch)
  for _ in range(5):
    next(it)
  state = it.get_state()
  json.dumps(state)  # JSON-able, as grain's orbax handler requires.
  expected = [next(it) for _ in range(4)]
  resumed = pipeline.make_iterator(ds, prefetch_buffer_size=prefetch)
  resumed.set_state(state)
  _assert_same([next(resumed) for _ in range(4)], expected)


def test_iterator_checkpoint_with_orbax(jsonl_cfg, tok, tmp_path):
  ds = pipeline.build_lm_dataset(jsonl_cfg, tok, split="train", seed=4,
                                 seq_len=32, batch_size=2)
  it = pipeline.make_iterator(ds)
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it),
        data_json=ocp.args.JsonSave(it.get_state())))
    mngr.wait_until_finished()
  expected = [next(it) for _ in range(3)]

  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    fresh = pipeline.make_iterator(ds)
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same([next(restored.data) for _ in range(3)], expected)
    state = mngr.restore(3, args=ocp.args.Composite(
        data_json=ocp.args.JsonRestore())).data_json
  via_json = pipeline.make_iterator(ds)
  via_json.set_state(state)
  _assert_same([next(via_json) for _ in range(3)], expected)


# --------------------------------------------------------------- evaluation


def test_eval_batches_cover_heldout_once_and_pad(jsonl_cfg, tok):
  batches = pipeline.build_eval_batches(jsonl_cfg, tok, seq_len=32,
                                        batch_size=3)
  _assert_same(batches, pipeline.build_eval_batches(
      jsonl_cfg, tok, seq_len=32, batch_size=3))
  total_pairs = sum(len(_doc_tokens(i)) - 1 for i in range(100, 111))
  assert sum(float(b["weights"].sum()) for b in batches) == total_pairs
  assert _doc_ids(batches) == set(range(100, 111))
  assert all(b["inputs"].shape == (3, 32) for b in batches)
  # Docs 100..110 have 3 + (7 i mod 40) pairs: segments of 23, 30, 32 + 5,
  # 4, 11, 18, 25, 32, 32 + 7, 6, 13 = 238 tokens; first fit in groups of
  # 3 bins of 32 needs 8 rows, so the 3rd batch ends in one padding row.
  assert len(batches) == 3
  assert batches[-1]["segment_ids"].any(axis=1).tolist() == [True, True,
                                                             False]
  assert not batches[-1]["weights"][2].any()
  padded = pipeline.build_eval_batches(jsonl_cfg, tok, seq_len=32,
                                       batch_size=3, num_batches=5)
  _assert_same(padded[:3], batches)
  assert not any(b["weights"].any() for b in padded[3:])
  assert len(pipeline.build_eval_batches(jsonl_cfg, tok, seq_len=32,
                                         batch_size=3, num_batches=1)) == 1


def test_eval_batches_on_embedded_heldout():
  tok = tokenizer_lib.Tokenizer(_ByteBackend(), num_sentinels=8)
  cfg = ml_collections.ConfigDict(dict(
      source="embedded", paths=[], eval_paths=[], text_field="text",
      tfds_name="", tfds_data_dir="", skip_malformed=False))
  docs = embedded.embedded_documents("heldout")[:3]
  # 200 processes: process p reads held-out document p only.
  shares = [pipeline.build_eval_batches(cfg, tok, seq_len=512, batch_size=8,
                                        process_index=p, process_count=200)
            for p in range(3)]
  for doc, batches in zip(docs, shares):
    assert sum(float(b["weights"].sum()) for b in batches) == (
        len(doc["text"].encode("utf-8")))  # n + 1 tokens with EOS, n pairs.
  empty = pipeline.build_eval_batches(cfg, tok, seq_len=64, batch_size=2,
                                      process_index=199, process_count=200,
                                      num_batches=2)
  assert len(empty) == 2 and not any(b["weights"].any() for b in empty)


def test_pad_eval_batches_cuts_pads_and_reads_lazily():
  made = []

  def empty():
    made.append(1)
    return {"x": np.zeros(2)}

  def batches():
    yield {"x": np.ones(2)}
    yield {"x": np.full(2, 2.0)}
    raise AssertionError("read past num_batches")

  out = pipeline.pad_eval_batches(batches(), 1, empty)
  assert len(out) == 1 and out[0]["x"][0] == 1 and not made
  out = pipeline.pad_eval_batches(iter([{"x": np.ones(2)}]), 3, empty)
  assert [b["x"][0] for b in out] == [1, 0, 0] and len(made) == 2
  assert len(pipeline.pad_eval_batches([{"x": 1}] * 4, None, empty)) == 4
  assert pipeline.pad_eval_batches((), 2, empty)[1]["x"].sum() == 0
