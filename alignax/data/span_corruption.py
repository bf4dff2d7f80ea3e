"""T5 span corruption in vectorised NumPy.

A line-by-line port of the span-corruption pieces of T5's
``t5/data/preprocessors.py`` (``random_spans_noise_mask``,
``noise_span_to_unique_sentinel``, ``nonnoise_span_to_unique_sentinel``,
``random_spans_helper``) from TensorFlow graphs to NumPy on one example. The
randomness is an explicit ``np.random.Generator``; nothing reads global state.

Two deliberate differences from T5, both documented where they happen:

* EOS: T5 appends EOS to both inputs and targets. The functions here return
  them *without* EOS; the UL2 decoder-only formatting (:mod:`alignax.data.ul2`)
  concatenates ``[mode] + inputs + targets + [EOS]``, one EOS at the very end.
* Sentinels are looked up in an explicit ``sentinel_ids`` array (``i``-th
  noise span -> ``sentinel_ids[i]``) and running out of them is an error. T5
  computes ``vocab_size - 1 - i`` without a bound, so past its 100
  ``<extra_id_*>`` tokens it silently reuses ordinary vocabulary ids.

References:
  Raffel et al., *Exploring the Limits of Transfer Learning with a Unified
  Text-to-Text Transformer*, JMLR 2020 (T5), section 3.1.4.
"""

import numpy as np


def t5_sentinel_ids(vocab_size, num_sentinels):
  """Sentinel ids counting down from the top of the vocabulary, like T5.

  Args:
    vocab_size: size of the vocabulary, sentinels included.
    num_sentinels: how many sentinels the tokenizer reserves.

  Returns:
    ``int32 [num_sentinels]`` with ``ids[i] = vocab_size - 1 - i`` (T5's
    ``<extra_id_i>``).

  >>> t5_sentinel_ids(32100, 3)
  array([32099, 32098, 32097], dtype=int32)
  """
  if not 0 < num_sentinels <= vocab_size:
    raise ValueError(f"num_sentinels={num_sentinels} must be in "
                     f"[1, vocab_size={vocab_size}]")
  return (vocab_size - 1 - np.arange(num_sentinels)).astype(np.int32)


def noise_span_counts(length, noise_density, mean_noise_span_length):
  r"""Numbers of noise tokens and noise spans, as ``random_spans_noise_mask``.

  .. math::
    N = \operatorname{clip}(\operatorname{round}(L r), 1, L - 1), \quad
    S = \max(\operatorname{round}(N / \mu), 1)

  Rounding is half-to-even in float32, as T5's TF graph does
  (``tf.round(tf.cast(length, tf.float32) * noise_density)``). T5's own
  :func:`random_spans_helper` rounds in float64, so for a few lengths they
  disagree by one token (``L = 190, r = 0.15``: float32 gives 29, float64 28);
  the mask follows the graph. ``S`` is further capped at ``min(N, L - N)``:
  T5 fails outright there (a segmentation into more parts than items), which
  only happens for ``mu < 1`` or densities near 1.

  Args:
    length: sequence length(s) ``L``, an int or an int array (vectorised).
      Lengths below 2 are raised to 2, as T5 does before drawing the mask.
    noise_density: corruption rate ``r`` in ``(0, 1)``.
    mean_noise_span_length: mean span length ``mu`` (> 0).

  Returns:
    ``(num_noise_tokens, num_noise_spans)``, ints or int arrays shaped like
    ``length``.
  """
  length = np.maximum(np.asarray(length, np.int64), 2)
  noise = np.round(length.astype(np.float32) * np.float32(noise_density))
  noise = np.clip(noise.astype(np.int64), 1, length - 1)
  spans = np.round(noise.astype(np.float32)
                   / np.float32(mean_noise_span_length)).astype(np.int64)
  spans = np.minimum(np.maximum(spans, 1), np.minimum(noise, length - noise))
  if noise.ndim == 0:
    return int(noise), int(spans)
  return noise, spans


def random_segmentation(num_items, num_segments, rng):
  """Uniformly random composition of ``num_items`` into positive parts.

  T5's ``_random_segmentation``: shuffle ``num_segments - 1`` ones among
  ``num_items - 1`` slots; a one in slot ``j`` starts a new segment at item
  ``j + 1``. Every composition is equally likely.

  Args:
    num_items: integer > 0.
    num_segments: integer in ``[1, num_items]``.
    rng: ``np.random.Generator``; one ``permutation`` of ``num_items - 1``
      entries is drawn from it.

  Returns:
    ``int64 [num_segments]`` positive lengths summing to ``num_items``.
  """
  if not 1 <= num_segments <= num_items:
    raise ValueError(f"num_segments={num_segments} must be in "
                     f"[1, num_items={num_items}]")
  first_in_segment = rng.permutation(
      np.arange(num_items - 1) < num_segments - 1)  # [num_items - 1]
  starts = np.flatnonzero(first_in_segment) + 1  # [num_segments - 1]
  return np.diff(np.concatenate([[0], starts, [num_items]]))


def random_spans_noise_mask(length, rng, *, noise_density,
                            mean_noise_span_length):
  """T5's noise mask of random spans, starting with non-noise.

  The counts come from :func:`noise_span_counts`; noise and non-noise span
  lengths are independent uniform compositions (noise drawn first, then
  non-noise, as T5's ``seeds[0]`` / ``seeds[1]``), interleaved
  ``[nonnoise_0, noise_0, nonnoise_1, noise_1, ...]``. So the first token is
  never noise and the last one always is (for ``length >= 2``).

  Args:
    length: number of tokens ``L >= 1``. ``L = 1`` is drawn at length 2 and
      cut, so it has no noise (as in T5).
    rng: ``np.random.Generator``.
    noise_density: corruption rate ``r``.
    mean_noise_span_length: mean noise span length ``mu``.

  Returns:
    ``bool [length]``, True at noise tokens.
  """
  if length < 1:
    raise ValueError(f"length={length} must be >= 1")
  padded = max(length, 2)
  num_noise, num_spans = noise_span_counts(padded, noise_density,
                                           mean_noise_span_length)
  noise_lengths = random_segmentation(num_noise, num_spans, rng)
  nonnoise_lengths = random_segmentation(padded - num_noise, num_spans, rng)
  interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1)  # [S, 2]
  span_num = np.repeat(np.arange(2 * num_spans), interleaved.reshape(-1))
  return (span_num % 2 == 1)[:length]


def noise_span_to_unique_sentinel(tokens, noise_mask, sentinel_ids):
  """Replaces the ``i``-th run of noise tokens with ``sentinel_ids[i]``.

  Args:
    tokens: ``[L]`` integer tokens.
    noise_mask: ``bool [L]``.
    sentinel_ids: ``[K]`` sentinel ids, ``K >=`` number of noise runs.

  Returns:
    ``[L - num_noise + num_runs]`` tokens, same dtype as ``tokens``.
  """
  tokens = np.asarray(tokens)
  noise_mask = np.asarray(noise_mask, bool)
  if tokens.ndim != 1 or noise_mask.shape != tokens.shape:
    raise ValueError(f"tokens {tokens.shape} and noise_mask "
                     f"{noise_mask.shape} must be equal 1-D shapes")
  prev_is_noise = np.concatenate([[False], noise_mask[:-1]])
  first_noise = noise_mask & ~prev_is_noise
  run_index = np.cumsum(first_noise) - 1  # [L], -1 before the first run
  num_runs = int(run_index[-1]) + 1 if tokens.size else 0
  sentinel_ids = np.asarray(sentinel_ids)
  if num_runs > sentinel_ids.shape[0]:
    raise ValueError(f"{num_runs} spans need {num_runs} sentinels but "
                     f"sentinel_ids has shape {sentinel_ids.shape}")
  sentinels = sentinel_ids[np.clip(run_index, 0, None)] if num_runs else tokens
  out = np.where(first_noise, sentinels, tokens).astype(tokens.dtype)
  return out[~(noise_mask & prev_is_noise)]


def nonnoise_span_to_unique_sentinel(tokens, noise_mask, sentinel_ids):
  """Replaces runs of *non*-noise tokens with sentinels (T5's targets)."""
  return noise_span_to_unique_sentinel(tokens, ~np.asarray(noise_mask, bool),
                                       sentinel_ids)


def span_corruption(tokens, rng, *, noise_density, mean_noise_span_length,
                    sentinel_ids):
  """T5 span corruption of one sequence, without EOS.

  With noise spans ``n_i`` and sentinels ``S_i = sentinel_ids[i]``::

    tokens  = a_0 n_0 a_1 n_1 ... a_k n_k
    inputs  = a_0 S_0 a_1 S_1 ... a_k S_k
    targets = S_0 n_0 S_1 n_1 ... S_k n_k

  T5 appends EOS to both; here neither gets one (see the module docstring).

  Args:
    tokens: ``int [L]``, ``L >= 1``.
    rng: ``np.random.Generator`` that draws the mask.
    noise_density: corruption rate ``r``.
    mean_noise_span_length: mean noise span length ``mu``.
    sentinel_ids: ``[K]`` sentinel ids, ``K >=`` number of spans
      (see :func:`noise_span_counts`).

  Returns:
    ``(inputs, targets)``: ``[L - N + S]`` and ``[N + S]`` with ``N`` noise
    tokens in ``S`` spans.

  >>> rng = np.random.default_rng(0)
  >>> inputs, targets = span_corruption(
  ...     np.arange(10), rng, noise_density=0.3, mean_noise_span_length=1.5,
  ...     sentinel_ids=np.array([99, 98]))
  >>> inputs.tolist(), targets.tolist()
  ([0, 1, 2, 3, 4, 99, 6, 7, 98], [99, 5, 98, 8, 9])
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or tokens.size == 0:
    raise ValueError(f"tokens must be a non-empty 1-D array, got shape "
                     f"{tokens.shape}")
  mask = random_spans_noise_mask(
      tokens.size, rng, noise_density=noise_density,
      mean_noise_span_length=mean_noise_span_length)
  return (noise_span_to_unique_sentinel(tokens, mask, sentinel_ids),
          nonnoise_span_to_unique_sentinel(tokens, mask, sentinel_ids))


def random_spans_helper(inputs_length, noise_density, mean_noise_span_length,
                        extra_tokens_per_span_inputs=1,
                        extra_tokens_per_span_targets=1):
  """T5's ``random_spans_helper``: raw length for an encoder input budget.

  Finds the largest raw length whose corrupted inputs, with
  ``extra_tokens_per_span_inputs`` sentinels per noise span and one EOS, fit
  ``inputs_length``, and the resulting targets length (sentinels and one EOS
  included). As in T5, rounding is Python's (float64, half-to-even), no
  ``max(., 1)`` is applied to the span count, and for ``noise_density == 0.5``
  a targets length above the inputs length is trimmed by one raw token so
  that it lands on the (round) inputs length.

  This budgets an encoder-decoder pair; the decoder-only budget is
  :func:`alignax.data.ul2.raw_length_for`.

  Args:
    inputs_length: desired length of the encoder inputs, EOS included.
    noise_density: corruption rate ``r``.
    mean_noise_span_length: mean noise span length ``mu``.
    extra_tokens_per_span_inputs: sentinels per noise span in the inputs.
    extra_tokens_per_span_targets: sentinels per span in the targets.

  Returns:
    ``(tokens_length, targets_length)``.

  With T5's defaults (one sentinel per span on each side, one EOS each):

  >>> random_spans_helper(512, 0.15, 3)
  (568, 114)
  >>> random_spans_helper(512, 0.5, 64)
  (1006, 512)
  """
  def lengths(tokens_length):
    num_noise = int(round(tokens_length * noise_density))
    num_spans = int(round(num_noise / mean_noise_span_length))
    return (tokens_length - num_noise
            + num_spans * extra_tokens_per_span_inputs + 1,
            num_noise + num_spans * extra_tokens_per_span_targets + 1)

  tokens_length = inputs_length - 1
  while lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  final_inputs_length, targets_length = lengths(tokens_length)
  if noise_density == 0.5 and targets_length > final_inputs_length:
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length
