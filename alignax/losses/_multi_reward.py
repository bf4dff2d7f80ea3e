r"""Multi-objective reward models: attribute regression, gating, decorrelation.

ArmoRM (Wang et al., 2024) reads K interpretable rewards off one backbone
(a linear regression head on the last token's hidden state, trained on
absolute ratings: stage 1), then mixes them into one preference score with
non-negative, prompt-conditioned weights from a gating network (a softmax,
trained with a Bradley–Terry loss on preference pairs while the backbone and
the regression head stay frozen: stage 2). Before mixing, every attribute
reward is decorrelated from the verbosity reward on a reference
distribution, so that no attribute carries a length bias into the mixture:
:math:`r_i' = r_i - \lambda_i r_{verbose}` with :math:`\lambda_i` chosen so
that :math:`\mathrm{corr}(r_i', r_{verbose}) = 0` (the paper: Spearman's
correlation on UltraFeedback).

Everything here is a pure function of arrays.

References:
  Wang, Xiong, Xie, Zhao & Zhang, *Interpretable Preferences via
  Multi-Objective Reward Modeling and Mixture-of-Experts*, EMNLP Findings
  2024 (arXiv:2406.12845).
"""

import jax
import jax.numpy as jnp

from alignax.losses._preference import check_shapes

Array = jax.Array


def _check_ranked(names, *arrays, ndim):
  arrays = [jnp.asarray(a) for a in arrays]
  for name, a in zip(names, arrays):
    if a.ndim != ndim:
      raise ValueError(f"{name} must have {ndim} dimensions, got shape "
                       f"{a.shape}")
  return check_shapes(names, *arrays)


def masked_regression_loss(predictions: Array, targets: Array,
                           mask: Array) -> Array:
  r"""Squared error of K attribute rewards, over the observed ratings only.

  .. math:: \ell_i = \sum_k m_{ik}\,(\hat r_{ik} - r_{ik})^2

  ArmoRM's stage 1: each example is rated on some of the K attributes
  (HelpSteer rates 5, UltraFeedback 4, ...); the others are masked out.

  Args:
    predictions: ``[B, K]`` predicted attribute rewards.
    targets: ``[B, K]`` ratings; entries where ``mask`` is False are ignored
      (they may hold NaN: they never reach the loss or its gradient).
    mask: ``[B, K]`` bool, True where the rating is observed.

  Returns:
    ``[B]`` per-example sums of squared errors; divide the batch sum by
    ``mask.sum()`` for the mean squared error per observed rating.

  References:
    Wang et al., *Interpretable Preferences via Multi-Objective Reward
    Modeling and Mixture-of-Experts*, 2024, Section 3.1.
  """
  predictions, targets, mask = _check_ranked(
      ("predictions", "targets", "mask"), predictions, targets, mask, ndim=2)
  mask = mask.astype(bool)
  targets = jnp.where(mask, targets, 0.0)  # NaN-free on both branches
  err = jnp.where(mask, predictions - targets, 0.0)
  return jnp.sum(err * err, axis=-1)


def gated_rewards(rewards: Array, weights: Array) -> Array:
  r"""The gate's mixture of attribute rewards, :math:`R = \sum_k g_k r_k`.

  Args:
    rewards: ``[..., K]`` (decorrelated) attribute rewards.
    weights: ``[..., K]`` gate weights (a softmax: non-negative, sum 1).

  Returns:
    ``[...]`` scalar preference scores.
  """
  rewards, weights = check_shapes(("rewards", "weights"), rewards, weights)
  return jnp.sum(rewards * weights, axis=-1)


def gated_bradley_terry_loss(chosen_rewards: Array, rejected_rewards: Array,
                             gate_logits: Array, *,
                             beta: Array | float = 1.0) -> Array:
  r"""Bradley–Terry loss of the gated mixture (ArmoRM's stage 2).

  .. math::
     g = \mathrm{softmax}(z),\qquad
     \ell_i = -\log\sigma\big(\beta\, g_i^\top (r^c_i - r^r_i)\big)

  The gate depends on the prompt only, so both responses of a pair share
  ``g``; :math:`\beta` scales the mixture (rewards on a rating scale make
  differences of a few tenths) and may be a learned scalar.

  Args:
    chosen_rewards, rejected_rewards: ``[B, K]`` attribute rewards of the
      preferred and dispreferred responses.
    gate_logits: ``[B, K]`` the gating network's logits for the pair's
      prompt.
    beta: scalar scale of the mixture.

  Returns:
    ``[B]`` per-pair losses.

  References:
    Wang et al., *Interpretable Preferences via Multi-Objective Reward
    Modeling and Mixture-of-Experts*, 2024, Section 3.2.
  """
  chosen_rewards, rejected_rewards, gate_logits = _check_ranked(
      ("chosen_rewards", "rejected_rewards", "gate_logits"), chosen_rewards,
      rejected_rewards, gate_logits, ndim=2)
  weights = jax.nn.softmax(gate_logits.astype(jnp.float32), axis=-1)
  margin = gated_rewards(chosen_rewards - rejected_rewards, weights)
  return -jax.nn.log_sigmoid(beta * margin)


def verbosity_adjusted(rewards: Array, verbose: Array,
                       lambdas: Array) -> Array:
  r"""Attribute rewards minus their verbosity component.

  .. math:: r_{ik}' = r_{ik} - \lambda_k\, v_i

  Args:
    rewards: ``[..., K]`` attribute rewards.
    verbose: ``[...]`` the verbosity reward of the same responses.
    lambdas: ``[K]`` coefficients (:func:`pearson_decorrelation`,
      :func:`spearman_decorrelation`); 0 leaves an attribute as it is.

  Returns:
    ``[..., K]`` adjusted rewards.
  """
  rewards, verbose, lambdas = (jnp.asarray(a) for a in (rewards, verbose,
                                                        lambdas))
  if verbose.shape != rewards.shape[:-1] or lambdas.shape != rewards.shape[-1:]:
    raise ValueError(f"verbose {verbose.shape} and lambdas {lambdas.shape} "
                     f"must be rewards.shape[:-1] and [K] of rewards "
                     f"{rewards.shape}")
  return rewards - lambdas * verbose[..., None]


def _weights(n, where):
  return (jnp.ones(n, jnp.float32) if where is None
          else jnp.asarray(where, bool).astype(jnp.float32))


def pearson_decorrelation(rewards: Array, verbose: Array, *,
                          where: Array | None = None) -> Array:
  r"""The :math:`\lambda_k` that zero each adjusted reward's Pearson
  correlation with verbosity on a reference set.

  .. math:: \lambda_k = \frac{\mathrm{Cov}(r_k, v)}{\mathrm{Var}(v)}

  (the least-squares slope of :math:`r_k` on :math:`v`, so that
  :math:`\mathrm{Cov}(r_k - \lambda_k v, v) = 0`).

  Args:
    rewards: ``[N, K]`` attribute rewards of the reference responses.
    verbose: ``[N]`` their verbosity rewards.
    where: ``[N]`` bool, the responses that count (default all).

  Returns:
    ``[K]`` coefficients (0 where ``v`` has no variance).
  """
  rewards, verbose = jnp.asarray(rewards, jnp.float32), jnp.asarray(
      verbose, jnp.float32)
  if rewards.ndim != 2 or verbose.shape != rewards.shape[:1]:
    raise ValueError(f"rewards must be [N, K] and verbose [N], got "
                     f"{rewards.shape} and {verbose.shape}")
  w = _weights(verbose.shape[0], where)
  n = jnp.maximum(jnp.sum(w), 1.0)
  dv = verbose - jnp.sum(w * verbose) / n  # [N]
  dr = rewards - jnp.sum(w[:, None] * rewards, axis=0) / n  # [N, K]
  var = jnp.sum(w * dv * dv)
  cov = jnp.sum((w * dv)[:, None] * dr, axis=0)  # [K]
  return jnp.where(var > 0, cov / jnp.where(var > 0, var, 1.0), 0.0)


def _ranks(x, w):
  """Ranks 0..n-1 of the ``w > 0`` entries of ``x`` (others get ranks >= n)."""
  order = jnp.argsort(jnp.where(w > 0, x, jnp.inf))
  return jnp.argsort(order).astype(jnp.float32)


def spearman(x: Array, y: Array, *, where: Array | None = None) -> Array:
  """Spearman's rank correlation of ``[N]`` arrays (ties by index order)."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  w = _weights(x.shape[0], where)
  rx, ry = _ranks(x, w), _ranks(y, w)
  n = jnp.maximum(jnp.sum(w), 1.0)
  dx = rx - jnp.sum(w * rx) / n
  dy = ry - jnp.sum(w * ry) / n
  den = jnp.sqrt(jnp.sum(w * dx * dx) * jnp.sum(w * dy * dy))
  return jnp.sum(w * dx * dy) / jnp.maximum(den, 1e-12)


def spearman_decorrelation(rewards: Array, verbose: Array, *,
                           where: Array | None = None,
                           iterations: int = 60) -> Array:
  r"""The :math:`\lambda_k` that zero each adjusted reward's Spearman
  correlation with verbosity on a reference set (ArmoRM's choice).

  .. math:: \rho_S(r_k - \lambda_k v,\; v) = 0

  :math:`\rho_S(r_k - \lambda v, v)` does not increase with :math:`\lambda`
  (each pair of responses swaps order at most once, always towards
  discordance), goes to +1 and -1 at the ends, and is a step function;
  bisection finds the step where it crosses 0 (to within one rank swap, so
  :math:`|\rho_S| \lesssim 3/N` there). The bracket is centred at the
  Pearson solution, :func:`pearson_decorrelation`.

  Args:
    rewards: ``[N, K]`` attribute rewards of the reference responses.
    verbose: ``[N]`` their verbosity rewards.
    where: ``[N]`` bool, the responses that count (default all).
    iterations: bisection steps.

  Returns:
    ``[K]`` coefficients.

  References:
    Wang et al., *Interpretable Preferences via Multi-Objective Reward
    Modeling and Mixture-of-Experts*, 2024, Section 3.2 (verbosity penalty).
  """
  rewards, verbose = jnp.asarray(rewards, jnp.float32), jnp.asarray(
      verbose, jnp.float32)
  centre = pearson_decorrelation(rewards, verbose, where=where)  # [K]
  w = _weights(verbose.shape[0], where)
  std = lambda x: jnp.sqrt(jnp.sum(w * (x - jnp.sum(w * x) / jnp.maximum(
      jnp.sum(w), 1.0)) ** 2) / jnp.maximum(jnp.sum(w), 1.0))
  scale = 1e3 * (jax.vmap(std, in_axes=1)(rewards) + 1e-6) / jnp.maximum(
      std(verbose), 1e-12)  # [K]: beyond it the ranks are those of -v or v

  def rho(lam):  # [K] -> [K]
    return jax.vmap(lambda r, l: spearman(r - l * verbose, verbose,
                                          where=where),
                    in_axes=(1, 0))(rewards, lam)

  def step(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    positive = rho(mid) > 0
    return jnp.where(positive, mid, lo), jnp.where(positive, hi, mid)

  lo, hi = jax.lax.fori_loop(0, iterations, step,
                             (centre - scale, centre + scale))
  return 0.5 * (lo + hi)
