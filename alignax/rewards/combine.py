r"""Several rewards per sample combined into one signal, in NumPy.

Every function takes rewards of shape ``[N, G, K]``: ``N`` prompts, ``G``
samples of each prompt (the GRPO group), ``K`` rewards of each sample, and
weights of shape ``[K]``. They run on the host, between scoring and the
policy-gradient step, and return ``[N, G]`` float64 arrays.

* :func:`weighted_sum` is the plain linear scalarisation; GRPO then
  normalises the sum within each group (:func:`group_normalize`). Li et al.
  (2025) aggregate the scores of a multi-label reward model (politeness,
  meaningfulness, actionability, safety) into one scalar reward before
  GRPO; this is the linear form of that aggregation.
* :func:`gdpo_advantages` is GDPO (Liu et al., 2026): normalise each reward
  within its group first, sum those with the weights, then normalise the sum
  over the whole batch. Summing first lets different reward combinations
  collapse onto the same advantages (with G = 2 binary rewards, totals
  (0, 1) and (0, 2) both give (-0.71, 0.71)); normalising each reward first
  keeps them apart. Statistics follow TRL's ``normalize_then_sum``:
  Bessel-corrected standard deviations, ``eps = 1e-4`` added to them.
* :func:`gated_sum` and :func:`lagrangian_sum` treat one reward as a
  constraint (e.g. safety must reach a threshold) as constrained RLHF does
  (Safe RLHF, Dai et al., 2024; Moskovitz et al., 2024): a fixed penalty
  for a sample below the threshold, or a Lagrange multiplier on the
  constraint's slack whose value :func:`update_multiplier` adapts by dual
  gradient steps. Both scalarise the raw rewards, so GRPO's group
  normalisation comes after (Constrained GRPO, Girgis et al., 2026, shows
  that normalising the reward and constraint parts separately distorts the
  multiplier's trade-off).

References:
  Li, Li, Kosuga, Bian, 2025, Optimizing Safe and Aligned Language
  Generation: A Multi-Objective GRPO Approach (arXiv:2503.21819).
  Liu et al., 2026, GDPO: Group reward-Decoupled Normalization Policy
  Optimization for Multi-reward RL Optimization (arXiv:2601.05242).
  Dai et al., 2024, Safe RLHF: Safe Reinforcement Learning from Human
  Feedback. Moskovitz et al., 2024, Confronting Reward Model
  Overoptimization with Constrained RLHF. Girgis et al., 2026, Constrained
  Group Relative Policy Optimization (arXiv:2602.05863).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-4  # TRL's, added to the standard deviations


def _rewards_and_weights(rewards, weights):
  rewards = np.asarray(rewards, np.float64)
  if rewards.ndim != 3:
    raise ValueError(f"rewards must have shape [N, G, K], got "
                     f"{rewards.shape}.")
  weights = np.asarray(weights, np.float64)
  if weights.shape != rewards.shape[-1:]:
    raise ValueError(f"weights must have shape [K] = [{rewards.shape[-1]}] "
                     f"to match rewards {rewards.shape}, got {weights.shape}.")
  if not (np.isfinite(rewards).all() and np.isfinite(weights).all()):
    raise ValueError("rewards and weights must be finite (no NaN or inf).")
  return rewards, weights


def _constraint_index(constraint, k):
  if not -k <= constraint < k:
    raise ValueError(f"constraint index {constraint} out of range for "
                     f"K = {k} rewards.")
  return constraint % k


def _safe_divide(centered, scale):
  """``centered / scale``, 0 where ``scale`` is 0 (a constant group with
  ``eps = 0``: no signal rather than NaN)."""
  scale = np.broadcast_to(scale, centered.shape)
  return np.divide(centered, scale, out=np.zeros_like(centered),
                   where=scale > 0)


def weighted_sum(rewards, weights) -> np.ndarray:
  r"""Linear scalarisation of K rewards.

  .. math:: s_{ng} = \sum_k w_k\, r_{ngk}

  Args:
    rewards: shape ``[N, G, K]``.
    weights: shape ``[K]``.

  Returns:
    shape ``[N, G]``.
  """
  rewards, weights = _rewards_and_weights(rewards, weights)
  return np.einsum("ngk,k->ng", rewards, weights)


def group_normalize(scores, *, eps: float = EPS) -> np.ndarray:
  r"""GRPO's group-relative normalisation of one score per sample.

  .. math:: a_{ng} = \frac{s_{ng} - \mathrm{mean}_g\, s_{ng}}
      {\mathrm{std}_g\, s_{ng} + \epsilon}

  with the Bessel-corrected standard deviation over the ``G`` samples of
  each prompt (TRL's ``scale_rewards='group'``).

  Args:
    scores: shape ``[N, G]``, ``G >= 2``.
    eps: added to the standard deviation (a constant group gives 0, also
      with ``eps = 0``).

  Returns:
    shape ``[N, G]``.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or scores.shape[1] < 2:
    raise ValueError(f"scores must have shape [N, G] with G >= 2 samples per "
                     f"prompt, got {scores.shape}.")
  mean = scores.mean(axis=1, keepdims=True)
  std = scores.std(axis=1, ddof=1, keepdims=True)
  return _safe_divide(scores - mean, std + eps)


def batch_normalize(scores, *, eps: float = EPS) -> np.ndarray:
  r"""Normalisation over the whole batch of ``N * G`` samples.

  .. math:: b_{ng} = \frac{x_{ng} - \mathrm{mean}\, x}{\mathrm{std}\, x
      + \epsilon}

  Args:
    scores: shape ``[N, G]`` with ``N * G >= 2``.
    eps: added to the (Bessel-corrected) standard deviation.

  Returns:
    shape ``[N, G]``.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or scores.size < 2:
    raise ValueError(f"scores must have shape [N, G] with N * G >= 2, got "
                     f"{scores.shape}.")
  return _safe_divide(scores - scores.mean(), scores.std(ddof=1) + eps)


def decoupled_sum(rewards, weights, *, eps: float = EPS) -> np.ndarray:
  r"""Each reward normalised within its group, then the weighted sum.

  .. math:: s_{ng} = \sum_k w_k\, \frac{r_{ngk} - \mathrm{mean}_g\, r_{ngk}}
      {\mathrm{std}_g\, r_{ngk} + \epsilon}

  GDPO's first stage (:func:`gdpo_advantages` adds the second).

  Args:
    rewards: shape ``[N, G, K]``, ``G >= 2``.
    weights: shape ``[K]``.
    eps: added to each group standard deviation.

  Returns:
    shape ``[N, G]``.
  """
  rewards, weights = _rewards_and_weights(rewards, weights)
  n, g, k = rewards.shape
  per_reward = rewards.transpose(2, 0, 1).reshape(k * n, g)  # [K*N, G]
  normalized = group_normalize(per_reward, eps=eps).reshape(k, n, g)
  return np.einsum("kng,k->ng", normalized, weights)


def gdpo_advantages(rewards, weights, *, eps: float = EPS) -> np.ndarray:
  r"""GDPO advantages (Liu et al., 2026): decoupled, then batch-normalised.

  .. math:: A_{ng} = \mathrm{BN}\Big(\sum_k w_k\,
      \frac{r_{ngk} - \mathrm{mean}_g\, r_{ngk}}
      {\mathrm{std}_g\, r_{ngk} + \epsilon}\Big)

  where BN is :func:`batch_normalize` over all ``N * G`` samples, which
  keeps the advantages' range from growing with ``K``. Matches TRL's
  ``multi_objective_aggregation='normalize_then_sum'``.

  Args:
    rewards: shape ``[N, G, K]``, ``G >= 2``.
    weights: shape ``[K]``.
    eps: added to every standard deviation.

  Returns:
    per-sample advantages, shape ``[N, G]``.
  """
  return batch_normalize(decoupled_sum(rewards, weights, eps=eps), eps=eps)


def gated_sum(rewards, weights, *, constraint: int, threshold: float,
              penalty: float) -> np.ndarray:
  r"""Weighted sum where the constraint holds, a fixed penalty where not.

  .. math:: s_{ng} = \begin{cases} \sum_k w_k r_{ngk} &
      r_{ngc} \ge \tau \\ p & \text{otherwise} \end{cases}

  Args:
    rewards: shape ``[N, G, K]``.
    weights: shape ``[K]`` (the constraint's own weight may be 0).
    constraint: index ``c`` of the constraint reward along ``K``.
    threshold: ``tau``, the value it must reach.
    penalty: ``p``, every violating sample's score (put it below the
      weighted sum's range so that any safe sample beats any unsafe one).

  Returns:
    shape ``[N, G]``.
  """
  rewards, weights = _rewards_and_weights(rewards, weights)
  c = _constraint_index(constraint, rewards.shape[-1])
  total = np.einsum("ngk,k->ng", rewards, weights)
  return np.where(rewards[..., c] >= threshold, total, float(penalty))


def lagrangian_sum(rewards, weights, *, constraint: int, threshold: float,
                   multiplier: float) -> np.ndarray:
  r"""Weighted sum plus a Lagrange multiplier times the constraint's slack.

  .. math:: s_{ng} = \sum_k w_k r_{ngk} + \lambda\,(r_{ngc} - \tau)

  The policy maximises :math:`\mathbb{E}[\sum_k w_k r_k]` subject to
  :math:`\mathbb{E}[r_c] \ge \tau`; :func:`update_multiplier` moves
  :math:`\lambda \ge 0` between policy steps.

  Args:
    rewards: shape ``[N, G, K]``.
    weights: shape ``[K]`` (usually 0 for the constraint).
    constraint: index ``c`` of the constraint reward along ``K``.
    threshold: ``tau``.
    multiplier: ``lambda >= 0``.

  Returns:
    shape ``[N, G]``.
  """
  rewards, weights = _rewards_and_weights(rewards, weights)
  c = _constraint_index(constraint, rewards.shape[-1])
  if multiplier < 0:
    raise ValueError(f"multiplier must be >= 0, got {multiplier}.")
  total = np.einsum("ngk,k->ng", rewards, weights)
  return total + multiplier * (rewards[..., c] - threshold)


def update_multiplier(multiplier: float, constraint_rewards, *,
                      threshold: float, lr: float) -> float:
  r"""One projected dual gradient step on the Lagrange multiplier.

  .. math:: \lambda \leftarrow \max\big(0,\ \lambda + \eta\,
      (\tau - \mathrm{mean}\, r_c)\big)

  It grows while the batch violates the constraint on average and shrinks
  to 0 once the constraint holds with slack.

  Args:
    multiplier: the current ``lambda >= 0``.
    constraint_rewards: the constraint reward of every sample of the batch,
      any shape (e.g. ``rewards[..., c]``, ``[N, G]``).
    threshold: ``tau``.
    lr: ``eta > 0``.

  Returns:
    the new multiplier.
  """
  values = np.asarray(constraint_rewards, np.float64)
  if values.size == 0 or not np.isfinite(values).all():
    raise ValueError("constraint_rewards must be non-empty and finite.")
  if multiplier < 0 or lr <= 0:
    raise ValueError(f"need multiplier >= 0 and lr > 0, got {multiplier}, "
                     f"{lr}.")
  return max(0.0, float(multiplier + lr * (threshold - values.mean())))
