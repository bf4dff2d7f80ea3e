"""UL2 mixture-of-denoisers, formatted for a decoder-only prefix LM.

Each example picks one denoiser from a configured list, corrupts a window of
the document with it and formats ``[mode] + inputs + targets + [EOS]`` as one
packed-LM segment (:func:`to_decoder_only_example`): the mode token and the
inputs form the bidirectional prefix; the loss is on the targets only.

* R- and X-denoisers are T5 span corruption
  (:func:`alignax.data.span_corruption.span_corruption`); R and X differ only
  in their settings and mode token.
* The S-denoiser is a prefix-LM split: :func:`s_split_fixed` (the paper's, the
  last ``r = 25%`` of the tokens are the target) or :func:`s_split_uniform`
  (T5's ``prefix_lm``: a uniform split point); pass one as ``s_split``.

Randomness comes from ``np.random.default_rng([seed, index])`` only, so an
example depends on the seed, its index and its tokens: a resumed or re-sharded
run sees the same corrupted examples. In a grain pipeline::

  ds = grain.MapDataset.source(token_arrays)  # elements: 1-D int token arrays
  ds = ds.shuffle(seed=0).repeat()            # before the map: new corruption
  ds = ds.map_with_index(UL2Map(              # per epoch (indices keep growing)
      denoisers=UL2_DENOISERS, seed=0, sentinel_ids=sentinel_ids,
      mode_ids=mode_ids, eos_id=eos_id, seq_len=512))

References:
  Tay et al., *UL2: Unifying Language Learning Paradigms*, ICLR 2023,
  arXiv:2205.05131, section 3.1 (mixture of denoisers, mode switching).
  Tay et al., *Transcending Scaling Laws with 0.1% Extra Compute*,
  arXiv:2210.11399 (U-PaLM / UL2R).
"""

import dataclasses
import functools

import grain
import numpy as np

from alignax.data import span_corruption as sc

NLU, NLG, S2S = "[NLU]", "[NLG]", "[S2S]"
_KINDS = ("R", "X", "S")


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One denoising task of the mixture.

  Attributes:
    name: label for logs and per-denoiser metrics.
    kind: ``'R'`` (regular), ``'X'`` (extreme) or ``'S'`` (sequential).
    noise_density: corruption rate ``r``; for S the target fraction.
    mean_noise_span_length: mean span length ``mu`` for R/X; None for S.
    mode: key of the mode token in ``mode_ids`` (``'[NLU]'`` for R,
      ``'[NLG]'`` for X, ``'[S2S]'`` for S in the paper).
  """
  name: str
  kind: str
  noise_density: float
  mean_noise_span_length: float | None
  mode: str

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f"kind={self.kind!r} must be one of {_KINDS}")
    if not 0.0 < self.noise_density < 1.0:
      raise ValueError(f"noise_density={self.noise_density} not in (0, 1)")
    is_s = self.kind == "S"
    if is_s != (self.mean_noise_span_length is None):
      raise ValueError("mean_noise_span_length must be None exactly for S, "
                       f"got {self.mean_noise_span_length} for {self.kind}")
    if not is_s and self.mean_noise_span_length < 1:
      raise ValueError(f"mean_noise_span_length="
                       f"{self.mean_noise_span_length} must be >= 1")

  @classmethod
  def regular(cls, noise_density, mean_noise_span_length, mode=NLU):
    """R-denoiser: short spans, low rate (T5 span corruption)."""
    return cls(f"R({noise_density:g},{mean_noise_span_length:g})", "R",
               noise_density, mean_noise_span_length, mode)

  @classmethod
  def extreme(cls, noise_density, mean_noise_span_length, mode=NLG):
    """X-denoiser: long spans and/or a high corruption rate."""
    return cls(f"X({noise_density:g},{mean_noise_span_length:g})", "X",
               noise_density, mean_noise_span_length, mode)

  @classmethod
  def sequential(cls, target_fraction=0.25, mode=S2S):
    """S-denoiser: prefix LM, ``target_fraction`` of the tokens as target."""
    return cls(f"S({target_fraction:g})", "S", target_fraction, None, mode)


# UL2's final mixture of seven denoisers (Tay et al., arXiv:2205.05131; the
# R/S/X families are defined in section 3.1.2): R (mu=3, r=0.15) u
# (mu=8, r=0.15); X (3, 0.5) u (8, 0.5) u (64, 0.15) u (64, 0.5);
# S (r=0.25, mu=L/4: one span, the last quarter).
UL2_DENOISERS = (
    Denoiser.regular(0.15, 3),
    Denoiser.regular(0.15, 8),
    Denoiser.extreme(0.5, 3),
    Denoiser.extreme(0.5, 8),
    Denoiser.extreme(0.15, 64),
    Denoiser.extreme(0.5, 64),
    Denoiser.sequential(0.25),
)

# UL2R (U-PaLM, arXiv:2210.11399): R (mu=3, r=15%); X with "mean length 32
# or a corruption rate of up to 50%", i.e. (32, 0.15) and (3, 0.5), as in
# levanter's ul2r_configs; S (prefix LM).
UL2R_DENOISERS = (
    Denoiser.regular(0.15, 3),
    Denoiser.extreme(0.15, 32),
    Denoiser.extreme(0.5, 3),
    Denoiser.sequential(0.25),
)
# U-PaLM mixes 50% S, 25% X, 25% R. How the X quarter splits between its two
# settings is not stated; an even split is assumed here.
UL2R_PAPER_RATES = (0.25, 0.125, 0.125, 0.5)


def mixture_probabilities(rates, num_denoisers):
  """Normalised mixing probabilities; ``rates=None`` means uniform.

  Uniform is the default of the reference ``ul2_objective`` (paper appendix),
  which hands ``rates=None`` to ``tf.data.experimental.sample_from_datasets``.

  Args:
    rates: None or ``[num_denoisers]`` non-negative weights, positive sum.
    num_denoisers: length of the denoiser list.

  Returns:
    ``float64 [num_denoisers]`` summing to one.
  """
  if rates is None:
    return np.full(num_denoisers, 1.0 / num_denoisers)
  rates = np.asarray(rates, np.float64)
  if rates.shape != (num_denoisers,):
    raise ValueError(f"rates has shape {rates.shape}, expected "
                     f"({num_denoisers},) (one per denoiser)")
  if np.any(rates < 0) or not rates.sum() > 0:
    raise ValueError(f"rates {rates} must be >= 0 with a positive sum")
  return rates / rates.sum()


def s_split_fixed(tokens, rng, *, noise_density):
  """The paper's S-denoiser split: the last ``round(r L)`` tokens are targets.

  The count is clipped to ``[1, L - 1]`` so both sides are non-empty
  (a single token becomes all target).

  Args:
    tokens: ``[L]`` tokens, ``L >= 1``.
    rng: unused; the signature is shared with :func:`s_split_uniform`.
    noise_density: target fraction ``r`` (0.25 in the paper).

  Returns:
    ``(inputs, targets)``, a split of ``tokens``.
  """
  del rng
  length = len(tokens)
  num_targets = int(np.clip(np.round(length * noise_density), 1,
                            max(length - 1, 1)))
  return tokens[:length - num_targets], tokens[length - num_targets:]


def s_split_uniform(tokens, rng, *, noise_density):
  """T5's ``prefix_lm`` split: inputs length uniform in ``[1, L - 1]``.

  As ``random_prefix_noise_mask``; the expected target fraction is 1/2
  whatever ``noise_density`` says (T5 insists on 0.5 for that reason), so it
  is ignored here.

  Args:
    tokens: ``[L]`` tokens, ``L >= 1`` (``L = 1`` is all target).
    rng: ``np.random.Generator``; one integer is drawn.
    noise_density: ignored.

  Returns:
    ``(inputs, targets)``, a split of ``tokens``.
  """
  del noise_density
  length = len(tokens)
  num_inputs = int(rng.integers(min(length - 1, 1), length))
  return tokens[:num_inputs], tokens[num_inputs:]


def to_decoder_only_example(mode_id, inputs, targets):
  """Formats ``seq = [mode] + inputs + targets`` as one packed-LM segment.

  With ``P = 1 + len(inputs)`` prefix tokens and ``n = len(seq) - 1``:
  ``inputs = seq[:-1]``, ``targets = seq[1:]``, ``prefix[t] = t < P``,
  ``weights[t] = [t >= P - 1]``: the loss is on predicting every target token,
  the first one predicted from the last prefix position. With empty inputs
  this is a plain causal LM on ``targets`` after the mode token.

  Args:
    mode_id: id of the mode token.
    inputs: ``[I]`` corrupted inputs (no EOS).
    targets: ``[T]``, ``T >= 1``, targets (EOS included by the caller).

  Returns:
    dict of ``[n]`` arrays, ``n = I + T``: ``inputs``/``targets`` int32,
    ``weights`` float32, ``prefix`` bool.

  >>> ex = to_decoder_only_example(7, np.array([1, 2]), np.array([3, 4, 0]))
  >>> ex["inputs"].tolist(), ex["targets"].tolist()
  ([7, 1, 2, 3, 4], [1, 2, 3, 4, 0])
  >>> ex["prefix"].tolist(), ex["weights"].tolist()
  ([True, True, True, False, False], [0.0, 0.0, 1.0, 1.0, 1.0])
  """
  inputs, targets = np.asarray(inputs), np.asarray(targets)
  if inputs.ndim != 1 or targets.ndim != 1 or targets.size == 0:
    raise ValueError(f"inputs {inputs.shape} must be 1-D and targets "
                     f"{targets.shape} 1-D and non-empty")
  seq = np.concatenate([[mode_id], inputs, targets]).astype(np.int32)
  num_prefix = 1 + inputs.size
  position = np.arange(seq.size - 1)
  return {
      "inputs": seq[:-1],
      "targets": seq[1:],
      "weights": (position >= num_prefix - 1).astype(np.float32),
      "prefix": position < num_prefix,
  }


def decoder_only_length(denoiser, raw_length):
  """``len([mode] + inputs + targets + [EOS])`` for ``raw_length`` tokens.

  R/X: ``L + 2 S + 2`` (a sentinel per span on each side, mode, EOS) with
  ``S`` from :func:`~alignax.data.span_corruption.noise_span_counts`; exact
  for ``L >= 2`` and an upper bound at ``L = 1``. S: ``L + 2``. Span lengths
  are random but these counts are not, so this is exact, not an estimate.

  Args:
    denoiser: a :class:`Denoiser`.
    raw_length: int or int array of raw token counts ``L >= 1``.

  Returns:
    int or int array like ``raw_length``.
  """
  raw_length = np.asarray(raw_length, np.int64)
  if denoiser.kind == "S":
    return raw_length + 2
  _, spans = sc.noise_span_counts(raw_length, denoiser.noise_density,
                                  denoiser.mean_noise_span_length)
  return raw_length + 2 * spans + 2


@functools.lru_cache(maxsize=256)
def raw_length_for(denoiser, seq_len):
  """Most raw tokens whose formatted example has ``len(seq) <= seq_len``.

  T5's :func:`~alignax.data.span_corruption.random_spans_helper` budgets
  encoder inputs and decoder targets separately; decoder-only needs the
  total, ``raw + 2 S(raw) + 2 <= seq_len`` (``seq_len - 2`` for S). The
  length is non-decreasing in ``raw``, so this is the largest raw length that
  fits; one more token would not.

  Args:
    denoiser: a :class:`Denoiser`.
    seq_len: bound on ``1 + len(inputs) + len(targets)`` (EOS included);
      the packed segment (``seq[:-1]``) then has at most ``seq_len - 1``.

  Returns:
    the raw token budget (int).
  """
  candidates = np.arange(1, seq_len + 1)
  fits = candidates[decoder_only_length(denoiser, candidates) <= seq_len]
  if fits.size == 0 or (denoiser.kind != "S" and fits[-1] < 2):
    raise ValueError(f"seq_len={seq_len} is too short for {denoiser.name}")
  return int(fits[-1])


def num_sentinels_needed(denoisers, seq_len):
  """Sentinels the tokenizer must reserve for ``denoisers`` at ``seq_len``.

  T5 reserves 100; X(0.5, 3) alone needs more beyond ``seq_len`` ~ 600.
  """
  needed = [sc.noise_span_counts(raw_length_for(d, seq_len), d.noise_density,
                                 d.mean_noise_span_length)[1]
            for d in denoisers if d.kind != "S"]
  return max(needed, default=0)


def random_chunk(tokens, max_length, rng):
  """One of the ``ceil(L / max_length)`` aligned windows, uniformly.

  T5's ``select_random_chunk`` (default, aligned starts): every token has the
  same chance to be kept; the last window may be shorter. One integer is
  drawn even when the document fits, so the stream does not depend on ``L``.
  """
  num_chunks = -(-len(tokens) // max_length)
  start = max_length * int(rng.integers(num_chunks))
  return tokens[start:start + max_length]


def ul2_example(tokens, *, denoisers, rates=None, seed, index, sentinel_ids,
                mode_ids, eos_id, seq_len, s_split=s_split_fixed):
  """One UL2 example: pick a denoiser, corrupt a window, format it.

  From ``rng = np.random.default_rng([seed, index])``, in order: the
  denoiser ``k ~ rates``; a window of ``raw_length_for(denoisers[k],
  seq_len)`` tokens (:func:`random_chunk`; shorter documents are used whole);
  the corruption. Targets get one EOS at the end; the inputs none (they run
  straight into the targets).

  Args:
    tokens: ``[L]`` integer tokens of one document or chunk, ``L >= 1``.
    denoisers: sequence of :class:`Denoiser`.
    rates: mixing weights (see :func:`mixture_probabilities`); None: uniform.
    seed: non-negative int, the run's data seed.
    index: non-negative int, the example's global index.
    sentinel_ids: ``[K]`` ids, ``sentinel_ids[i]`` marks the ``i``-th span.
    mode_ids: mapping from each denoiser's ``mode`` to its token id.
    eos_id: end-of-sequence id.
    seq_len: bound on ``len([mode] + inputs + targets)``.
    s_split: :func:`s_split_fixed` (paper) or :func:`s_split_uniform` (T5).

  Returns:
    :func:`to_decoder_only_example`'s dict of ``[n]`` arrays,
    ``n < seq_len``, plus ``denoiser``: ``int32 [n]`` filled with ``k`` so
    per-denoiser metrics survive packing (weight them by ``weights``).
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or tokens.size == 0:
    raise ValueError(f"tokens must be a non-empty 1-D array, got shape "
                     f"{tokens.shape}")
  rng = np.random.default_rng([seed, index])
  k = int(rng.choice(len(denoisers),
                     p=mixture_probabilities(rates, len(denoisers))))
  denoiser = denoisers[k]
  if denoiser.mode not in mode_ids:
    raise ValueError(f"mode_ids {sorted(mode_ids)} has no {denoiser.mode!r}")
  chunk = random_chunk(tokens, raw_length_for(denoiser, seq_len), rng)
  if denoiser.kind == "S":
    inputs, targets = s_split(chunk, rng,
                              noise_density=denoiser.noise_density)
  else:
    inputs, targets = sc.span_corruption(
        chunk, rng, noise_density=denoiser.noise_density,
        mean_noise_span_length=denoiser.mean_noise_span_length,
        sentinel_ids=sentinel_ids)
  example = to_decoder_only_example(mode_ids[denoiser.mode], inputs,
                                    np.append(targets, eos_id))
  example["denoiser"] = np.full(example["inputs"].shape, k, np.int32)
  return example


class UL2Map(grain.transforms.MapWithIndex):
  """:func:`ul2_example` as a grain transform: ``ds.map_with_index(UL2Map())``.

  Elements are 1-D token arrays; the element's index in the dataset is the
  example index, so corruption is a pure function of (seed, index, tokens).
  The mixture is checked once here: rates, mode ids, ``seq_len`` and that
  ``sentinel_ids`` covers :func:`num_sentinels_needed`.
  """

  def __init__(self, *, denoisers, rates=None, seed, sentinel_ids, mode_ids,
               eos_id, seq_len, s_split=s_split_fixed):
    self.denoisers = tuple(denoisers)
    self.probabilities = mixture_probabilities(rates, len(self.denoisers))
    missing = {d.mode for d in self.denoisers} - set(mode_ids)
    if missing:
      raise ValueError(f"mode_ids {sorted(mode_ids)} lacks {sorted(missing)}")
    self.sentinel_ids = np.asarray(sentinel_ids)
    needed = num_sentinels_needed(self.denoisers, seq_len)
    if needed > self.sentinel_ids.shape[0]:
      raise ValueError(f"seq_len={seq_len} needs {needed} sentinels but "
                       f"sentinel_ids has shape {self.sentinel_ids.shape}")
    self.seed, self.mode_ids, self.eos_id = seed, dict(mode_ids), eos_id
    self.seq_len, self.s_split = seq_len, s_split

  def map_with_index(self, index, element):
    return ul2_example(
        element, denoisers=self.denoisers, rates=self.probabilities,
        seed=self.seed, index=index, sentinel_ids=self.sentinel_ids,
        mode_ids=self.mode_ids, eos_id=self.eos_id, seq_len=self.seq_len,
        s_split=self.s_split)
