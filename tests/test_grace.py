"""GRACE (alignax.rewards.grace, alignax.grace): rewards, pooling, the loop."""

import numpy as np
import pytest

from alignax.rewards import grace as grace_rewards


def _reference(anchors, samples, negatives, g, tau, wc, wx):
  """The authors' HiddenRewardManager (supervised, with_scale) as loops."""
  def cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
  b = len(samples)
  p = b // g
  total = np.zeros(b)
  for grp in range(p):
    rows = range(grp * g, grp * g + g)
    neg = 0.0 if negatives is None else -cos(anchors[grp * g],
                                             negatives[grp * g])
    for i in rows:
      pos = cos(anchors[i], samples[i])
      clu = (sum(cos(samples[i], samples[j]) for j in rows if j != i)
             / (g - 1) if g > 1 else 0.0)
      maxes = [max(cos(anchors[i], samples[j])
                   for j in range(h * g, h * g + g))
               for h in range(p) if h != grp]
      cross = -np.mean(maxes) if maxes else 0.0
      total[i] = (pos + neg + wc * clu + wx * cross) / tau
  return total


@pytest.mark.parametrize("g,p,with_negatives", [(4, 3, True), (2, 1, False),
                                                (1, 3, True)])
def test_rewards_match_the_authors_loops(g, p, with_negatives):
  rng = np.random.default_rng(g * 10 + p)
  a, x, n = (rng.normal(size=(g * p, 5)) for _ in range(3))
  n = n if with_negatives else None
  total, terms = grace_rewards.grace_rewards(
      a, x, n, num_generations=g, temperature=0.7, clustering_weight=0.3,
      cross_group_weight=0.5)
  np.testing.assert_allclose(total, _reference(a, x, n, g, 0.7, 0.3, 0.5),
                             rtol=1e-12, atol=1e-12)
  assert set(terms) == set(grace_rewards.COMPONENTS)
  np.testing.assert_allclose(
      total, terms["positive"] + terms["negative"]
      + 0.3 * terms["clustering"] + 0.5 * terms["cross_group"])
  # Scale-free: cosine similarities.
  again, _ = grace_rewards.grace_rewards(
      3 * a, 0.5 * x, n, num_generations=g, temperature=0.7,
      clustering_weight=0.3, cross_group_weight=0.5)
  np.testing.assert_allclose(again, total, rtol=1e-12)


def test_rewards_by_hand():
  # Two groups of G = 2 in 2-D; anchors a_g, samples x_gi.
  s = np.sqrt(0.5)
  anchors = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], float)
  samples = np.array([[1, 0], [s, s], [0, 1], [-1, 0]], float)
  total, terms = grace_rewards.grace_rewards(
      anchors, samples, num_generations=2, temperature=0.5,
      clustering_weight=0.2, cross_group_weight=0.2)
  # positive: cos(a, x) = 1, s, 1, 0; clustering: cos(x_g1, x_g2) = s, s,
  # 0, 0; cross: -max over the other group's samples of cos(a, x):
  # group 0 (a = e1) vs {e2, -e1} -> 0; group 1 (a = e2) vs {e1, (s, s)} -> s.
  np.testing.assert_allclose(terms["positive"], np.array([1, s, 1, 0]) / 0.5)
  np.testing.assert_allclose(terms["clustering"], np.array([s, s, 0, 0]) / .5)
  np.testing.assert_allclose(terms["cross_group"],
                             np.array([0, 0, -s, -s]) / 0.5, atol=1e-15)
  want = np.array([1 + 0.2 * s, s + 0.2 * s, 1 - 0.2 * s, -0.2 * s]) / 0.5
  np.testing.assert_allclose(total, want)
  # = [2.28284271, 1.69705627, 1.71715729, -0.28284271]
  np.testing.assert_allclose(
      total, [2.2828427125, 1.6970562748, 1.7171572875, -0.2828427125],
      rtol=1e-10)


def test_length_penalty_and_errors():
  np.testing.assert_array_equal(
      grace_rewards.length_penalized([0.5, 2.0, 3.0], [False, True, False]),
      [0.5, -1.0, 3.0])
  a = np.ones((4, 3))
  with pytest.raises(ValueError, match="multiple of G=3"):
    grace_rewards.grace_components(a, a, num_generations=3)
  with pytest.raises(ValueError, match=r"anchors must have shape \[B, D\]"):
    grace_rewards.grace_components(a[0], a, num_generations=2)
  with pytest.raises(ValueError, match="finite"):
    grace_rewards.grace_components(a, a * np.nan, num_generations=2)
  with pytest.raises(ValueError, match="temperature"):
    grace_rewards.grace_rewards(a, a, num_generations=2, temperature=0.0)
