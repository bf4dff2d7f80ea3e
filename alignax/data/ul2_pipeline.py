"""UL2 batches: the dataset builders of ``config.data.task = 'ul2'``.

The same stages as :mod:`alignax.data.pipeline`, with the UL2 transforms of
:mod:`alignax.data.ul2` in place of next-token chunks::

  ids  = shard_and_shuffle(range(N), seed)        # MapDataset of record ids
  docs = ids.map(ReadAndTokenize(source))         # {'record', 'tokens'}
  segs = docs.map_with_index(UL2Document(...))    # window, denoise: [segment]
  segs -> to_iter_dataset (reader threads) -> unroll -> pack (+ 'denoiser')
       -> batch

Every document is cut into consecutive windows, each its own example: window
``j`` first draws its denoiser ``k`` and then takes the next
``raw_length_for(k, seq_len + 1)`` tokens, the most that ``k`` turns into an
example that still fits a row. Every token of a document lands in exactly one
example, and most examples fill a row. (T5's ``select_random_chunk`` keeps
one random window per document and epoch; here nothing is read or tokenized
in vain.)

Determinism: the randomness of window ``j`` of a record comes only from
``np.random.default_rng([seed, v * 2**20 + j])`` with ``v = epoch * N +
record`` the record's *global* visit number (``N`` records in the split). It
does not depend on the process's shard, on reader threads or on the
iterator's history, so a resumed run, and a run re-sharded over another
number of processes, corrupt the ``e``-th visit of a record exactly alike.

Batches are the packed format of :mod:`alignax.data.packing` plus
``denoiser``: ``int32 [B, T]``, the index of each token's denoiser in the
mixture (0 on padding, where the weight is 0 too).
"""

import re

import grain
import grain.experimental as grain_exp
import numpy as np

from alignax.data import packing
from alignax.data import pipeline
from alignax.data import records
from alignax.data import shards
from alignax.data import sources
from alignax.data import tokenizer as tok_lib
from alignax.data import ul2

PRESETS = {"ul2": ul2.UL2_DENOISERS, "ul2r": ul2.UL2R_DENOISERS}
S_SPLITS = {"fixed": ul2.s_split_fixed, "uniform": ul2.s_split_uniform}
EXTRA_FIELDS = ("denoiser",)
# Windows per record visit: the example index is visit * MAX_WINDOWS + window,
# so a longer document (over a million windows) is an error, not a collision.
MAX_WINDOWS = 1 << 20
# Held-out corruption does not follow config.seed: eval losses of runs with
# different seeds are measured on the same examples.
EVAL_SEED = 0
_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"
_DENOISER_RE = re.compile(rf"\s*([RXS])\({_NUMBER}(?:,{_NUMBER})?\)\s*")


def parse_denoiser(text):
  """A :class:`~alignax.data.ul2.Denoiser` from its name.

  ``'R(r,mu)'`` and ``'X(r,mu)'`` are span corruption with rate ``r`` and
  mean span length ``mu``; ``'S(r)'`` is the prefix LM with target fraction
  ``r``. Names round-trip: ``parse_denoiser(d.name) == d``.

  >>> parse_denoiser("X(0.5,64)") == ul2.Denoiser.extreme(0.5, 64)
  True
  """
  match = _DENOISER_RE.fullmatch(text)
  if not match:
    raise ValueError(f"{text!r} is not a denoiser: write 'R(rate,mean_span)'"
                     ", 'X(rate,mean_span)' or 'S(target_fraction)'")
  kind, rate, span = match.groups()
  if (kind == "S") != (span is None):
    raise ValueError(f"{text!r}: R and X take (rate, mean_span), S takes "
                     "(target_fraction)")
  if kind == "S":
    return ul2.Denoiser.sequential(float(rate))
  make = ul2.Denoiser.regular if kind == "R" else ul2.Denoiser.extreme
  return make(float(rate), float(span))


def denoisers_from_config(ul2_cfg):
  """The mixture of ``config.data.ul2``: its ``denoisers``, else ``preset``."""
  if ul2_cfg.denoisers:
    denoisers = []
    for i, text in enumerate(ul2_cfg.denoisers):
      try:
        denoisers.append(parse_denoiser(text))
      except ValueError as e:
        raise ValueError(f"config.data.ul2.denoisers[{i}]: {e}") from None
  elif ul2_cfg.preset in PRESETS:
    denoisers = PRESETS[ul2_cfg.preset]
  else:
    raise ValueError(f"config.data.ul2.preset={ul2_cfg.preset!r}: use one of "
                     f"{sorted(PRESETS)} or list config.data.ul2.denoisers")
  names = [d.name for d in denoisers]
  if len(set(names)) != len(names):
    raise ValueError(f"config.data.ul2.denoisers lists a denoiser twice: "
                     f"{names}")
  return tuple(denoisers)


def rates_from_config(ul2_cfg, num_denoisers):
  """``config.data.ul2.rates`` checked against the mixture; None = uniform."""
  if not ul2_cfg.rates:
    return None
  try:
    return tuple(ul2.mixture_probabilities(ul2_cfg.rates, num_denoisers))
  except ValueError as e:
    raise ValueError(f"config.data.ul2.rates={tuple(ul2_cfg.rates)}: {e}"
                     ) from None


def window_lengths(denoisers, seq_len):
  """Raw tokens per window of each denoiser: the most that fit a row.

  A row of ``seq_len`` holds the segment ``seq[:-1]`` of
  ``seq = [mode] + inputs + targets + [EOS]``, so ``len(seq) <= seq_len + 1``.

  Returns:
    a tuple of ints, one per denoiser.
  """
  try:
    return tuple(ul2.raw_length_for(d, seq_len + 1) for d in denoisers)
  except ValueError as e:
    raise ValueError(f"config.train.seq_len={seq_len}: {e}") from None


def build_ul2_map(ul2_cfg, tokenizer, *, seed, seq_len):
  """The :class:`~alignax.data.ul2.UL2Map` of ``config.data.ul2``.

  Raises:
    ValueError: naming the config field: unknown preset or S split, a
      malformed denoiser, rates of the wrong length, ``seq_len`` too short
      for a denoiser, or fewer tokenizer sentinels than the mixture needs.
  """
  denoisers = denoisers_from_config(ul2_cfg)
  rates = rates_from_config(ul2_cfg, len(denoisers))
  if ul2_cfg.s_split not in S_SPLITS:
    raise ValueError(f"config.data.ul2.s_split={ul2_cfg.s_split!r}: use one "
                     f"of {sorted(S_SPLITS)}")
  window_lengths(denoisers, seq_len)  # Checks seq_len first, naming it.
  needed = ul2.num_sentinels_needed(denoisers, seq_len + 1)
  if needed > tokenizer.num_sentinels:
    raise ValueError(
        f"config.tokenizer.num_sentinels={tokenizer.num_sentinels} is too "
        f"few: the mixture needs {needed} at seq_len={seq_len}")
  return ul2.UL2Map(
      denoisers=denoisers, rates=rates, seed=seed,
      sentinel_ids=[tokenizer.sentinel_id(i) for i in range(needed)],
      mode_ids={m: tokenizer.mode_id(m) for m in tok_lib.MODE_TOKENS},
      eos_id=tokenizer.eos_id, seq_len=seq_len + 1,
      s_split=S_SPLITS[ul2_cfg.s_split])


class ReadAndTokenize(grain.transforms.Map):
  """Record id -> ``{'record': id, 'tokens': int32 [n]}`` (no EOS).

  UL2 ends every *example* with EOS (:func:`~alignax.data.ul2.ul2_example`),
  so documents are tokenized without one.
  """

  def __init__(self, source, tokenizer, *, add_bos=False):
    self._source = source
    self._tokenize = pipeline.Tokenize(tokenizer, add_bos=add_bos,
                                       add_eos=False)

  def map(self, element):
    record = int(element)
    return {"record": record,
            "tokens": self._tokenize.map(self._source[record])["tokens"]}


class UL2Document(grain.transforms.MapWithIndex):
  """``(index, {'record', 'tokens'})`` -> the list of its UL2 segments.

  Window ``j`` of the document is example ``v * MAX_WINDOWS + j`` with
  ``v = (index // shard_length) * num_records + record`` (see the module
  docstring); each segment carries ``denoiser`` (``int32 [n]``).

  Args:
    ul2_map: the :class:`~alignax.data.ul2.UL2Map` making each example.
    seq_len: row length ``T`` (the map's ``seq_len`` is ``T + 1``).
    num_records: records in the split, ``N``.
    shard_length: records in this process's shard (one epoch).
  """

  def __init__(self, ul2_map, *, seq_len, num_records, shard_length):
    self.ul2_map = ul2_map
    self.lengths = window_lengths(ul2_map.denoisers, seq_len)
    self.num_records, self.shard_length = num_records, shard_length
    # Bit for bit the probabilities ul2_example draws with (UL2Map passes
    # its normalised rates, which ul2_example normalises once more).
    self._p = ul2.mixture_probabilities(ul2_map.probabilities,
                                        len(self.lengths))

  def denoiser_of(self, example_index):
    """The denoiser :func:`~alignax.data.ul2.ul2_example` will draw first."""
    rng = np.random.default_rng([self.ul2_map.seed, example_index])
    return int(rng.choice(len(self.lengths), p=self._p))

  def map_with_index(self, index, element):
    tokens = element["tokens"]
    visit = ((index // self.shard_length) * self.num_records
             + element["record"])
    segments, start = [], 0
    while start < len(tokens):
      if len(segments) == MAX_WINDOWS:
        raise ValueError(f"record {element['record']} has {len(tokens)} "
                         f"tokens, more than {MAX_WINDOWS} windows")
      example = visit * MAX_WINDOWS + len(segments)
      # The window is as long as the example's own denoiser allows, so
      # ul2_example's random_chunk keeps it whole.
      end = start + self.lengths[self.denoiser_of(example)]
      segments.append(self.ul2_map.map_with_index(example, tokens[start:end]))
      start = end
    return segments


class _Unroll(grain_exp.FlatMapTransform):
  """A list of segments -> its segments, one element each."""

  max_fan_out = MAX_WINDOWS  # Only the MapDataset flat map reads it.

  def flat_map(self, element):
    return element


def ul2_segments(source, data_cfg, tokenizer, *, seed, seq_len,
                 process_index=0, process_count=1, shuffle=True,
                 num_epochs=None):
  """This process's UL2 segments (``IterDataset``), ready for packing.

  Args:
    source: random-access source of ``{'text'}`` records.
    data_cfg: the ``data`` config; reads ``ul2`` (see
      :func:`build_ul2_map`), ``add_bos`` and the reader options.
    tokenizer: an ``alignax.data.tokenizer.Tokenizer`` with mode tokens and
      enough sentinels.
    seed: seed of the record shuffle and of the corruption.
    seq_len: row length ``T``; every segment has at most ``T`` tokens.
    process_index: this process's shard of the records.
    process_count: number of shards.
    shuffle: shuffle the records (per epoch).
    num_epochs: passes over the shard; ``None`` repeats forever.

  Returns:
    ``IterDataset`` of segments (``inputs``, ``targets``, ``weights``,
    ``prefix``, ``denoiser``).
  """
  ul2_map = build_ul2_map(data_cfg.ul2, tokenizer, seed=seed, seq_len=seq_len)
  document = UL2Document(
      ul2_map, seq_len=seq_len, num_records=len(source),
      shard_length=len(range(process_index, len(source), process_count)))
  ids = pipeline.shard_and_shuffle(
      range(len(source)), seed=seed, process_index=process_index,
      process_count=process_count, shuffle=shuffle, num_epochs=num_epochs)
  docs = ids.map(ReadAndTokenize(source, tokenizer,
                                 add_bos=data_cfg.get("add_bos", False)))
  lists = docs.map_with_index(document).to_iter_dataset(
      pipeline.read_options(data_cfg))
  return grain_exp.FlatMapIterDataset(lists, _Unroll())


def build_ul2_dataset(data_cfg, tokenizer, *, split, seed, seq_len,
                      batch_size, process_index=0, process_count=1,
                      num_epochs=None):
  """Packed UL2 batches for training (``pipeline.build_lm_dataset``'s twin).

  Args are those of :func:`alignax.data.pipeline.build_lm_dataset`; the
  mixture comes from ``data_cfg.ul2`` (see :func:`build_ul2_map`).

  Returns:
    a ``grain.IterDataset`` of batch dicts of ``[batch_size, seq_len]``
    arrays, the packed format plus ``denoiser``; its iterators checkpoint
    with ``get_state`` / ``set_state``. Its ``skipped`` holds the
    malformed-record counts (:func:`alignax.data.records.skip_counts`).
  """
  source = sources.build_source(data_cfg, split)

  def make(shard, num_shards, rows):
    segments = ul2_segments(source, data_cfg, tokenizer, seed=seed,
                            seq_len=seq_len, process_index=shard,
                            process_count=num_shards, num_epochs=num_epochs)
    return packing.pack_and_batch(
        segments, seq_len=seq_len, batch_size=rows, seed=seed,
        num_packing_bins=data_cfg.get("packing_bins") or None,
        extra_fields=EXTRA_FIELDS)

  ds = shards.batches(make, data_cfg, batch_size=batch_size,
                      process_index=process_index, process_count=process_count)
  return records.with_counts(ds, source)


def empty_batch(batch_size, seq_len):
  """An all-padding UL2 batch (weights 0, ``denoiser`` 0)."""
  return dict(packing.empty_rows(batch_size, seq_len),
              denoiser=np.zeros((batch_size, seq_len), np.int32))


def build_ul2_eval_batches(data_cfg, tokenizer, *, seq_len, batch_size,
                           process_index=0, process_count=1,
                           num_batches=None):
  """Held-out UL2 batches (``pipeline.build_eval_batches``'s twin).

  The eval split read once in order, corrupted with ``EVAL_SEED`` (the same
  examples whatever ``config.seed`` is), packed without shuffling; the last
  batch is padded with weight-0 rows and ``num_batches`` pads or truncates
  to a common count. The ``denoiser`` field lets the objective report the
  held-out loss of each denoiser.

  Returns:
    a list of batch dicts of ``[batch_size, seq_len]`` arrays.
  """
  source = sources.build_source(data_cfg, "eval")
  batches = ()
  if process_index < len(source):  # Else this process's shard is empty.
    segments = ul2_segments(source, data_cfg, tokenizer, seed=EVAL_SEED,
                            seq_len=seq_len, process_index=process_index,
                            process_count=process_count, shuffle=False,
                            num_epochs=1)
    batches = packing.pack_and_batch(
        segments, seq_len=seq_len, batch_size=batch_size,
        num_packing_bins=data_cfg.get("packing_bins") or None,
        shuffle_bins=False, drop_remainder=False, extra_fields=EXTRA_FIELDS)
  return pipeline.pad_eval_batches(batches, num_batches,
                                   lambda: empty_batch(batch_size, seq_len))
