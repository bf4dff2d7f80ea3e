"""Packed preference batches: several pairs or lists per row.

An *example* (one prompt and its K responses, see
:mod:`alignax.data.preference`) becomes a *group* of segments that always
lands in one row. Two layouts:

* separate (``shared_prompt=False``): response k is the segment
  ``prompt + response_k`` (shifted: inputs ``[:-1]``, targets ``[1:]``), as
  in the padded layout of TRL, only packed;
* shared prompt (``shared_prompt=True``): the prompt is encoded once, as its
  own segment ``prompt[:-1]``; response k is the segment
  ``[prompt[-1]] + response_k[:-1]`` predicting ``response_k``, with
  positions continuing after the prompt and ``attend_to`` pointing at the
  prompt segment, so that its attention sees exactly ``prompt + response_k``
  (see ``alignax.models.layers.make_attention_mask``). The prompt costs
  ``n - 1`` tokens once instead of ``K (n - 1)``.

Either way the loss weights are 1 exactly on the response tokens, so the
sequence log-probabilities equal those of the padded layout.

A packed batch is a dict of NumPy arrays; with ``S = groups_per_row * K``
response slots per row (slot ``(g - 1) K + k`` is response k of the row's
g-th group)::

  inputs, targets      int32    [B, T]
  weights              float32  [B, T]  1 on response tokens
  positions            int32    [B, T]
  segment_ids          int32    [B, T]  0 = padding
  prefix               bool     [B, T]  all False (causal)
  attend_to            int32    [B, T]  prompt segment of a response, else 0
  slot                 int32    [B, T]  response slot of each token
  labels               float32  [B, S]  preference / score of each response
  valid                bool     [B, S]  slot holds a response
  ref_logps            float32  [B, S]  cached reference log-probs (or 0)
  index                int32    [B, S]  record index of the slot's example
  rewards              float32  [B, S, M]  MODPO scores of other objectives
"""

import dataclasses
import functools

import grain.experimental as grain_exp
import numpy as np

from alignax.data import packing as lm_packing

TOKEN_FIELDS = ("inputs", "targets", "weights", "positions", "local",
                "attends", "prefix")
LIST_FIELDS = ("labels", "valid", "ref_logps", "index", "rewards")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static shape of the packed batches.

  Attributes:
    list_size: K response slots per example.
    groups_per_row: G, the most examples one row holds.
    num_rewards: M, MODPO scores per response (0 = none).
    shared_prompt: encode each prompt once (see the module docstring).
  """
  list_size: int
  groups_per_row: int
  num_rewards: int = 0
  shared_prompt: bool = True

  @property
  def num_slots(self):
    return self.list_size * self.groups_per_row


def _segment(inputs, targets, weights, positions, local, attends):
  n = len(inputs)
  return {"inputs": np.asarray(inputs, np.int32),
          "targets": np.asarray(targets, np.int32),
          "weights": np.asarray(weights, np.float32),
          "positions": np.asarray(positions, np.int32),
          "local": np.full(n, local, np.int32),
          "attends": np.full(n, attends, np.int32),
          "prefix": np.zeros(n, np.bool_)}


def group_segments(prompt, responses, *, shared_prompt):
  """Token fields of one group: a list of segment dicts, in row order.

  ``local`` is 0 for the shared prompt segment and ``k + 1`` for response
  ``k``; ``attends`` is 1 where a response reads the shared prompt.
  """
  n = len(prompt)
  segments = []
  if shared_prompt and n > 1:
    segments.append(_segment(prompt[:-1], prompt[1:], np.zeros(n - 1),
                             np.arange(n - 1), 0, 0))
  for k, response in enumerate(responses):
    m = len(response)
    if shared_prompt:
      segments.append(_segment(
          [prompt[-1]] + list(response[:-1]), response, np.ones(m),
          np.arange(n - 1, n - 1 + m), k + 1, int(n > 1)))
    else:
      seq = list(prompt) + list(response)
      segments.append(_segment(
          seq[:-1], seq[1:], np.concatenate([np.zeros(n - 1), np.ones(m)]),
          np.arange(n + m - 1), k + 1, 0))
  return segments


class ToGroup:
  """Tokenized example -> one packable element (token and list fields)."""

  def __init__(self, layout: Layout):
    self._layout = layout

  def __call__(self, example):
    segments = group_segments(example["prompt"], example["responses"],
                              shared_prompt=self._layout.shared_prompt)
    out = {f: np.concatenate([s[f] for s in segments]) for f in TOKEN_FIELDS}
    k = self._layout.list_size
    out.update(
        labels=np.asarray(example["labels"], np.float32),
        valid=np.asarray(example["valid"], np.bool_),
        ref_logps=np.asarray(example["ref_logps"], np.float32),
        index=np.full(k, example["index"], np.int32),
        rewards=np.asarray(example["rewards"], np.float32).reshape(
            k, self._layout.num_rewards))
    return out


def finish_row(row, layout: Layout):
  """grain's packed row -> the batch format (see the module docstring)."""
  k = layout.list_size
  group = row["inputs_segment_ids"].astype(np.int32)  # 1-based, 0 = pad
  local, used = row["local"], group > 0
  segment_ids = np.where(used, (group - 1) * (k + 1) + local + 1, 0)
  attend_to = np.where(used & (row["attends"] > 0), (group - 1) * (k + 1) + 1,
                       0)
  slot = np.where(used & (local > 0), (group - 1) * k + local - 1, 0)
  out = {
      "inputs": row["inputs"], "targets": row["targets"],
      "weights": np.where(used, row["weights"], 0).astype(np.float32),
      "positions": row["positions"], "segment_ids": segment_ids,
      "prefix": row["prefix"].astype(np.bool_), "attend_to": attend_to,
      "slot": slot,
  }
  out.update({f: row[f] for f in LIST_FIELDS})
  for f in ("inputs", "targets", "positions", "segment_ids", "attend_to",
            "slot", "index"):
    out[f] = out[f].astype(np.int32)
  return out


def _check_fits(element, seq_len, layout):
  if len(element["inputs"]) > seq_len:
    raise ValueError(f"a group of {len(element['inputs'])} tokens does not "
                     f"fit seq_len={seq_len}")
  if element["labels"].shape != (layout.list_size,):
    raise ValueError(f"labels shape {element['labels'].shape} != "
                     f"({layout.list_size},)")
  return element


def pack_rows(examples, layout: Layout, *, seq_len, num_packing_bins, seed=0,
              shuffle_bins=True):
  """First-fit packs an ``IterDataset`` of tokenized examples into rows."""
  groups = examples.map(ToGroup(layout)).map(functools.partial(
      _check_fits, seq_len=seq_len, layout=layout))
  lengths = {f: seq_len for f in TOKEN_FIELDS}
  lengths.update({f: layout.num_slots for f in LIST_FIELDS})
  packed = grain_exp.FirstFitPackIterDataset(
      groups, length_struct=lengths, num_packing_bins=num_packing_bins,
      seed=seed, shuffle_bins=shuffle_bins,
      # Segment ids of `inputs` number the groups of a row; `labels` needs
      # none: group g always fills list slots [(g - 1) K, g K).
      meta_features=tuple(f for f in TOKEN_FIELDS + LIST_FIELDS
                          if f != "inputs"))
  return packed.map(functools.partial(finish_row, layout=layout))


def pack_and_batch(examples, layout: Layout, *, seq_len, batch_size, seed=0,
                   num_packing_bins=None, shuffle_bins=True,
                   drop_remainder=True):
  """Packed rows batched to ``[batch_size, ...]``; a short last batch is
  padded with empty rows unless dropped."""
  rows = pack_rows(examples, layout, seq_len=seq_len, seed=seed,
                   num_packing_bins=num_packing_bins or batch_size,
                   shuffle_bins=shuffle_bins)
  batches = rows.batch(batch_size, drop_remainder=drop_remainder)
  if drop_remainder:
    return batches
  return batches.map(functools.partial(lm_packing.pad_batch,
                                       batch_size=batch_size))


def empty_rows(layout: Layout, num_rows, seq_len):
  """``num_rows`` rows without any example (every slot invalid)."""
  s = layout.num_slots
  out = {f: np.zeros((num_rows, seq_len), np.int32)
         for f in ("inputs", "targets", "positions", "segment_ids",
                   "attend_to", "slot")}
  out.update(weights=np.zeros((num_rows, seq_len), np.float32),
             prefix=np.zeros((num_rows, seq_len), np.bool_),
             labels=np.zeros((num_rows, s), np.float32),
             valid=np.zeros((num_rows, s), np.bool_),
             ref_logps=np.zeros((num_rows, s), np.float32),
             index=np.zeros((num_rows, s), np.int32),
             rewards=np.zeros((num_rows, s, layout.num_rewards), np.float32))
  return out
