"""Tests for alignax.data.ul2_pipeline: UL2 batches, resume, config errors.

Documents are made of unique integer tokens (document ``i`` is
``1000 (i + 1) + j``), so every raw token of an example tells its document
and position. ``uncorrupt`` (written here, independently of the library)
rebuilds an example's raw window from its packed segment: inputs with each
sentinel replaced by the span that follows the same sentinel in the targets.
"""

import collections
import doctest
import json

import ml_collections
import numpy as np
import pytest

from alignax import defaults
from alignax.data import packing
from alignax.data import sources
from alignax.data import tokenizer as tokenizer_lib
from alignax.data import ul2
from alignax.data import ul2_pipeline

EOS = 3
SEQ_LEN = 32
NUM_DOCS = 24


class _IntBackend:
  """Text ``"1000 1001"`` is the ids ``[1000, 1001]``; 2 = BOS, 3 = EOS."""

  size, bos_id, eos_id = 100_000, 2, EOS

  def encode(self, text):
    return [int(w) for w in text.split()]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]

  def decode(self, ids):
    return " ".join(map(str, ids))


def _doc_tokens(i):
  base = 1000 * (i + 1)
  return list(range(base, base + 5 + (37 * i) % 150))


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.Tokenizer(_IntBackend(), num_sentinels=16)


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ul2_jsonl")
  paths = {}
  for split, ids in (("train", range(NUM_DOCS)), ("eval", range(100, 106))):
    paths[split] = str(tmp / f"{split}.jsonl")
    with open(paths[split], "w") as f:
      for i in ids:
        f.write(json.dumps({"text": " ".join(map(str, _doc_tokens(i)))}) + "\n")
  c = defaults.base_config().data
  c.update(source="jsonl", paths=(paths["train"],),
           eval_paths=(paths["eval"],), task="ul2")
  c.num_threads = 2
  c.prefetch_buffer_size = 4
  return c


def _cfg(data_cfg, **ul2_fields):
  c = ml_collections.ConfigDict(data_cfg.to_dict())
  c.ul2.update(ul2_fields)
  return c


def uncorrupt(segment, tok):
  """The raw window of a (packed) UL2 segment; also returns the mode id."""
  seq = np.r_[segment["inputs"][:1], segment["targets"]]
  num_prefix = int(np.sum(segment["prefix"]))
  assert seq[-1] == tok.eos_id
  mode, inputs, targets = seq[0], seq[1:num_prefix], seq[num_prefix:-1]
  if mode == tok.mode_id(ul2.S2S):
    return mode, np.r_[inputs, targets]
  is_sentinel = lambda t: t >= tok.vocab_size - tok.num_sentinels
  spans, current = {}, None
  for t in targets:
    if is_sentinel(t):
      current = spans.setdefault(int(t), [])
    else:
      current.append(int(t))
  out = []
  for t in inputs:
    out.extend(spans.pop(int(t)) if is_sentinel(t) else [int(t)])
  # Every target span is used once; T5's mask for a 1-token window is
  # [non-noise] (drawn at length 2, cut to 1), leaving targets = [S0].
  assert all(not span for span in spans.values()) and len(spans) <= 1
  return mode, np.asarray(out)


def _segments(batch):
  """Splits packed rows into segments by ``segment_ids`` runs."""
  out = []
  for b in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][b]
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      out.append({k: v[b, idx] for k, v in batch.items()})
  return out


def _all_segments(data_cfg, tok, **kw):
  source = sources.build_source(data_cfg, "train")
  return list(ul2_pipeline.ul2_segments(source, data_cfg, tok, seed=5,
                                        seq_len=SEQ_LEN, **kw))


# ------------------------------------------------------------- the config


def test_doctests():
  assert doctest.testmod(ul2_pipeline).failed == 0


def test_parse_denoiser_round_trips_the_presets():
  for d in ul2.UL2_DENOISERS + ul2.UL2R_DENOISERS:
    assert ul2_pipeline.parse_denoiser(d.name) == d
  assert ul2_pipeline.parse_denoiser(" X( 0.5 , 64 ) ") == ul2.Denoiser.extreme(
      0.5, 64)
  for bad in ("R(0.15)", "S(0.25,3)", "Y(0.1,3)", "R(0.15,3", "R(a,3)"):
    with pytest.raises(ValueError, match="denoiser|takes"):
      ul2_pipeline.parse_denoiser(bad)


def test_config_errors_name_the_field(data_cfg, tok):
  def build(seq_len=SEQ_LEN, tokenizer=tok, **fields):
    ul2_pipeline.build_ul2_map(_cfg(data_cfg, **fields).ul2, tokenizer,
                               seed=0, seq_len=seq_len)

  with pytest.raises(ValueError, match=r"config.data.ul2.preset='t5'"):
    build(preset="t5")
  with pytest.raises(ValueError, match=r"config.data.ul2.denoisers\[1\]"):
    build(denoisers=("R(0.15,3)", "Q(1,2)"))
  with pytest.raises(ValueError, match="config.data.ul2.denoisers lists"):
    build(denoisers=("R(0.15,3)", "R(0.15,3)"))
  with pytest.raises(ValueError, match=r"config.data.ul2.rates=.*shape"):
    build(rates=(1.0, 2.0))
  with pytest.raises(ValueError, match=r"config.data.ul2.rates=.*positive"):
    build(denoisers=("R(0.15,3)", "S(0.25)"), rates=(0.0, 0.0))
  with pytest.raises(ValueError, match=r"config.data.ul2.s_split='random'"):
    build(s_split="random")
  with pytest.raises(ValueError, match=r"config.train.seq_len=2"):
    build(seq_len=2)
  # X(0.5,3) in a row of 96 tokens: 71 raw tokens have round(35.5) = 36
  # noise tokens in 12 spans (1 + 71 + 2 * 12 + 1 = 97 = 96 + 1), so it needs
  # 12 sentinels; a tokenizer with 4 is too small.
  small = tokenizer_lib.Tokenizer(_IntBackend(), num_sentinels=4)
  with pytest.raises(ValueError, match=r"config.tokenizer.num_sentinels=4"):
    build(seq_len=96, tokenizer=small)


def test_window_lengths_fill_a_row():
  # A row of 32 holds [mode] + inputs + targets + [EOS] of <= 33 tokens.
  # R(0.15,3), raw L: 1 + L + 2 S + 1 tokens (a sentinel per span on each
  # side). L = 29: round(4.35) = 4 noise tokens, round(4 / 3) = 1 span, 33
  # tokens: fits. L = 30: round(4.5) = 4 (half to even), 1 span, 34: does
  # not. S: 1 + L + 1 <= 33 -> L = 31.
  lengths = ul2_pipeline.window_lengths(
      (ul2.Denoiser.regular(0.15, 3), ul2.Denoiser.sequential(0.25)), 32)
  assert lengths == (29, 31)


# ------------------------------------------------------------ the examples


def test_every_token_lands_in_exactly_one_example(data_cfg, tok):
  segments = _all_segments(data_cfg, tok, shuffle=False, num_epochs=1)
  lengths = ul2_pipeline.window_lengths(ul2.UL2_DENOISERS, SEQ_LEN)
  mode_of = {k: tok.mode_id(d.mode) for k, d in enumerate(ul2.UL2_DENOISERS)}
  windows = collections.defaultdict(list)
  for seg in segments:
    assert len(seg["inputs"]) <= SEQ_LEN
    k = int(seg["denoiser"][0])
    assert np.all(seg["denoiser"] == k)
    mode, raw = uncorrupt(seg, tok)
    assert mode == mode_of[k]  # the mode token matches the denoiser
    assert len(raw) <= lengths[k]
    windows[int(raw[0]) // 1000 - 1].append((raw, lengths[k]))
  assert sorted(windows) == list(range(NUM_DOCS))
  for doc, parts in windows.items():
    np.testing.assert_array_equal(np.concatenate([r for r, _ in parts]),
                                  _doc_tokens(doc))
    # Every window but the last takes its denoiser's full raw budget.
    assert all(len(r) == n for r, n in parts[:-1])
  counts = np.bincount([int(s["denoiser"][0]) for s in segments], minlength=7)
  assert np.all(counts > 0)


def test_resharding_keeps_each_visit_corrupted_alike(data_cfg, tok):
  def keyed(segments):
    return sorted(tuple(s["inputs"].tolist()) + tuple(s["targets"].tolist())
                  for s in segments)

  one = _all_segments(data_cfg, tok, num_epochs=1)
  two = [s for p in range(2)
         for s in _all_segments(data_cfg, tok, num_epochs=1, process_index=p,
                                process_count=2)]
  assert keyed(one) == keyed(two)
  # The first epoch of a longer run is corrupted alike; the second epoch
  # corrupts the same documents differently.
  both = collections.Counter(keyed(
      _all_segments(data_cfg, tok, shuffle=False, num_epochs=2)))
  first = collections.Counter(keyed(one))
  assert not first - both
  assert both - first != first


def test_rates_and_s_split_are_wired(data_cfg, tok):
  only_s = _all_segments(_cfg(data_cfg, denoisers=("R(0.15,3)", "S(0.25)"),
                              rates=(0.0, 1.0)), tok, num_epochs=1)
  assert {int(s["denoiser"][0]) for s in only_s} == {1}
  for seg in only_s:
    _, raw = uncorrupt(seg, tok)
    num_targets = int(np.sum(seg["weights"])) - 1  # minus the EOS
    # Fixed split: the last round(0.25 L) tokens are targets (clipped to 1).
    assert num_targets == max(1, int(np.round(0.25 * len(raw))))
  uniform = _all_segments(_cfg(data_cfg, denoisers=("S(0.25)",),
                               s_split="uniform"), tok, num_epochs=1)
  fractions = [(np.sum(s["weights"]) - 1) / len(uncorrupt(s, tok)[1])
               for s in uniform]
  assert np.std(fractions) > 0.1  # split points spread out, not fixed


# --------------------------------------------------------------- batches


def test_batches_pack_examples_and_padding_does_not_count(data_cfg, tok):
  ds = ul2_pipeline.build_ul2_dataset(data_cfg, tok, split="train", seed=1,
                                      seq_len=SEQ_LEN, batch_size=4)
  it = iter(ds)
  for _ in range(3):
    batch = next(it)
    assert set(batch) == set(packing.BATCH_DTYPES) | {"denoiser"}
    assert batch["denoiser"].shape == (4, SEQ_LEN)
    assert batch["denoiser"].dtype == np.int32
    pad = batch["segment_ids"] == 0
    assert np.all(batch["weights"][pad] == 0)
    assert np.all(batch["denoiser"][pad] == 0)
    for seg in _segments(batch):
      np.testing.assert_array_equal(seg["positions"],
                                    np.arange(len(seg["inputs"])))
      assert np.all(seg["denoiser"] == seg["denoiser"][0])
      uncorrupt(seg, tok)  # each packed segment is a whole example
      # The prefix is a leading run; weights start at its last position.
      num_prefix = int(seg["prefix"].sum())
      assert seg["prefix"][:num_prefix].all()
      np.testing.assert_array_equal(
          seg["weights"], np.arange(len(seg["weights"])) >= num_prefix - 1)


def test_same_batches_after_a_resume(data_cfg, tok):
  def dataset():
    return ul2_pipeline.build_ul2_dataset(data_cfg, tok, split="train",
                                          seed=2, seq_len=SEQ_LEN,
                                          batch_size=4)

  it = iter(dataset())
  for _ in range(20):  # into the second epoch (2082 raw tokens per epoch)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]
  resumed = iter(dataset())
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_eval_batches_are_deterministic_and_padded(data_cfg, tok):
  def build(num_batches):
    return ul2_pipeline.build_ul2_eval_batches(
        data_cfg, tok, seq_len=SEQ_LEN, batch_size=4, num_batches=num_batches)

  everything = build(None)
  weights = sum(b["weights"].sum() for b in everything)
  assert weights > 0
  padded = build(len(everything) + 2)
  assert len(padded) == len(everything) + 2
  for want, got in zip(everything, padded):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  for batch in padded[len(everything):]:
    assert not batch["weights"].any() and not batch["segment_ids"].any()
    assert set(batch) == set(everything[0])
