"""Exact retrieval on device and IR metrics: the held-out evaluator of the loop.

:func:`retrieve` scores every query against every document (brute force,
exact) and keeps the top ``k`` with ``jax.lax.top_k``; with a mesh the
corpus is sharded over the batch axes, each device keeps the top ``k`` of
its shard and one more ``top_k`` over the gathered candidates gives the
global result. :func:`ranking_metrics` follows sentence-transformers'
``InformationRetrievalEvaluator`` (binary relevance):

* Recall@k: relevant documents in the top k / relevant documents;
* MRR@k: 1 / rank of the first relevant document in the top k, else 0;
* nDCG@k: :math:`\\sum_{r \\le k} rel_r / \\log_2(r + 1)` over the ideal
  ranking's value with ``min(#relevant, k)`` hits;
* MAP@k: sum of precision@r at each relevant rank ``r <= k``, divided by
  ``min(k, #relevant)``.

The command that evaluates a checkpoint on its own, or mines hard negatives
with it, is :mod:`alignax.mine`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from alignax import sharding as shd
from alignax.data import pairs

RECALL_AT, MRR_AT, NDCG_AT, MAP_AT = (1, 5, 10), (10,), (10,), (100,)


def retrieve(queries, corpus, *, k, mesh=None, axis_name=shd.BATCH_AXES,
             num_valid=None):
  """Top-``k`` documents of each query by dot product, exactly.

  Args:
    queries: ``[Q, D]`` embeddings (replicated).
    corpus: ``[C, D]`` embeddings; with ``mesh`` sharded (or to be sharded)
      over ``axis_name``; padded internally to a multiple of its ways.
    k: results per query, ``1 <= k <= C``.
    mesh: device mesh, or ``None`` for one device / automatic placement.
    axis_name: mesh axes the corpus rows are split over.
    num_valid: only the first ``num_valid`` corpus rows are documents (the
      rest pads a sharded corpus); default all.

  Returns:
    ``(scores [Q, k], ids [Q, k])`` in descending score order.
  """
  queries = jnp.asarray(queries, jnp.float32)
  corpus = jnp.asarray(corpus, jnp.float32)
  c = corpus.shape[0] if num_valid is None else num_valid
  if not 1 <= k <= c or queries.shape[-1] != corpus.shape[-1]:
    raise ValueError(f"need 1 <= k <= C and one width D, got k={k}, queries "
                     f"{queries.shape}, corpus {corpus.shape}")
  if mesh is None:
    scores = queries @ corpus[:c].T  # [Q, C]
    return jax.lax.top_k(scores, k)
  axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  ways = math.prod(mesh.shape[a] for a in axes)
  corpus = jnp.pad(corpus, ((0, (-corpus.shape[0]) % ways), (0, 0)))
  local_k = min(k, corpus.shape[0] // ways)

  def local(q, docs):  # q: [Q, D]; docs: [C / ways, D]
    offset = jax.lax.axis_index(axes) * docs.shape[0]
    ids = offset + jnp.arange(docs.shape[0])
    scores = jnp.where(ids < c, q @ docs.T, -jnp.inf)  # [Q, C / ways]
    top, idx = jax.lax.top_k(scores, local_k)
    top = jax.lax.all_gather(top, axes, axis=1, tiled=True)  # [Q, ways * k']
    idx = jax.lax.all_gather(idx + offset, axes, axis=1, tiled=True)
    best, j = jax.lax.top_k(top, k)
    return best, jnp.take_along_axis(idx, j, axis=1)

  # The final top_k runs on identical gathered candidates on every device, so
  # the outputs are replicated (which the type check cannot infer).
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes, None)),
                       out_specs=(P(), P()), check_vma=False)(queries, corpus)


def ranking_metrics(ids, relevant, *, recall_at=RECALL_AT, mrr_at=MRR_AT,
                    ndcg_at=NDCG_AT, map_at=MAP_AT):
  """Per-query IR metrics of ranked results (sentence-transformers' defs).

  Args:
    ids: ``[Q, K]`` ranked corpus indices; metrics at ``k > K`` see only K.
    relevant: ``[Q, R]`` corpus indices of each query's relevant documents,
      padded with ``-1``; every query needs at least one.

  Returns:
    ``{'recall@k', 'mrr@k', 'ndcg@k', 'map@k': [Q] float32}``.
  """
  ids, relevant = jnp.asarray(ids), jnp.asarray(relevant)
  if ids.ndim != 2 or relevant.ndim != 2 or ids.shape[0] != relevant.shape[0]:
    raise ValueError(f"ids [Q, K] and relevant [Q, R] need one Q, got "
                     f"{ids.shape} and {relevant.shape}")
  hits = jnp.any((ids[:, :, None] == relevant[:, None, :])
                 & (relevant[:, None, :] >= 0), axis=-1).astype(jnp.float32)
  num_rel = jnp.sum(relevant >= 0, axis=-1).astype(jnp.float32)  # [Q]
  rank = jnp.arange(1, ids.shape[1] + 1, dtype=jnp.float32)  # 1-based
  discount = 1.0 / jnp.log2(rank + 1.0)
  out = {}
  for k in recall_at:
    out[f"recall@{k}"] = jnp.sum(hits[:, :k], -1) / num_rel
  for k in mrr_at:
    out[f"mrr@{k}"] = jnp.max(hits[:, :k] / rank[:k], axis=-1)
  for k in ndcg_at:
    ideal = jnp.sum(jnp.where(rank[:k] <= num_rel[:, None], discount[:k], 0.),
                    axis=-1)
    out[f"ndcg@{k}"] = jnp.sum(hits[:, :k] * discount[:k], -1) / ideal
  for k in map_at:
    precision = jnp.cumsum(hits[:, :k], -1) / rank[:k]
    out[f"map@{k}"] = (jnp.sum(precision * hits[:, :k], -1)
                       / jnp.minimum(float(k), num_rel))
  return out


def global_rows(array, mesh):
  """Places a host array identical on every process, rows over batch axes.

  Rows are zero-padded to a multiple of the batch ways.
  """
  ways = shd.global_batch_size(mesh)
  padding = [(0, (-len(array)) % ways)] + [(0, 0)] * (array.ndim - 1)
  array = np.pad(array, padding)
  sharding = NamedSharding(mesh, P(shd.BATCH_AXES))
  return jax.make_array_from_callback(array.shape, sharding,
                                      lambda index: array[index])


class RetrievalEvaluator:
  """Embeds queries and corpus with a model's params; scores retrieval.

  Texts are tokenized once, here; every call embeds them with the given
  parameters in batches of ``batch_size`` (a multiple of the mesh's batch
  ways), retrieves the top ``k`` exactly and averages
  :func:`ranking_metrics` over the queries (names ``retrieval/...``).
  """

  def __init__(self, queries, corpus, relevant, *, tokenizer, graphdef,
               mesh, seq_len, batch_size, query_prefix="", doc_prefix="",
               add_bos=False, bidirectional=False, k=100):
    kw = dict(seq_len=seq_len, add_bos=add_bos)
    self._queries = pairs.tokenize_texts(tokenizer, queries,
                                         prefix=query_prefix, **kw)
    self._corpus = pairs.tokenize_texts(tokenizer, corpus, prefix=doc_prefix,
                                        **kw)
    width = max(len(r) for r in relevant)
    self._relevant = np.array([list(r) + [-1] * (width - len(r))
                               for r in relevant])
    self._mesh, self._batch_size = mesh, batch_size
    self._k = min(k, len(corpus))

    def encode(params, tokens, segment_ids):
      with shd.activation_sharding(mesh):  # rows stay local, weights gathered
        return nnx.merge(graphdef, params).encode(tokens, segment_ids,
                                                  bidirectional=bidirectional)
    self._encode = jax.jit(encode)

  def embed(self, params, tokens, segment_ids):
    """``[N, D]`` host embeddings of tokenized rows, a batch at a time."""
    out, n = [], len(tokens)
    for start in range(0, n, self._batch_size):
      rows = slice(start, start + self._batch_size)
      batch = [np.zeros((self._batch_size, tokens.shape[1]), np.int32)
               for _ in range(2)]
      count = len(tokens[rows])
      batch[0][:count], batch[1][:count] = tokens[rows], segment_ids[rows]
      emb = self._encode(params,
                         *(global_rows(x, self._mesh) for x in batch))
      out.append(multihost_utils.process_allgather(emb, tiled=True)[:count])
    return np.concatenate(out)

  def embeddings(self, params):
    """Host ``(queries [Q, D], corpus [C, D])`` embeddings."""
    return (self.embed(params, *self._queries),
            self.embed(params, *self._corpus))

  def __call__(self, params) -> dict[str, float]:
    queries, corpus = self.embeddings(params)
    _, ids = retrieve(queries, global_rows(corpus, self._mesh), k=self._k,
                      mesh=self._mesh, num_valid=len(corpus))
    metrics = ranking_metrics(ids, self._relevant)
    return {f"retrieval/{k}": float(jnp.mean(v)) for k, v in metrics.items()}


def from_config(config, tokenizer, mesh, graphdef) -> RetrievalEvaluator:
  """The held-out retrieval evaluator of a pair / CAFe run's data."""
  d = config.data
  queries, corpus, relevant, is_pair = pairs.retrieval_set(
      d, "eval", max_queries=pairs.option(d, "eval_queries"))
  return RetrievalEvaluator(
      queries, corpus, relevant, tokenizer=tokenizer, graphdef=graphdef,
      mesh=mesh, seq_len=config.train.seq_len,
      batch_size=config.train.batch_size,
      query_prefix=pairs.option(d, "query_prefix") if is_pair else "",
      doc_prefix=pairs.option(d, "doc_prefix") if is_pair else "",
      add_bos=d.get("add_bos", False),
      bidirectional=config.contrastive.bidirectional)
