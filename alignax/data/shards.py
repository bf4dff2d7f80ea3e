"""Process-count-independent batches: the global batch as fixed record shards.

By default every process reads the records ``p, p + P, ...`` and packs its
own ``B / P`` rows, so the global batch at step ``s`` depends on the number
of processes ``P``. With ``config.data.num_shards = G`` it does not: the
records are split into ``G`` shards (``g, g + G, ...``), each shard is its own
pipeline making ``B / G`` rows per step, and the global batch is shards
``0 .. G-1`` stacked in order. Process ``p`` runs shards
``p G/P .. (p+1) G/P - 1``, so it holds rows ``p B/P .. (p+1) B/P - 1`` of
the same global batch whatever ``P`` is (``P`` must divide ``G``, and ``G``
the global batch). No record is read twice.

The iterator's state is keyed by shard, not by process::

  {"num_shards": G, "shards": {"0": state_0, "1": state_1, ...}}

so a checkpoint written by ``P`` processes resumes with any ``P'`` dividing
``G``: merge the ``"shards"`` of every process's saved state and pass the
merged dict to each process's ``set_state`` (each takes its own shards).
"""

import grain
import numpy as np


def stack_rows(batches):
  """Batch dicts with the same keys -> one batch, rows stacked in order."""
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


class ShardedBatches(grain.IterDataset):
  """This process's shards' batches, stacked: one batch per step.

  Args:
    shards: ``{shard index: IterDataset of batch dicts}`` of this process,
      in shard order.
    num_shards: ``G``, the shards of the global batch.
  """

  def __init__(self, shards, num_shards):
    super().__init__(list(shards.values()))
    self._ids, self._num_shards = list(shards), num_shards

  def __iter__(self):
    return _ShardedIterator(self._parents, self._ids, self._num_shards)

  def __str__(self):
    return f"ShardedBatches(shards={self._ids} of {self._num_shards})"


class _ShardedIterator(grain.DatasetIterator):
  """Iterator of :class:`ShardedBatches`; its state is keyed by shard."""

  def __init__(self, parents, ids, num_shards):
    super().__init__([p.__iter__() for p in parents])
    self._ids, self._num_shards = ids, num_shards

  def __next__(self):
    return stack_rows([next(it) for it in self._parents])

  def get_state(self):
    return {"num_shards": self._num_shards,
            "shards": {str(g): it.get_state()
                       for g, it in zip(self._ids, self._parents)}}

  def set_state(self, state):
    if state.get("num_shards") != self._num_shards:
      raise ValueError(
          f"the data state has {state.get('num_shards')} shards, the run "
          f"config.data.num_shards={self._num_shards}: keep num_shards fixed "
          "across resumes")
    missing = [g for g in self._ids if str(g) not in state["shards"]]
    if missing:
      raise ValueError(f"the data state lacks shards {missing}: merge the "
                       "saved states of all processes before set_state")
    for g, it in zip(self._ids, self._parents):
      it.set_state(state["shards"][str(g)])


def merge_states(states):
  """One iterator state holding every shard of several processes' states.

  Shard-keyed parts (:class:`ShardedBatches`) are merged, also inside the
  states of other grain iterators (a zip of two sharded datasets); any other
  value is taken from the first state.
  """
  first = states[0]
  if isinstance(first, dict) and {"num_shards", "shards"} <= set(first):
    if any(s["num_shards"] != first["num_shards"] for s in states):
      raise ValueError("data states of different num_shards")
    merged = {}
    for state in states:
      merged.update(state["shards"])
    return dict(first, shards=merged)
  if isinstance(first, dict):
    return {k: merge_states([s[k] for s in states]) for k in first}
  if isinstance(first, (list, tuple)):
    return [merge_states(list(parts)) for parts in zip(*states)]
  return first


def batches(make, data_cfg, *, batch_size, process_index, process_count):
  """This process's batches, by process (default) or by fixed shards.

  Args:
    make: ``make(shard_index, shard_count, rows)`` -> an ``IterDataset`` of
      ``rows``-row batches of records ``shard_index::shard_count``.
    data_cfg: the ``data`` config; ``num_shards`` (default 0 = one shard
      per process, the batches then depend on the process count).
    batch_size: rows per batch of this process, ``B / P``.
    process_index: ``p``.
    process_count: ``P``.

  Returns:
    ``make(p, P, B / P)`` without ``num_shards``; else a
    :class:`ShardedBatches` of shards ``p G/P .. (p+1) G/P - 1``.
  """
  num_shards = int(data_cfg.get("num_shards", 0) or 0)
  if not num_shards:
    return make(process_index, process_count, batch_size)
  if num_shards % process_count:
    raise ValueError(f"config.data.num_shards={num_shards} is not a multiple "
                     f"of the process count {process_count}")
  local = num_shards // process_count
  if batch_size % local:
    raise ValueError(f"config.data.num_shards={num_shards} does not divide "
                     f"the global batch {batch_size * process_count}")
  first = process_index * local
  return ShardedBatches({g: make(g, num_shards, batch_size // local)
                         for g in range(first, first + local)}, num_shards)
