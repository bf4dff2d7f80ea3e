"""Multi-reward combination against NumPy references and a worked example."""

import math

import numpy as np
import pytest

from alignax.rewards import combine


def _random(seed=0, n=3, g=5, k=3):
  rng = np.random.default_rng(seed)
  rewards = rng.normal(size=(n, g, k))
  rewards[..., 0] = rng.integers(0, 2, size=(n, g))  # a binary reward
  return rewards, rng.uniform(0.1, 2.0, size=k)


def _trl_normalize_then_sum(rewards, weights):
  """TRL GRPOTrainer's multi_objective_aggregation='normalize_then_sum',
  transcribed loop by loop (rewards_per_func [N*G, K], no NaNs)."""
  n, g, k = rewards.shape
  flat = rewards.reshape(n * g, k)
  reward_k = np.zeros_like(flat)
  for prompt in range(n):
    rows = slice(prompt * g, (prompt + 1) * g)
    for j in range(k):
      x = flat[rows, j]
      std = math.sqrt(sum((v - x.mean()) ** 2 for v in x) / (g - 1))
      reward_k[rows, j] = (x - x.mean()) / (std + 1e-4)
  total = np.array([sum(reward_k[i, j] * weights[j] for j in range(k))
                    for i in range(n * g)])
  std = math.sqrt(sum((v - total.mean()) ** 2 for v in total)
                  / (total.size - 1))
  return ((total - total.mean()) / (std + 1e-4)).reshape(n, g)


def test_weighted_sum_matches_a_loop():
  rewards, weights = _random()
  want = np.array([[sum(w * r for w, r in zip(weights, sample))
                    for sample in group] for group in rewards])
  np.testing.assert_allclose(combine.weighted_sum(rewards, weights), want)


def test_group_normalize_matches_a_loop():
  scores = _random()[0][..., 1]
  want = np.array([[(s - row.mean()) / (row.std(ddof=1) + 1e-4) for s in row]
                   for row in scores])
  np.testing.assert_allclose(combine.group_normalize(scores), want)
  # A constant group has no signal: zeros, not NaNs.
  np.testing.assert_array_equal(combine.group_normalize([[2.0, 2.0, 2.0]]),
                                np.zeros((1, 3)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gdpo_matches_trl_normalize_then_sum(seed):
  rewards, weights = _random(seed)
  np.testing.assert_allclose(combine.gdpo_advantages(rewards, weights),
                             _trl_normalize_then_sum(rewards, weights),
                             rtol=1e-10, atol=1e-12)


def test_gdpo_worked_example_keeps_apart_what_grpo_collapses():
  # Two binary rewards, G = 2 samples of each of two prompts. Prompt A's
  # better sample earns one reward, prompt B's earns both: totals (0, 1)
  # and (0, 2).
  rewards = np.array([[[0, 0], [1, 0]],
                      [[0, 0], [1, 1]]], float)
  weights = np.ones(2)
  # GRPO (sum, then normalise per group) gives both prompts (-1/√2, 1/√2).
  grpo = combine.group_normalize(combine.weighted_sum(rewards, weights),
                                 eps=0.0)
  np.testing.assert_allclose(grpo, [[-1 / math.sqrt(2), 1 / math.sqrt(2)]] * 2)
  # Decoupled: A = ±1/√2 (second reward constant), B = ±2/√2; the batch
  # standard deviation of (∓0.707, ∓1.414) is √(5/3), so A = ±√(3/10) and
  # B = ±√(6/5).
  decoupled = combine.decoupled_sum(rewards, weights, eps=0.0)
  np.testing.assert_allclose(decoupled, [[-0.7071068, 0.7071068],
                                         [-1.4142136, 1.4142136]], rtol=1e-6)
  gdpo = combine.gdpo_advantages(rewards, weights, eps=0.0)
  np.testing.assert_allclose(gdpo, [[-math.sqrt(0.3), math.sqrt(0.3)],
                                    [-math.sqrt(1.2), math.sqrt(1.2)]])


def test_gated_sum_matches_a_loop_and_a_worked_example():
  rewards, weights = _random()
  want = np.array([[-5.0 if s[2] < 0.1 else float(np.dot(weights, s))
                    for s in group] for group in rewards])
  got = combine.gated_sum(rewards, weights, constraint=2, threshold=0.1,
                          penalty=-5.0)
  np.testing.assert_allclose(got, want)
  # Helpfulness 0.8 and safety 0.9 (weights 1, 0.5; safety >= 0.5): 1.25;
  # the unsafe sample (safety 0.2) gets the penalty -1 whatever its
  # helpfulness.
  example = np.array([[[0.8, 0.9], [0.9, 0.2]]])
  got = combine.gated_sum(example, [1.0, 0.5], constraint=-1, threshold=0.5,
                          penalty=-1.0)
  np.testing.assert_allclose(got, [[1.25, -1.0]])


def test_lagrangian_sum_and_multiplier_update():
  rewards, weights = _random()
  want = np.array([[float(np.dot(weights, s)) + 0.7 * (s[1] - 0.2)
                    for s in group] for group in rewards])
  got = combine.lagrangian_sum(rewards, weights, constraint=1, threshold=0.2,
                               multiplier=0.7)
  np.testing.assert_allclose(got, want)
  example = np.array([[[0.8, 0.9], [0.9, 0.2]]])
  got = combine.lagrangian_sum(example, [1.0, 0.0], constraint=1,
                               threshold=0.5, multiplier=2.0)
  np.testing.assert_allclose(got, [[0.8 + 2 * 0.4, 0.9 - 2 * 0.3]])
  # Mean safety 0.55 < 0.6: the multiplier grows by 0.1 * 0.05; with slack
  # it shrinks, never below 0.
  assert combine.update_multiplier(1.0, [0.9, 0.2], threshold=0.6,
                                   lr=0.1) == pytest.approx(1.005)
  assert combine.update_multiplier(0.01, [0.9, 0.9], threshold=0.6,
                                   lr=0.1) == 0.0


def test_bad_shapes_fail_with_clear_errors():
  rewards, weights = _random()
  with pytest.raises(ValueError, match=r"shape \[N, G, K\], got \(3, 5\)"):
    combine.weighted_sum(rewards[..., 0], weights)
  with pytest.raises(ValueError, match=r"weights must have shape \[K\] = \[3\]"):
    combine.gdpo_advantages(rewards, weights[:2])
  with pytest.raises(ValueError, match="G >= 2"):
    combine.gdpo_advantages(rewards[:, :1], weights)
  with pytest.raises(ValueError, match="finite"):
    combine.weighted_sum(np.full((1, 2, 3), np.nan), weights)
  with pytest.raises(ValueError, match="constraint index 3 out of range"):
    combine.gated_sum(rewards, weights, constraint=3, threshold=0,
                      penalty=-1)
  with pytest.raises(ValueError, match="multiplier must be >= 0"):
    combine.lagrangian_sum(rewards, weights, constraint=0, threshold=0,
                           multiplier=-1)
  with pytest.raises(ValueError, match="lr > 0"):
    combine.update_multiplier(1.0, [0.5], threshold=0.5, lr=0.0)
