"""Segments, first-fit packing and the packed LM batch format.

A *segment* is one training example before packing: a dict of equal-length
1-D arrays that are already shifted, so packing never has to look across a
segment boundary::

  inputs   int32    tokens fed to the model
  targets  int32    the token to predict at each position
  weights  float32  loss weight per position (0 on a UL2 prefix)
  prefix   bool     True where attention is bidirectional (UL2 prefix)

For a plain LM segment cut from tokens ``t[0..n)``: ``inputs = t[:-1]``,
``targets = t[1:]``, ``weights = 1``, ``prefix = False``. Every next-token
pair of a document therefore lies inside one segment, and ``seq_len + 1``
tokens fill a row of length ``seq_len`` exactly.

A packed *batch* is a dict of ``[B, T]`` NumPy arrays: the four fields above
plus ``positions`` (int32, restarting at 0 in each segment) and
``segment_ids`` (int32, 1, 2, ... per segment in a row, 0 on padding).
Padding has ``inputs = targets = 0``, ``weights = 0``, ``prefix = False``.
"""

import functools

import grain
import grain.experimental as grain_exp
import numpy as np

SEGMENT_FIELDS = ("inputs", "targets", "weights", "prefix")
BATCH_DTYPES = {
    "inputs": np.int32, "targets": np.int32, "weights": np.float32,
    "positions": np.int32, "segment_ids": np.int32, "prefix": np.bool_,
}


class ChunkTokens(grain_exp.FlatMapTransform):
  """Splits ``{'tokens': [n]}`` into chunks of at most ``max_tokens`` tokens.

  Consecutive chunks share ``overlap`` tokens. With ``overlap=1`` and
  ``max_tokens = seq_len + 1`` each next-token pair of the document lands in
  exactly one chunk. Chunks shorter than ``overlap + 1`` tokens are dropped
  (they would hold no new token).
  """

  # Only the MapDataset flat map uses max_fan_out; the IterDataset one
  # (used here) accepts any number of chunks per document.
  max_fan_out = 1 << 20

  def __init__(self, max_tokens, overlap=1):
    if not 0 <= overlap < max_tokens:
      raise ValueError(f"need 0 <= overlap < max_tokens, got {overlap=}, "
                       f"{max_tokens=}.")
    self.max_tokens = max_tokens
    self.overlap = overlap

  def flat_map(self, element):
    tokens = element["tokens"]
    stride = self.max_tokens - self.overlap
    return [{"tokens": tokens[start:start + self.max_tokens]}
            for start in range(0, max(len(tokens) - self.overlap, 0), stride)]


def lm_segment(tokens):
  """The plain next-token segment of a token chunk ``[n]`` (``n >= 2``)."""
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 1 or len(tokens) < 2:
    raise ValueError(f"lm_segment needs a 1-D chunk of >= 2 tokens, got "
                     f"shape {tokens.shape}.")
  n = len(tokens) - 1
  return {"inputs": tokens[:-1], "targets": tokens[1:],
          "weights": np.ones(n, np.float32), "prefix": np.zeros(n, np.bool_)}


class LMSegment(grain.transforms.Map):
  """``{'tokens'}`` chunk -> plain LM segment (see :func:`lm_segment`)."""

  def map(self, element):
    return lm_segment(element["tokens"])


def check_segment(segment, seq_len, extra_fields=()):
  """Raises ``ValueError`` unless ``segment`` fits the segment contract."""
  fields = SEGMENT_FIELDS + tuple(extra_fields)
  missing = [k for k in fields if k not in segment]
  if missing:
    raise ValueError(f"segment lacks fields {missing}; has {sorted(segment)}.")
  shapes = {k: np.shape(segment[k]) for k in fields}
  if len(set(shapes.values())) != 1 or len(shapes["inputs"]) != 1:
    raise ValueError(f"segment fields must be 1-D of one length: {shapes}.")
  if not 0 < shapes["inputs"][0] <= seq_len:
    raise ValueError(f"segment length {shapes['inputs'][0]} not in "
                     f"[1, seq_len={seq_len}].")
  return segment


def _rename_packed(row, extra_fields=()):
  """grain's packed row -> the batch format (one row, ``[T]`` fields)."""
  return {k: row[k] for k in extra_fields} | {
      "inputs": row["inputs"].astype(np.int32),
      "targets": row["targets"].astype(np.int32),
      "weights": row["weights"].astype(np.float32),
      "positions": row["inputs_positions"].astype(np.int32),
      "segment_ids": row["inputs_segment_ids"].astype(np.int32),
      "prefix": row["prefix"].astype(np.bool_),
  }


def pack_segments(segments, *, seq_len, num_packing_bins, seed=0,
                  shuffle_bins=True, extra_fields=()):
  """First-fit packs an ``IterDataset`` of segments into rows ``[seq_len]``.

  Args:
    segments: ``IterDataset`` of segment dicts (see the module docstring),
      each at most ``seq_len`` long; fields other than ``SEGMENT_FIELDS`` and
      ``extra_fields`` are dropped.
    seq_len: row length ``T``.
    num_packing_bins: rows filled at once; more bins, less padding.
    seed: seed of the row shuffle inside each group of bins.
    shuffle_bins: shuffle rows within each group (off for evaluation).
    extra_fields: names of further per-token segment fields to carry (e.g.
      UL2's ``denoiser``); packed like ``targets``, 0 on padding.

  Returns:
    ``IterDataset`` of rows in the batch format (``[T]`` arrays).
  """
  extra_fields = tuple(extra_fields)
  segments = segments.map(functools.partial(
      check_segment, seq_len=seq_len, extra_fields=extra_fields))
  lengths = {k: seq_len for k in SEGMENT_FIELDS + extra_fields}
  packed = grain_exp.FirstFitPackIterDataset(
      segments, length_struct=lengths, num_packing_bins=num_packing_bins,
      seed=seed, shuffle_bins=shuffle_bins,
      # Only `inputs` gets *_positions / *_segment_ids; the other fields
      # share its layout because every segment field has the same length.
      meta_features=("targets", "weights", "prefix") + extra_fields)
  return packed.map(functools.partial(_rename_packed,
                                      extra_fields=extra_fields))


def empty_rows(num_rows, seq_len):
  """``num_rows`` padding rows in the batch format (all weights 0)."""
  return {k: np.zeros((num_rows, seq_len), dtype)
          for k, dtype in BATCH_DTYPES.items()}


def pad_batch(batch, batch_size):
  """Pads a ``[b, T]`` batch to ``[batch_size, T]`` with padding rows.

  Every field is padded with zeros (extra fields included), which is what
  :func:`empty_rows` holds.
  """
  b = batch["inputs"].shape[0]
  if b > batch_size:
    raise ValueError(f"batch has {b} rows, more than {batch_size=}.")
  return {k: np.concatenate([v, np.zeros((batch_size - b,) + v.shape[1:],
                                         v.dtype)])
          for k, v in batch.items()}


def pack_and_batch(segments, *, seq_len, batch_size, seed=0,
                   num_packing_bins=None, shuffle_bins=True,
                   drop_remainder=True, extra_fields=()):
  """Packs segments and batches rows to ``[batch_size, seq_len]`` batches.

  With ``drop_remainder=False`` the last batch is padded with padding rows
  (weights 0) to ``batch_size``, so every batch has the same static shape.
  ``extra_fields`` are carried through packing (see :func:`pack_segments`).
  """
  rows = pack_segments(segments, seq_len=seq_len, seed=seed,
                       num_packing_bins=num_packing_bins or batch_size,
                       shuffle_bins=shuffle_bins, extra_fields=extra_fields)
  batches = rows.batch(batch_size, drop_remainder=drop_remainder)
  if drop_remainder:
    return batches
  return batches.map(functools.partial(pad_batch, batch_size=batch_size))
