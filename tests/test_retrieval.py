"""Exact retrieval (1 and 8 devices) and IR metrics vs sentence-transformers'."""

import math

import jax
import numpy as np
import pytest

from alignax import retrieval
from alignax import sharding as shd


def st_metrics(ranked, relevant, k_recall=(1, 5, 10), k_mrr=10, k_ndcg=10,
               k_map=100):
  """sentence-transformers' InformationRetrievalEvaluator.compute_metrics,
  re-implemented line by line in NumPy (binary relevance, per query)."""
  out = {f"recall@{k}": [] for k in k_recall}
  out.update({f"mrr@{k_mrr}": [], f"ndcg@{k_ndcg}": [], f"map@{k_map}": []})
  dcg = lambda rel, k: sum(r / np.log2(i + 2) for i, r in enumerate(rel[:k]))
  for hits, rel in zip(ranked, relevant):
    rel = set(rel)
    for k in k_recall:
      out[f"recall@{k}"].append(sum(h in rel for h in hits[:k]) / len(rel))
    rr = 0.0
    for rank, h in enumerate(hits[:k_mrr]):
      if h in rel:
        rr = 1.0 / (rank + 1)
        break
    out[f"mrr@{k_mrr}"].append(rr)
    predicted = [1 if h in rel else 0 for h in hits[:k_ndcg]]
    out[f"ndcg@{k_ndcg}"].append(dcg(predicted, k_ndcg)
                                 / dcg([1] * len(rel), k_ndcg))
    correct, total = 0, 0.0
    for rank, h in enumerate(hits[:k_map]):
      if h in rel:
        correct += 1
        total += correct / (rank + 1)
    out[f"map@{k_map}"].append(total / min(k_map, len(rel)))
  return {k: np.array(v) for k, v in out.items()}


def pad(relevant):
  width = max(map(len, relevant))
  return np.array([list(r) + [-1] * (width - len(r)) for r in relevant])


def test_metrics_hand_values():
  ranked = np.array([[5, 2, 7, 1], [3, 4, 0, 9], [0, 1, 2, 3]])
  relevant = [[2, 1], [9], [8]]
  got = retrieval.ranking_metrics(ranked, pad(relevant))
  # Query 0: hits at ranks 2 and 4 of 2 relevant documents.
  #   nDCG = (1/log2 3 + 1/log2 5) / (1 + 1/log2 3); MAP = (1/2 + 2/4) / 2.
  # Query 1: one hit at rank 4. Query 2: no hit.
  ndcg0 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
  want = {"recall@1": [0, 0, 0], "recall@5": [1, 1, 0],
          "recall@10": [1, 1, 0], "mrr@10": [0.5, 0.25, 0],
          "ndcg@10": [ndcg0, 1 / math.log2(5), 0],
          "map@100": [0.5, 0.25, 0]}
  for name, values in want.items():
    np.testing.assert_allclose(got[name], values, rtol=1e-6, err_msg=name)
  np.testing.assert_allclose(ndcg0, 0.650921, rtol=1e-5)


def test_metrics_match_sentence_transformers_reference():
  rng = np.random.default_rng(0)
  num_q, corpus, k = 30, 150, 100
  ranked = np.stack([rng.permutation(corpus)[:k] for _ in range(num_q)])
  relevant = [rng.choice(corpus, rng.integers(1, 6), replace=False)
              for _ in range(num_q)]
  # Make sure early hits occur: put a relevant id at a random early rank.
  for q in range(0, num_q, 2):
    ranked[q, rng.integers(0, 12)] = relevant[q][0]
  got = retrieval.ranking_metrics(ranked, pad(relevant))
  want = st_metrics(ranked.tolist(), [r.tolist() for r in relevant])
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7,
                               err_msg=name)
  jitted = jax.jit(retrieval.ranking_metrics)(ranked, pad(relevant))
  np.testing.assert_allclose(jitted["ndcg@10"], want["ndcg@10"], rtol=1e-5)


@pytest.mark.parametrize("use_mesh", [False, True])
def test_retrieve_is_exact_top_k(use_mesh):
  rng = np.random.default_rng(1)
  queries = rng.normal(size=(6, 8)).astype(np.float32)
  corpus = rng.normal(size=(37, 8)).astype(np.float32)  # 37: not divisible
  mesh = shd.make_mesh({"fsdp": -1}) if use_mesh else None
  scores, ids = retrieval.retrieve(queries, corpus, k=10, mesh=mesh)
  full = queries @ corpus.T
  want = np.argsort(-full, axis=1)[:, :10]
  np.testing.assert_array_equal(ids, want)
  np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1),
                             rtol=1e-5)
  # Padding rows past num_valid never come back, even if they score best.
  padded = np.concatenate([corpus, 100 * queries[:1]])  # 38 rows
  _, ids = retrieval.retrieve(queries, padded, k=10, mesh=mesh, num_valid=37)
  np.testing.assert_array_equal(ids, want)
  with pytest.raises(ValueError, match="k <= C"):
    retrieval.retrieve(queries, corpus, k=38, mesh=mesh)
