"""grain pipelines: records -> tokens -> segments -> packed LM batches.

The stages are small and separate so other paths reuse them; UL2 swaps only
the "tokens -> segment" stage (any map that returns a segment, see
``alignax.data.packing``, e.g. with weights 0 on a bidirectional prefix)::

  ds = shard_and_shuffle(source, seed=seed, process_index=p, process_count=n)
  ds = ds.map(Tokenize(tokenizer)).map(lambda e: e["tokens"])
  ds = ds.map_with_index(ul2.UL2Map(...))   # tokens -> one segment
  ds = ds.to_iter_dataset(read_options(data_cfg))
  ds = packing.pack_and_batch(ds, seq_len=T, batch_size=B, seed=seed)

Iterators are grain ``DatasetIterator``s: ``get_state()`` is a JSON-able dict
and ``set_state()`` resumes at the same batch. Save it with orbax::

  mngr.save(step, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointSave(iterator)))
  mngr.restore(step, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(iterator)))
"""

import itertools

import grain
import grain.experimental as grain_exp
import numpy as np

from alignax.data import packing
from alignax.data import records
from alignax.data import shards
from alignax.data import sources


class Tokenize(grain.transforms.Map):
  """``{'text'}`` -> ``{'tokens': int32 [n]}``: [BOS] + text ids + EOS."""

  def __init__(self, tokenizer, *, add_bos=False, add_eos=True):
    self._tokenizer = tokenizer
    self._prefix = [tokenizer.bos_id] if add_bos else []
    self._suffix = [tokenizer.eos_id] if add_eos else []

  def map(self, element):
    ids = self._tokenizer.encode(element["text"])
    return {"tokens": np.asarray(self._prefix + ids + self._suffix, np.int32)}


def read_options(data_cfg):
  """Reader threads / prefetch from ``data_cfg`` (``num_threads``,
  ``prefetch_buffer_size``), defaulting to 8 / 128."""
  return grain.ReadOptions(
      num_threads=data_cfg.get("num_threads", 8),
      prefetch_buffer_size=data_cfg.get("prefetch_buffer_size", 128))


def shard_and_shuffle(source, *, seed, process_index=0, process_count=1,
                      shuffle=True, num_epochs=None):
  """This process's records, shuffled per epoch and repeated.

  Args:
    source: a random-access source.
    seed: shuffle seed in ``[0, 2**32)``; epoch ``e`` uses ``seed + e``.
    process_index: this process's index; it reads records
      ``process_index, process_index + process_count, ...``.
    process_count: number of processes reading disjoint shards.
    shuffle: whether to shuffle (within this process's shard).
    num_epochs: passes over the shard; ``None`` repeats forever.

  Returns:
    a ``grain.MapDataset`` of records.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got "
                     f"{process_index=}, {process_count=}.")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f"Shard {process_index}/{process_count} of {source!r} "
                     "is empty: fewer records than processes.")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  return ds.repeat(num_epochs) if num_epochs != 1 else ds


def lm_segments(tokens_ds, seq_len):
  """``IterDataset`` of ``{'tokens'}`` -> plain LM segments of <= seq_len."""
  chunks = grain_exp.FlatMapIterDataset(
      tokens_ds, packing.ChunkTokens(seq_len + 1, overlap=1))
  return chunks.map(packing.LMSegment())


def tokenized_records(source, data_cfg, tokenizer, *, seed, process_index=0,
                      process_count=1, shuffle=True, num_epochs=None):
  """This process's records as ``IterDataset`` of ``{'tokens': int32 [n]}``.

  Sharded, shuffled and repeated as in :func:`shard_and_shuffle`; tokens are
  ``[BOS if data_cfg.add_bos] + ids + [EOS]``; reader threads as in
  :func:`read_options`.
  """
  ds = shard_and_shuffle(source, seed=seed, process_index=process_index,
                         process_count=process_count, shuffle=shuffle,
                         num_epochs=num_epochs)
  ds = ds.map(Tokenize(tokenizer, add_bos=data_cfg.get("add_bos", False)))
  return ds.to_iter_dataset(read_options(data_cfg))


def build_lm_dataset(data_cfg, tokenizer, *, split, seed, seq_len,
                     batch_size, process_index=0, process_count=1,
                     num_epochs=None):
  """Packed next-token batches for training.

  Args:
    data_cfg: the ``data`` config (see ``sources.build_source``), plus
      optional ``add_bos`` (default False), ``packing_bins`` (default
      ``batch_size``), ``num_threads``, ``prefetch_buffer_size``.
    tokenizer: an ``alignax.data.tokenizer.Tokenizer``.
    split: ``'train'`` or ``'eval'``.
    seed: seed of the record shuffle and of the row order.
    seq_len: row length ``T``.
    batch_size: rows per batch on this process.
    process_index: this process's shard.
    process_count: number of shards; with ``data_cfg.num_shards`` the
      records are split into that many fixed shards instead, and the global
      batch no longer depends on the process count (see
      :mod:`alignax.data.shards`).
    num_epochs: passes over the shard; ``None`` repeats forever.

  Returns:
    a ``grain.IterDataset`` of batch dicts of ``[batch_size, seq_len]``
    arrays (see ``alignax.data.packing``); incomplete last batches are
    dropped. Its ``skipped`` holds the malformed-record counts
    (:func:`alignax.data.records.skip_counts`).
  """
  source = sources.build_source(data_cfg, split)

  def make(shard, num_shards, rows):
    ds = tokenized_records(source, data_cfg, tokenizer, seed=seed,
                           process_index=shard, process_count=num_shards,
                           shuffle=True, num_epochs=num_epochs)
    return packing.pack_and_batch(
        lm_segments(ds, seq_len), seq_len=seq_len, batch_size=rows,
        seed=seed, num_packing_bins=data_cfg.get("packing_bins") or None)

  ds = shards.batches(make, data_cfg, batch_size=batch_size,
                      process_index=process_index, process_count=process_count)
  return records.with_counts(ds, source)


def make_iterator(dataset, *, prefetch_buffer_size=0):
  """A checkpointable iterator (``get_state`` / ``set_state``) over batches.

  ``prefetch_buffer_size > 0`` prepares that many batches in a background
  thread; the state still points at the next batch the caller will see.
  """
  if prefetch_buffer_size:
    dataset = grain_exp.ThreadPrefetchIterDataset(
        dataset, prefetch_buffer_size=prefetch_buffer_size)
  return iter(dataset)


def build_eval_batches(data_cfg, tokenizer, *, seq_len, batch_size,
                       process_index=0, process_count=1, num_batches=None):
  """Deterministic batches over this process's share of the eval split.

  No shuffle, no repeat; the last batch is padded with weight-0 rows instead
  of dropped. Processes may hold different numbers of batches: pass the same
  ``num_batches`` everywhere to pad (with all-padding batches) or truncate
  to a common count, so collective eval steps stay in lockstep.

  Returns:
    a list of batch dicts of ``[batch_size, seq_len]`` arrays.
  """
  source = sources.build_source(data_cfg, "eval")
  batches = ()
  if process_index < len(source):  # Else this process's shard is empty.
    ds = tokenized_records(source, data_cfg, tokenizer, seed=0,
                           process_index=process_index,
                           process_count=process_count, shuffle=False,
                           num_epochs=1)
    batches = packing.pack_and_batch(
        lm_segments(ds, seq_len), seq_len=seq_len, batch_size=batch_size,
        num_packing_bins=data_cfg.get("packing_bins") or None,
        shuffle_bins=False, drop_remainder=False)
  return pad_eval_batches(batches, num_batches,
                          lambda: packing.empty_rows(batch_size, seq_len))


def pad_eval_batches(batches, num_batches, empty_batch):
  """Held-out ``batches`` cut or padded to ``num_batches``.

  The one padding rule of every task's eval batches, so that collective eval
  steps stay in lockstep across processes holding different shares.

  Args:
    batches: an iterable of batch dicts, read only as far as needed.
    num_batches: the count to return; ``None`` keeps them all.
    empty_batch: a no-argument callable making one all-padding batch
      (weight 0 / no valid example).

  Returns:
    a list of exactly ``num_batches`` batches (all of them for ``None``).
  """
  batches = list(itertools.islice(batches, num_batches))
  if num_batches is not None:
    batches += [empty_batch() for _ in range(num_batches - len(batches))]
  return batches
