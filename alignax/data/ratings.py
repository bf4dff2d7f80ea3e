"""Absolute attribute ratings -> packed batches (``data.task='ratings'``).

The stage-1 data of a multi-objective reward model (ArmoRM; HelpSteer-style
records). A record (JSONL line, Parquet row, ...) is::

  {"prompt": "...", "response": "...",
   "attributes": {"helpfulness": 3, "verbosity": 1, ...}}

``prompt`` and ``response`` are strings or chat messages, rendered as the
preference formats render them (:mod:`alignax.data.preference`).
``data.preference.attributes`` names the K attributes the model regresses,
in head order; an attribute the record leaves out, or sets to ``null``, is
masked out of the loss; attributes the config does not name are ignored. A
record that rates none of the K attributes is malformed
(``missing_field``); a rating that is not a finite number is ``wrong_type``
/ ``non_finite``. With ``data.source='embedded'`` the records are those of
the embedded multi-attribute task (:mod:`alignax.data.attribute_task`).

Batches are the packed preference batches of
:mod:`alignax.data.preference_packing` with one response per example
(``K = 1`` slot per group; truncation as for preference records), the
ratings in ``rewards [B, S, K]`` (NaN where missing) and ``valid`` marking
the slots that hold a response.
"""

import copy
import math

from alignax.data import attribute_task
from alignax.data import chat
from alignax.data import pipeline
from alignax.data import preference
from alignax.data import preference_packing as packing
from alignax.data import records as records_lib
from alignax.data import shards
from alignax.data import sources


_BUILTIN = chat.BuiltinChat()


def parse_rating(record, attributes, chat_template=_BUILTIN):
  """``{prompt, response, attributes}`` -> a normalised one-response example
  (``rewards`` holds the K ratings, NaN where missing)."""
  example = preference.parse_binary(
      {"prompt": records_lib.require(record, "prompt"),
       "completion": records_lib.require(record, "response"), "label": True},
      (), chat_template)
  rated = records_lib.require(record, "attributes")
  if not isinstance(rated, dict):
    raise records_lib.MalformedRecord(
        "wrong_type", "field 'attributes' must be an object {name: number}, "
        f"got {type(rated).__name__}")
  scores = [math.nan if rated.get(a) is None else
            records_lib.finite(rated[a], f"attributes.{a}")
            for a in attributes]
  if all(math.isnan(s) for s in scores):
    raise records_lib.MalformedRecord(
        "missing_field", f"field 'attributes' rates none of "
        f"{list(attributes)} (record rates {sorted(rated)})")
  return dict(example, rewards=[scores])


class RatingSource(records_lib.ParsedSource):
  """Random access to parsed rating records ``{index, prompt, responses,
  labels, rewards}`` of a source of raw records, under the malformed-record
  policy of :mod:`alignax.data.records`."""

  def __init__(self, source, attributes, *, skip_malformed=False,
               chat_template=None):
    if not attributes:
      raise ValueError("data.preference.attributes is empty: name the "
                       "attributes to regress")
    self._source, self._attributes = source, tuple(attributes)
    self._chat = chat_template or _BUILTIN
    self._apply_policy(skip_malformed, "rating records")

  def _read(self, raw_index):
    return parse_rating(self._source[raw_index], self._attributes, self._chat)

  def __getitem__(self, index):
    return dict(self._checked(self.raw_index(index)), index=index)

  def __repr__(self):
    return f"RatingSource({self._source!r}, len={len(self)})"


def raw_source(data_cfg, split):
  """The raw record source of ``split`` (``'train'`` or ``'eval'``)."""
  pref = data_cfg.preference
  if data_cfg.source == "embedded":
    return attribute_task.AttributeNames(
        split, "ratings", repeats=pref.task_repeats,
        heldout_fraction=data_cfg.get("heldout_fraction", 0.02))
  cfg = copy.deepcopy(data_cfg)
  with cfg.unlocked():
    cfg.text_field = None  # whole records
    cfg.skip_malformed = False  # RatingSource checks and counts them all
  return sources.build_source(cfg, split)


def record_source(data_cfg, split):
  """The parsed :class:`RatingSource` of ``split``."""
  pref = data_cfg.preference
  return RatingSource(raw_source(data_cfg, split), pref.attributes,
                      skip_malformed=data_cfg.get("skip_malformed", False),
                      chat_template=chat.build_chat(
                          pref.get("chat_template", "")))


def _one_response_config(data_cfg):
  """``data_cfg`` as the preference pipeline's K = 1 list of M = K ratings."""
  cfg = copy.deepcopy(data_cfg)
  with cfg.unlocked():
    cfg.preference.format = "lists"
    cfg.preference.list_size = 1
    cfg.preference.reward_fields = tuple(data_cfg.preference.attributes)
    cfg.preference.reference_cache = ""
  return cfg


def layout(data_cfg):
  """The packing :class:`~alignax.data.preference_packing.Layout`."""
  pref = data_cfg.preference
  return packing.Layout(list_size=1, groups_per_row=int(pref.groups_per_row),
                        num_rewards=len(pref.attributes),
                        shared_prompt=bool(pref.shared_prompt))


def build_ratings_dataset(data_cfg, tokenizer, *, split, seed, seq_len,
                          batch_size, process_index=0, process_count=1,
                          num_epochs=None):
  """Packed rating batches for training (``DATA_TASKS['ratings']``).

  Arguments as ``pipeline.build_lm_dataset``.
  """
  records = record_source(data_cfg, split)
  cfg = _one_response_config(data_cfg)

  def make(shard, num_shards, rows):
    ds = preference.examples(records, cfg, tokenizer, split=split, seed=seed,
                             seq_len=seq_len, process_index=shard,
                             process_count=num_shards, num_epochs=num_epochs)
    return packing.pack_and_batch(ds, layout(data_cfg), seq_len=seq_len,
                                  batch_size=rows, seed=seed)

  ds = shards.batches(make, data_cfg, batch_size=batch_size,
                      process_index=process_index, process_count=process_count)
  return records_lib.with_counts(ds, records)


def build_ratings_eval_batches(data_cfg, tokenizer, *, seq_len, batch_size,
                               process_index=0, process_count=1,
                               num_batches=None):
  """Deterministic held-out rating batches, padded as the preference ones."""
  batches = ()
  records = record_source(data_cfg, "eval")
  if process_index < len(records):  # Else this process's shard is empty.
    ds = preference.examples(records, _one_response_config(data_cfg),
                             tokenizer, split="eval", seed=0, seq_len=seq_len,
                             process_index=process_index,
                             process_count=process_count, shuffle=False,
                             num_epochs=1)
    batches = packing.pack_and_batch(ds, layout(data_cfg), seq_len=seq_len,
                                     batch_size=batch_size, shuffle_bins=False,
                                     drop_remainder=False)
  return pipeline.pad_eval_batches(
      batches, num_batches,
      lambda: packing.empty_rows(layout(data_cfg), batch_size, seq_len))
