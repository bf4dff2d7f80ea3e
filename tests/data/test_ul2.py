"""Tests for alignax.data.span_corruption and alignax.data.ul2.

References used here, written independently of the library code:
``t5_mask_reference`` transcribes T5's TF ``random_spans_noise_mask``
statement by statement; ``uncorrupt`` rebuilds the original tokens from
inputs and targets. Hard-coded numbers are derived by hand in comments.
"""
import doctest
import pickle

import grain
import numpy as np
import pytest

from alignax.data import span_corruption as sc
from alignax.data import ul2

VOCAB = 5000
NUM_SENTINELS = 300
SENTINELS = sc.t5_sentinel_ids(VOCAB, NUM_SENTINELS)  # 4999, 4998, ..., 4700
MODES = {ul2.NLU: 3, ul2.NLG: 4, ul2.S2S: 5}
EOS = 1
SPAN_SETTINGS = sorted({(d.noise_density, d.mean_noise_span_length)
                        for d in ul2.UL2_DENOISERS + ul2.UL2R_DENOISERS
                        if d.kind != "S"})


def t5_mask_reference(length, noise_density, mean_noise_span_length, rng):
  """T5's ``random_spans_noise_mask``, TF op by TF op, in NumPy.

  ``seqio.stateless_shuffle`` -> ``rng.permutation`` (noise first, then
  non-noise, as ``seeds[0]``/``seeds[1]``); ``tf.math.segment_sum`` and
  ``unsorted_segment_sum`` of ones -> ``np.bincount``; ``tf.round`` on
  float32 -> ``np.round`` on float32 (both half-to-even).
  """
  orig_length = length
  length = max(length, 2)
  num_noise_tokens = int(np.round(np.float32(length)
                                  * np.float32(noise_density)))
  num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
  num_noise_spans = int(np.round(np.float32(num_noise_tokens)
                                 / np.float32(mean_noise_span_length)))
  num_noise_spans = max(num_noise_spans, 1)
  num_nonnoise_tokens = length - num_noise_tokens

  def random_segmentation(num_items, num_segments):
    first_in_segment = np.pad(
        rng.permutation(
            (np.arange(num_items - 1) < num_segments - 1).astype(np.int32)),
        [[1, 0]])
    segment_id = np.cumsum(first_in_segment)
    return np.bincount(segment_id)

  noise_span_lengths = random_segmentation(num_noise_tokens, num_noise_spans)
  nonnoise_span_lengths = random_segmentation(num_nonnoise_tokens,
                                              num_noise_spans)
  interleaved_span_lengths = np.reshape(
      np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1),
      [num_noise_spans * 2])
  span_starts = np.cumsum(interleaved_span_lengths)[:-1]
  span_start_indicator = np.bincount(span_starts, minlength=length)
  span_num = np.cumsum(span_start_indicator)
  is_noise = np.equal(span_num % 2, 1)
  return is_noise[:orig_length]


def uncorrupt(inputs, targets, sentinel_ids=SENTINELS):
  """Puts each target span back in place of its sentinel in the inputs."""
  targets = list(targets)
  is_sentinel = np.isin(targets, sentinel_ids)
  starts = list(np.flatnonzero(is_sentinel)) + [len(targets)]
  spans = {targets[s]: targets[s + 1:e] for s, e in zip(starts, starts[1:])}
  out = []
  for token in inputs:
    out.extend(spans[token] if token in spans else [token])
  return np.array(out, dtype=np.int64)


def sentinels_in(x):
  return np.asarray(x)[np.isin(x, SENTINELS)]


def random_doc(rng, length):
  return rng.integers(10, VOCAB - NUM_SENTINELS, length).astype(np.int32)


# ----------------------------------------------------------------- lengths ---


@pytest.mark.parametrize("args, expected", [
    # T5's span_corruption default: 568 raw tokens -> 85 noise in 28 spans,
    # inputs 483 + 28 + EOS = 512, targets 85 + 28 + EOS = 114; 569 would
    # give inputs 513.
    ((512, 0.15, 3), (568, 114)),
    # X(0.5, 64): 1007 -> noise round(503.5) = 504 (half-to-even), 8 spans,
    # inputs 503 + 8 + 1 = 512, targets 513 > 512, so T5's 0.5 hack drops
    # one raw token: (1006, 512), the numbers quoted for UL2.
    ((512, 0.5, 64), (1006, 512)),
])
def test_random_spans_helper_t5_numbers(args, expected):
  assert sc.random_spans_helper(*args) == expected
  assert sc.random_spans_helper(*args, extra_tokens_per_span_inputs=1,
                                extra_tokens_per_span_targets=1) == expected


def test_noise_span_counts_round_in_float32_like_tf():
  # float32(0.15) * 190 = 28.5000011 -> 29; in float64 it is 28.4999... -> 28.
  assert sc.noise_span_counts(190, 0.15, 3) == (29, 10)
  assert round(190 * 0.15) == 28
  lengths = np.arange(1, 700)
  noise, spans = sc.noise_span_counts(lengths, 0.5, 8)
  assert [sc.noise_span_counts(int(n), 0.5, 8) for n in lengths[:50]] == list(
      zip(noise[:50].tolist(), spans[:50].tolist()))
  assert noise[0] == 1 and spans[0] == 1  # L = 1 counts as L = 2


def test_raw_length_for_hand_values():
  r3 = ul2.Denoiser.regular(0.15, 3)
  # 464: noise round(69.6) = 70, spans round(23.3) = 23 -> 464 + 46 + 2 = 512;
  # 465: 70 noise, 23 spans -> 513.
  assert ul2.raw_length_for(r3, 512) == 464
  assert ul2.raw_length_for(ul2.Denoiser.sequential(), 512) == 510
  # X(0.5, 3) at 512: raw 382, 191 noise in round(63.67) = 64 spans,
  # 382 + 128 + 2 = 512: the most sentinels of the UL2 mixture.
  assert ul2.raw_length_for(ul2.Denoiser.extreme(0.5, 3), 512) == 382
  assert ul2.num_sentinels_needed(ul2.UL2_DENOISERS, 512) == 64


@pytest.mark.parametrize("seq_len", [128, 512])
@pytest.mark.parametrize("denoiser", sorted(
    set(ul2.UL2_DENOISERS + ul2.UL2R_DENOISERS), key=lambda d: d.name))
def test_raw_length_for_is_the_tight_budget(denoiser, seq_len):
  raw = ul2.raw_length_for(denoiser, seq_len)
  assert ul2.decoder_only_length(denoiser, raw) <= seq_len
  assert ul2.decoder_only_length(denoiser, raw + 1) > seq_len
  doc = np.arange(10, 10 + 4 * seq_len, dtype=np.int32)
  for index in range(5):
    ex = ul2.ul2_example(doc, denoisers=[denoiser], seed=1, index=index,
                         sentinel_ids=SENTINELS, mode_ids=MODES, eos_id=EOS,
                         seq_len=seq_len)
    n = ex["inputs"].size
    if ex["inputs"][-1] != 10 + 4 * seq_len - 1:  # not the short last chunk
      assert n + 1 == ul2.decoder_only_length(denoiser, raw)
    assert n + 1 <= seq_len


# -------------------------------------------------------------------- mask ---


@pytest.mark.parametrize("noise_density, mean_noise_span_length",
                         SPAN_SETTINGS)
def test_mask_matches_t5_transcription(noise_density, mean_noise_span_length):
  for length in (1, 2, 3, 5, 17, 100, 511, 1000):
    for seed in range(4):
      got = sc.random_spans_noise_mask(
          length, np.random.default_rng(seed), noise_density=noise_density,
          mean_noise_span_length=mean_noise_span_length)
      want = t5_mask_reference(length, noise_density, mean_noise_span_length,
                               np.random.default_rng(seed))
      np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("r, mu", [(0.15, 3), (0.5, 3), (0.5, 8)])
def test_mask_statistics_over_many_samples(r, mu):
  rng = np.random.default_rng(0)
  masks = np.stack([
      sc.random_spans_noise_mask(512, rng, noise_density=r,
                                 mean_noise_span_length=mu)
      for _ in range(2000)])  # [2000, 512]
  assert abs(masks.mean() - r) < 1 / 512
  span_starts = masks[:, 1:] & ~masks[:, :-1]
  assert abs(masks.sum() / span_starts.sum() - mu) < 0.05 * mu
  assert not masks[:, 0].any()  # first token never noise
  assert masks[:, -1].all()  # the mask ends inside a noise span
  # Away from the two ends every position is noise about r of the time.
  per_position = masks[:, 32:-32].mean(axis=0)
  assert np.abs(per_position - r).max() < 0.05


def test_random_segmentation_is_a_uniform_composition():
  rng = np.random.default_rng(0)
  draws = [tuple(sc.random_segmentation(6, 3, rng)) for _ in range(3000)]
  assert all(sum(d) == 6 and min(d) >= 1 for d in draws)
  compositions, counts = np.unique(draws, axis=0, return_counts=True)
  assert len(compositions) == 10  # C(5, 2) compositions of 6 into 3 parts
  chi2 = ((counts - 300.0) ** 2 / 300.0).sum()
  assert chi2 < 27.9  # chi-square, 9 dof, p = 0.001


# ---------------------------------------------------------- span corruption ---


@pytest.mark.parametrize("noise_density, mean_noise_span_length",
                         SPAN_SETTINGS)
def test_span_corruption_roundtrip_and_sentinels(noise_density,
                                                 mean_noise_span_length):
  rng = np.random.default_rng(1)
  for length in [1, 2, 3] + list(rng.integers(4, 600, 40)):
    tokens = random_doc(rng, length)
    inputs, targets = sc.span_corruption(
        tokens, rng, noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length, sentinel_ids=SENTINELS)
    np.testing.assert_array_equal(uncorrupt(inputs, targets), tokens)
    if length == 1:  # T5's degenerate case: nothing masked.
      np.testing.assert_array_equal(inputs, tokens)
      assert targets.tolist() == [SENTINELS[0]]
      continue
    num_noise, num_spans = sc.noise_span_counts(length, noise_density,
                                                mean_noise_span_length)
    assert (inputs.size, targets.size) == (length - num_noise + num_spans,
                                           num_noise + num_spans)
    np.testing.assert_array_equal(sentinels_in(inputs), SENTINELS[:num_spans])
    np.testing.assert_array_equal(sentinels_in(targets),
                                  SENTINELS[:num_spans])
    assert targets[0] == SENTINELS[0]  # each sentinel precedes its span
    assert not np.isin(targets[-1], SENTINELS)  # and no span is empty
    assert not (np.isin(targets[1:], SENTINELS)
                & np.isin(targets[:-1], SENTINELS)).any()


def test_span_corruption_errors():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="sentinel"):
    sc.span_corruption(np.arange(100), rng, noise_density=0.5,
                       mean_noise_span_length=3, sentinel_ids=SENTINELS[:5])
  with pytest.raises(ValueError, match=r"shape \(0,\)"):
    sc.span_corruption(np.arange(0), rng, noise_density=0.5,
                       mean_noise_span_length=3, sentinel_ids=SENTINELS)


# --------------------------------------------------------------- S splits ---


@pytest.mark.parametrize("length, num_targets",
                         [(512, 128), (100, 25), (2, 1), (1, 1)])
def test_s_split_fixed(length, num_targets):
  tokens = np.arange(length)
  inputs, targets = ul2.s_split_fixed(tokens, None, noise_density=0.25)
  assert targets.size == num_targets
  np.testing.assert_array_equal(np.concatenate([inputs, targets]), tokens)


def test_s_split_uniform_covers_the_range():
  rng = np.random.default_rng(0)
  tokens = np.arange(10)
  num_inputs = []
  for _ in range(2700):
    inputs, targets = ul2.s_split_uniform(tokens, rng, noise_density=0.25)
    np.testing.assert_array_equal(np.concatenate([inputs, targets]), tokens)
    num_inputs.append(inputs.size)
  values, counts = np.unique(num_inputs, return_counts=True)
  assert values.tolist() == list(range(1, 10))  # T5: [1, L - 1]
  assert ((counts - 300.0) ** 2 / 300.0).sum() < 26.1  # 8 dof, p = 0.001


# ------------------------------------------------------ decoder-only format ---


def test_to_decoder_only_example_by_hand():
  # seq = [7, 1, 2, 3, 4, EOS]: prefix = mode + 2 inputs; the last prefix
  # position (t = 2) predicts the first target and carries weight.
  ex = ul2.to_decoder_only_example(7, np.array([1, 2]), np.array([3, 4, EOS]))
  assert ex["inputs"].tolist() == [7, 1, 2, 3, 4]
  assert ex["targets"].tolist() == [1, 2, 3, 4, EOS]
  assert ex["prefix"].tolist() == [True, True, True, False, False]
  assert ex["weights"].tolist() == [0, 0, 1, 1, 1]
  assert ex["inputs"].dtype == np.int32 and ex["weights"].dtype == np.float32


def test_to_decoder_only_example_weighted_targets_are_the_targets():
  rng = np.random.default_rng(0)
  for _ in range(20):
    inputs = rng.integers(0, 100, rng.integers(0, 30))
    targets = rng.integers(0, 100, rng.integers(1, 30))
    ex = ul2.to_decoder_only_example(9, inputs, targets)
    n = inputs.size + targets.size
    assert all(v.shape == (n,) for v in ex.values())
    np.testing.assert_array_equal(ex["targets"][ex["weights"] == 1], targets)
    assert ex["prefix"].sum() == 1 + inputs.size
    np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])


def test_no_inputs_is_plain_causal_lm():
  ex = ul2.to_decoder_only_example(9, np.array([], np.int32), np.arange(5))
  assert ex["weights"].tolist() == [1] * 5
  assert ex["prefix"].tolist() == [True] + [False] * 4


# ------------------------------------------------------------- ul2_example ---


@pytest.mark.parametrize("seq_len", [128, 512])
@pytest.mark.parametrize("preset", [ul2.UL2_DENOISERS, ul2.UL2R_DENOISERS])
def test_ul2_example_fits_and_rebuilds_an_aligned_window(preset, seq_len):
  doc = np.arange(10, 10 + 1500, dtype=np.int32)  # distinct, below sentinels
  for index in range(40):
    ex = ul2.ul2_example(doc, denoisers=preset, seed=3, index=index,
                         sentinel_ids=SENTINELS, mode_ids=MODES, eos_id=EOS,
                         seq_len=seq_len)
    k = int(ex["denoiser"][0])
    denoiser = preset[k]
    n = ex["inputs"].size
    assert n + 1 <= seq_len
    assert (ex["denoiser"] == k).all()
    assert ex["inputs"][0] == MODES[denoiser.mode]
    assert ex["targets"][-1] == EOS
    num_prefix = int(ex["prefix"].sum())
    assert ex["prefix"][:num_prefix].all()
    assert (ex["weights"] == (np.arange(n) >= num_prefix - 1)).all()
    seq = np.append(ex["inputs"], ex["targets"][-1])
    if denoiser.kind == "S":  # a split: the window is prefix + targets
      chunk = seq[1:-1]
    else:
      chunk = uncorrupt(seq[1:num_prefix], seq[num_prefix:-1])
    raw = ul2.raw_length_for(denoiser, seq_len)
    start = int(chunk[0]) - 10
    assert start % raw == 0  # T5's select_random_chunk: aligned windows
    np.testing.assert_array_equal(chunk, doc[start:start + raw])


def test_ul2_example_is_deterministic_per_seed_and_index():
  doc = random_doc(np.random.default_rng(0), 700)
  kw = dict(denoisers=ul2.UL2_DENOISERS, sentinel_ids=SENTINELS,
            mode_ids=MODES, eos_id=EOS, seq_len=256)

  def example(seed, index):
    return ul2.ul2_example(doc, seed=seed, index=index, **kw)

  def same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)

  assert same(example(0, 5), example(0, 5))
  assert sum(same(example(0, i), example(0, i + 1)) for i in range(30)) == 0
  assert sum(same(example(0, i), example(1, i)) for i in range(30)) == 0


@pytest.mark.parametrize("rates", [None, (4, 2, 1, 1)])
def test_mixture_rates_are_respected(rates):
  doc = np.arange(10, 50, dtype=np.int32)
  num = 2400
  ks = [int(ul2.ul2_example(doc, denoisers=ul2.UL2R_DENOISERS, rates=rates,
                            seed=0, index=i, sentinel_ids=SENTINELS,
                            mode_ids=MODES, eos_id=EOS,
                            seq_len=64)["denoiser"][0])
        for i in range(num)]
  expected = num * ul2.mixture_probabilities(rates, 4)
  counts = np.bincount(ks, minlength=4)
  assert ((counts - expected) ** 2 / expected).sum() < 16.3  # 3 dof, p=0.001


def test_mixture_probabilities_validation():
  np.testing.assert_allclose(ul2.mixture_probabilities((1, 3), 2), [.25, .75])
  with pytest.raises(ValueError, match=r"shape \(3,\)"):
    ul2.mixture_probabilities((1, 2, 3), 2)
  with pytest.raises(ValueError, match="positive sum"):
    ul2.mixture_probabilities((0, 0), 2)


# -------------------------------------------------------------- denoisers ---


def test_presets_match_the_papers():
  def spec(ds):
    return [(d.kind, d.noise_density, d.mean_noise_span_length, d.mode)
            for d in ds]
  # UL2 (arXiv:2205.05131): R(mu 3, 8; r .15), X(3, 8 @ .5; 64 @ .15, .5), S.
  assert spec(ul2.UL2_DENOISERS) == [
      ("R", 0.15, 3, "[NLU]"), ("R", 0.15, 8, "[NLU]"),
      ("X", 0.5, 3, "[NLG]"), ("X", 0.5, 8, "[NLG]"),
      ("X", 0.15, 64, "[NLG]"), ("X", 0.5, 64, "[NLG]"),
      ("S", 0.25, None, "[S2S]")]
  # UL2R (arXiv:2210.11399): R(3, .15), X(32, .15), X(3, .5), S.
  assert spec(ul2.UL2R_DENOISERS) == [
      ("R", 0.15, 3, "[NLU]"), ("X", 0.15, 32, "[NLG]"),
      ("X", 0.5, 3, "[NLG]"), ("S", 0.25, None, "[S2S]")]
  assert sum(ul2.UL2R_PAPER_RATES) == 1 and ul2.UL2R_PAPER_RATES[-1] == 0.5


def test_denoiser_validation():
  with pytest.raises(ValueError, match="kind"):
    ul2.Denoiser("q", "Q", 0.1, 3, "[NLU]")
  with pytest.raises(ValueError, match="None exactly for S"):
    ul2.Denoiser("s", "S", 0.25, 3, "[S2S]")
  with pytest.raises(ValueError, match="noise_density"):
    ul2.Denoiser.regular(1.5, 3)
  with pytest.raises(ValueError, match="too short"):
    ul2.raw_length_for(ul2.Denoiser.regular(0.15, 3), 5)


# ------------------------------------------------------------------ grain ---


def _map(**overrides):
  kw = dict(denoisers=ul2.UL2_DENOISERS, seed=7, sentinel_ids=SENTINELS,
            mode_ids=MODES, eos_id=EOS, seq_len=128)
  kw.update(overrides)
  return ul2.UL2Map(**kw)


def test_ul2_map_on_a_map_dataset_is_index_deterministic():
  rng = np.random.default_rng(0)
  docs = [random_doc(rng, n) for n in rng.integers(1, 300, 12)]
  ds = grain.MapDataset.source(docs).map_with_index(_map())
  forward = [ds[i] for i in range(len(ds))]
  backward = [ds[i] for i in reversed(range(len(ds)))][::-1]
  shard = list(ds.slice(slice(1, None, 2)))  # re-sharding keeps the index
  for i, (a, b) in enumerate(zip(forward, backward)):
    direct = ul2.ul2_example(docs[i], denoisers=ul2.UL2_DENOISERS, seed=7,
                             index=i, sentinel_ids=SENTINELS, mode_ids=MODES,
                             eos_id=EOS, seq_len=128)
    for key in direct:
      np.testing.assert_array_equal(a[key], direct[key])
      np.testing.assert_array_equal(b[key], direct[key])
      if i % 2:
        np.testing.assert_array_equal(shard[i // 2][key], direct[key])
  for a, b in zip(list(ds.to_iter_dataset()), forward):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_ul2_map_pickles_for_grain_workers():
  m = _map()
  doc = np.arange(10, 400, dtype=np.int32)
  clone = pickle.loads(pickle.dumps(m))
  for key, value in m.map_with_index(3, doc).items():
    np.testing.assert_array_equal(clone.map_with_index(3, doc)[key], value)


def test_ul2_map_validates_the_mixture():
  with pytest.raises(ValueError, match="needs 64 sentinels"):
    _map(sentinel_ids=SENTINELS[:10], seq_len=512)
  with pytest.raises(ValueError, match="lacks"):
    _map(mode_ids={ul2.NLU: 3})
  with pytest.raises(ValueError, match="rates"):
    _map(rates=(1, 2))
  with pytest.raises(ValueError, match="too short"):
    _map(seq_len=5)


def test_docstring_examples():
  for module in (sc, ul2):
    assert doctest.testmod(module).failed == 0
