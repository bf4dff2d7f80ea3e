"""Pair / N-view data for the contrastive path: records -> padded view batches.

Records (JSONL lines, Parquet rows, ArrayRecord / TFDS records, or the
embedded retrieval task) are either **pairs**
``{"query": str, "positive": str, "negatives": [str, ...]}``
(``negatives`` optional) or **N-view** records ``{"views": [str, ...]}``.
Each example becomes ``V = data.num_views`` texts: a pair gives its query,
its positive and its first ``V - 2`` negatives; an N-view record its first
``V`` views. Pair texts get instruction prefixes (``data.query_prefix`` on
the query, ``data.doc_prefix`` on the others) so one tower serves both
sides; N-view texts are symmetric and get none. A bad record raises
``ValueError`` naming ``file:line`` (JSONL) or ``file:row N`` (Parquet) and
the field, or with ``data.skip_malformed`` is dropped and counted (the policy
of :mod:`alignax.data.records`; an empty query or positive is ``empty``).

A batch is a dict of two ``[B, V, T]`` int32 arrays, padded on the right::

  tokens       [BOS] + ids(prefix + text)[:T - 1 - bos] + [EOS], then 0s
  segment_ids  1 on the text's tokens, 0 on padding

The text always ends with EOS, so ``last`` pooling reads an EOS state.

Optional ``data`` config fields (defaults in ``DATA_DEFAULTS``):
``num_views``, ``query_prefix``, ``doc_prefix``, ``no_duplicates``,
``dedupe_window``, ``eval_queries``, and for the CAFe task ``lm_source``,
``lm_paths``, ``lm_eval_paths``.
"""

import json
import logging

import grain
import grain.experimental as grain_exp
import ml_collections
import numpy as np

from alignax.data import pipeline
from alignax.data import records
from alignax.data import retrieval_task
from alignax.data import shards
from alignax.data import sources

DATA_DEFAULTS = {
    "num_views": 2,  # texts per example: query, positive, V - 2 negatives
    "query_prefix": "query: ",  # prepended to queries (E5-style instruction)
    "doc_prefix": "passage: ",  # prepended to positives and negatives
    "no_duplicates": True,  # no text twice in a batch (false negatives)
    "dedupe_window": 4,  # batches formed at once by the no-duplicates sampler
    "eval_queries": 0,  # held-out queries for retrieval eval (0 = all)
    "lm_source": "embedded",  # CAFe: source of the LM rows
    "lm_paths": (),  # CAFe: LM train files (lm_source jsonl/parquet/...)
    "lm_eval_paths": (),  # CAFe: LM held-out files
}
LM_PREFIX = "lm_"


def option(data_cfg, name):
  """``data_cfg.name``, or its ``DATA_DEFAULTS`` value when unset."""
  return data_cfg.get(name, DATA_DEFAULTS[name])


def _texts(record, field, min_count):
  values = records.require(record, field)
  if not isinstance(values, (list, tuple)) or not all(
      isinstance(v, str) for v in values):
    raise records.MalformedRecord(
        "wrong_type", f"field {field!r} must be a list of strings, got "
        f"{type(values).__name__}")
  if len(values) < min_count:
    raise records.MalformedRecord(
        "too_few", f"field {field!r} has {len(values)} entries; "
        f"data.num_views needs at least {min_count}")
  return [records.check_text(v, f"{field}[{i}]")
          for i, v in enumerate(values[:min_count])]


def record_views(record, num_views):
  """``(texts, is_pair)`` of one record: ``num_views`` strings.

  Raises:
    MalformedRecord: naming the bad field (the caller adds the location).
  """
  if not isinstance(record, dict):
    raise records.MalformedRecord(
        "not_object", f"record is a {type(record).__name__}, not an object")
  if record.get("views") is not None:  # (a null column: a pair row)
    return _texts(record, "views", num_views), False
  for field in ("query", "positive"):
    if field not in record:
      raise records.MalformedRecord(
          "missing_field", f"missing field {field!r} (record has fields "
          f"{sorted(record)}); expected query/positive[/negatives] or views")
    if not isinstance(record[field], str):
      raise records.MalformedRecord(
          "wrong_type", f"field {field!r} must be a non-empty string, got "
          f"{record[field]!r:.40}")
    if not record[field]:
      raise records.MalformedRecord(
          "empty", f"field {field!r} must be a non-empty string, got ''")
    records.check_text(record[field], field)
  negatives = []
  if num_views > 2:
    negatives = _texts(record, "negatives", num_views - 2)
  return [record["query"], record["positive"]] + negatives, True


class PairSource(records.ParsedSource):
  """Pair / N-view records of a raw source, checked when read.

  Errors name the raw source's location (``file:line: field``); with
  ``skip_malformed`` every record is checked once here and bad ones are
  dropped and counted by reason in ``skipped``.

  Args:
    source: a random-access source of whole records (``text_field=None``).
    num_views: texts per example (``data.num_views``).
    skip_malformed: drop and count bad records instead of raising.
  """

  def __init__(self, source, num_views=2, *, skip_malformed=False):
    self._source, self._num_views = source, num_views
    self._apply_policy(skip_malformed, "pair records")

  def _read(self, raw_index):
    record = self._source[raw_index]
    record_views(record, self._num_views)
    return record

  def __repr__(self):
    return f"PairSource({self._source!r}, len={len(self)})"


def build_pair_source(data_cfg, split):
  """Pair records of ``split`` (``'train'`` / ``'eval'``).

  ``data.source='embedded'`` is the docstring -> code task of
  :mod:`alignax.data.retrieval_task` (eval = the corpus's held-out split);
  the file sources of :func:`alignax.data.sources.build_source` read
  ``data.paths`` / ``data.eval_paths`` (or ``data.tfds_name``).
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
  num_views = option(data_cfg, "num_views")
  if data_cfg.source == "embedded":
    if num_views != 2:
      raise ValueError(f"data.num_views={num_views}: the embedded retrieval "
                       "task has no hard negatives; mine them into a JSONL "
                       "file (alignax.retrieval --mine_to) and use "
                       "data.source='jsonl'")
    return retrieval_task.CodeSearchSource(
        "train" if split == "train" else "heldout",
        data_cfg.get("heldout_fraction", 0.02))
  cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  cfg.text_field = None  # whole records
  cfg.skip_malformed = False  # PairSource checks and counts them all
  return PairSource(sources.build_source(cfg, split), num_views,
                    skip_malformed=data_cfg.get("skip_malformed", False))


def tokenize_texts(tokenizer, texts, *, prefix, seq_len, add_bos=False):
  """Right-padded ``(tokens, segment_ids)``, both ``[N, seq_len]`` int32."""
  head = [tokenizer.bos_id] if add_bos else []
  room = seq_len - len(head) - 1
  if room < 1:
    raise ValueError(f"seq_len={seq_len} leaves no room for text")
  ids = tokenizer.encode_batch([prefix + t for t in texts])
  tokens = np.zeros((len(texts), seq_len), np.int32)
  for i, row in enumerate(ids):
    row = head + list(row[:room]) + [tokenizer.eos_id]
    tokens[i, :len(row)] = row
  lengths = [min(len(r), room) + len(head) + 1 for r in ids]
  segment_ids = (np.arange(seq_len) < np.asarray(lengths)[:, None])
  return tokens, segment_ids.astype(np.int32)


class TokenizeViews(grain.transforms.Map):
  """Record -> ``{'tokens', 'segment_ids': [V, T], 'texts': tuple}``."""

  def __init__(self, tokenizer, data_cfg, seq_len):
    self._tokenizer = tokenizer
    self._num_views = option(data_cfg, "num_views")
    self._prefixes = (option(data_cfg, "query_prefix"),
                      option(data_cfg, "doc_prefix"))
    self._seq_len = seq_len
    self._add_bos = data_cfg.get("add_bos", False)

  def map(self, element):
    texts, is_pair = record_views(element, self._num_views)
    query_prefix, doc_prefix = self._prefixes if is_pair else ("", "")
    rows = [tokenize_texts(self._tokenizer, [t], seq_len=self._seq_len,
                           prefix=query_prefix if i == 0 else doc_prefix,
                           add_bos=self._add_bos) for i, t in enumerate(texts)]
    return {"tokens": np.concatenate([r[0] for r in rows]),  # [V, T]
            "segment_ids": np.concatenate([r[1] for r in rows]),
            "texts": tuple(texts)}


def stack_examples(examples):
  """Tokenized examples -> ``{'tokens', 'segment_ids'}``, ``[B, V, T]``."""
  return {k: np.stack([e[k] for e in examples])
          for k in ("tokens", "segment_ids")}


class NoDuplicateBatches(grain_exp.FlatMapTransform):
  """Window of examples -> full batches in which no text appears twice.

  Like sentence-transformers' ``NoDuplicatesBatchSampler``: a duplicate
  text in a batch is a false in-batch negative. Examples are placed
  greedily, in order, into the first of ``window // batch_size`` batches
  that has room and none of their texts; examples that fit nowhere, and
  batches left incomplete, are dropped (the next epoch reshuffles them).
  """

  def __init__(self, batch_size, num_batches):
    self._batch_size = batch_size
    self._num_batches = num_batches
    self.max_fan_out = num_batches

  def flat_map(self, element):
    batches, seen = [], []
    for example in element:
      texts = set(example["texts"])
      if len(texts) < len(example["texts"]):
        continue  # the example repeats a text of its own
      for batch, used in zip(batches, seen):
        if len(batch) < self._batch_size and not used & texts:
          batch.append(example)
          used.update(texts)
          break
      else:
        if len(batches) < self._num_batches:
          batches.append([example])
          seen.append(set(texts))
    return [stack_examples(b) for b in batches if len(b) == self._batch_size]


def build_pairs_dataset(data_cfg, tokenizer, *, split, seed, seq_len,
                        batch_size, process_index=0, process_count=1,
                        num_epochs=None):
  """Shuffled, repeated ``[batch_size, V, seq_len]`` view batches.

  Arguments as :func:`alignax.data.pipeline.build_lm_dataset`; with
  ``data.no_duplicates`` batches come from :class:`NoDuplicateBatches` over
  windows of ``data.dedupe_window`` batches. The dataset's ``skipped`` holds
  the malformed-record counts (:func:`alignax.data.records.skip_counts`).
  """
  source = build_pair_source(data_cfg, split)

  def make(shard, num_shards, rows):
    ds = pipeline.shard_and_shuffle(source, seed=seed, process_index=shard,
                                    process_count=num_shards,
                                    num_epochs=num_epochs)
    ds = ds.map(TokenizeViews(tokenizer, data_cfg, seq_len))
    ds = ds.to_iter_dataset(pipeline.read_options(data_cfg))
    if not option(data_cfg, "no_duplicates"):
      return ds.batch(rows, drop_remainder=True, batch_fn=stack_examples)
    window = option(data_cfg, "dedupe_window")
    windows = ds.batch(window * rows, drop_remainder=True, batch_fn=list)
    return grain_exp.FlatMapIterDataset(windows,
                                        NoDuplicateBatches(rows, window))

  ds = shards.batches(make, data_cfg, batch_size=batch_size,
                      process_index=process_index, process_count=process_count)
  return records.with_counts(ds, source)


def build_pair_eval_batches(data_cfg, tokenizer, *, seq_len, batch_size,
                            process_index=0, process_count=1,
                            num_batches=None):
  """Full held-out batches in order (no shuffle, no padding rows).

  Padding rows would be in-batch negatives, so the remainder is dropped;
  every process returns the same number of batches (that of the smallest
  shard, capped at ``num_batches``).
  """
  source = build_pair_source(data_cfg, "eval")
  available = (len(source) // process_count) // batch_size
  count = available if num_batches is None else min(num_batches, available)
  if count == 0:
    raise ValueError(f"the eval split has {len(source)} examples: too few "
                     f"for one batch of {batch_size} per process")
  ds = pipeline.shard_and_shuffle(source, seed=0, process_index=process_index,
                                  process_count=process_count, shuffle=False,
                                  num_epochs=1)
  ds = ds.map(TokenizeViews(tokenizer, data_cfg, seq_len))
  return [stack_examples([ds[i] for i in range(b * batch_size,
                                               (b + 1) * batch_size)])
          for b in range(count)]


def _lm_config(data_cfg):
  """The ``data`` config of CAFe's LM rows (``lm_source``/``lm_*paths``)."""
  cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  cfg.source = option(data_cfg, "lm_source")
  cfg.paths = tuple(option(data_cfg, "lm_paths"))
  cfg.eval_paths = tuple(option(data_cfg, "lm_eval_paths"))
  return cfg


def _with_lm(pair_batch, lm_batch):
  return dict(pair_batch, **{LM_PREFIX + k: v for k, v in lm_batch.items()})


def _zipped_with_lm(both):
  return _with_lm(*both)


def build_cafe_dataset(data_cfg, tokenizer, *, split, seed, seq_len,
                       batch_size, process_index=0, process_count=1,
                       num_epochs=None):
  """Pair batches zipped with packed LM batches (fields prefixed ``lm_``)."""
  kwargs = dict(split=split, seed=seed, seq_len=seq_len, batch_size=batch_size,
                process_index=process_index, process_count=process_count,
                num_epochs=num_epochs)
  pairs = build_pairs_dataset(data_cfg, tokenizer, **kwargs)
  lm = pipeline.build_lm_dataset(_lm_config(data_cfg), tokenizer, **kwargs)
  zipped = grain_exp.ZipIterDataset([pairs, lm], strict=False)
  return records.with_counts(zipped.map(_zipped_with_lm), pairs, lm)


def build_cafe_eval_batches(data_cfg, tokenizer, *, seq_len, batch_size,
                            process_index=0, process_count=1,
                            num_batches=None):
  """Held-out pair batches each with a held-out LM batch (``lm_*``)."""
  kwargs = dict(seq_len=seq_len, batch_size=batch_size,
                process_index=process_index, process_count=process_count)
  pairs = build_pair_eval_batches(data_cfg, tokenizer, num_batches=num_batches,
                                  **kwargs)
  lm = pipeline.build_eval_batches(_lm_config(data_cfg), tokenizer,
                                   num_batches=len(pairs), **kwargs)
  return [_with_lm(p, b) for p, b in zip(pairs, lm)]


def retrieval_set(data_cfg, split="eval", max_queries=0):
  """``(queries, corpus, relevant, is_pair)`` for retrieval evaluation.

  Queries are the records' first texts; the corpus is every other text
  (positives and negatives, each once); ``relevant[i]`` lists the corpus
  indices of query ``i``'s positive. ``max_queries`` caps the queries (0 =
  all); the corpus keeps every record's documents.
  """
  source = build_pair_source(data_cfg, split)
  queries, corpus, relevant, index = [], [], [], {}
  is_pair = True
  limit = max_queries or len(source)
  for i in range(len(source)):
    texts, is_pair = record_views(source[i], option(data_cfg, "num_views"))
    ids = []
    for text in texts[1:]:
      if text not in index:
        index[text] = len(corpus)
        corpus.append(text)
      ids.append(index[text])
    if i < limit:
      queries.append(texts[0])
      relevant.append(ids[:1])
  return queries, corpus, relevant, is_pair


def select_hard_negatives(scores, ids, positives, *, num_negatives,
                          skip_top=0, margin=None):
  """Picks mined negatives from retrieval results (host NumPy).

  Follows sentence-transformers' ``mine_hard_negatives``: candidates are the
  ranked documents minus the positive; the first ``skip_top`` are skipped
  (likely unlabeled positives); with ``margin`` a candidate must score at
  most ``positive_score - margin``.

  Args:
    scores: ``[Q, K]`` similarities of the top-K documents, descending.
    ids: ``[Q, K]`` their corpus indices.
    positives: ``[Q]`` corpus index of each query's positive.
    num_negatives: negatives per query.
    skip_top: candidates skipped after removing the positive.
    margin: absolute margin below the positive's score, or ``None``.

  Returns:
    ``[Q, num_negatives]`` corpus indices, ``-1`` where too few qualified.
  """
  scores, ids = np.asarray(scores), np.asarray(ids)
  positives = np.asarray(positives)
  out = np.full((len(ids), num_negatives), -1, np.int64)
  for q, (row_scores, row_ids) in enumerate(zip(scores, ids)):
    keep = row_ids != positives[q]
    if margin is not None:
      hit = row_ids == positives[q]
      if hit.any():
        keep &= row_scores <= row_scores[hit][0] - margin
    chosen = row_ids[keep][skip_top:skip_top + num_negatives]
    out[q, :len(chosen)] = chosen
  return out


def write_with_negatives(records, negatives, corpus, path):
  """Writes ``records`` plus their mined ``negatives`` as JSONL pairs.

  ``negatives`` is :func:`select_hard_negatives`' output over ``corpus``;
  records with a ``-1`` are left out. Returns the number written.
  """
  written = 0
  with open(path, "w", encoding="utf-8") as f:
    for record, row in zip(records, negatives):
      if (row < 0).any():
        continue
      out = {"query": record["query"], "positive": record["positive"],
             "negatives": [corpus[int(j)] for j in row]}
      f.write(json.dumps(out) + "\n")
      written += 1
  if written < len(records):
    logging.warning("%d of %d records had too few negatives and were left "
                    "out", len(records) - written, len(records))
  return written
