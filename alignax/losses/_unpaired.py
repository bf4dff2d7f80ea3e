r"""Reference-free and unpaired preference losses.

Reference-free pairwise losses (ORPO, SimPO, CPO) take only the policy's
log-probabilities of the chosen and rejected completions; unpaired losses
(KTO, BCO, NPO) take one completion per example with a desirable/undesirable
flag (or, for NPO, only completions to unlearn). All return unreduced
per-example losses; the auxiliary NLL terms (ORPO, CPO) are left to the
caller (``alignax.losses.sft_loss``), who sums.
"""

import jax
import jax.numpy as jnp

from alignax.losses import _preference
from alignax.losses._preference import check_shapes

Array = jax.Array


def _log1mexp(x: Array) -> Array:
  """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends."""
  # Maechler (2012): expm1 near 0, log1p(-exp) far from it.
  return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)),
                   jnp.log1p(-jnp.exp(x)))


def orpo_loss(chosen_logps: Array, rejected_logps: Array, *,
              beta: float = 0.1) -> Array:
  r"""ORPO odds-ratio term (TRL ``ORPOTrainer.odds_ratio_loss``, negated).

  .. math:: \ell = -\beta\log\sigma\left(\log\frac{p_w}{1-p_w} - \log\frac{p_l}{1-p_l}\right),\quad \log p = \bar\ell

  The full ORPO objective is ``NLL(chosen) + orpo_loss``; TRL's ``beta`` is
  the paper's :math:`\lambda`.

  Args:
    chosen_logps, rejected_logps: ``[B]`` *average* per-token log-probs
      (:func:`alignax.policy.mean_logps`), which must be < 0.
    beta: weight :math:`\lambda` of the odds-ratio term.

  Returns:
    ``[B]`` per-pair losses.

  References:
    Hong et al., *ORPO: Monolithic Preference Optimization without Reference
    Model*, EMNLP 2024, eqs. (4), (7).
  """
  c, r = check_shapes(
      ("chosen_logps", "rejected_logps"), chosen_logps, rejected_logps)
  log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
  return -beta * jax.nn.log_sigmoid(log_odds)


def cpo_loss(chosen_logps: Array, rejected_logps: Array, *,
             beta: float = 0.1, label_smoothing: float = 0.0) -> Array:
  r"""CPO preference term (TRL ``CPOTrainer``, ``loss_type="sigmoid"``).

  .. math:: \ell = -(1-\epsilon)\log\sigma(\beta(\pi_w - \pi_l)) - \epsilon\log\sigma(-\beta(\pi_w - \pi_l))

  Reference-free DPO; the full CPO loss adds ``cpo_alpha`` (TRL default 1)
  times the chosen NLL.

  Args:
    chosen_logps, rejected_logps: ``[B]`` summed policy log-probs.
    beta: :math:`\beta`.
    label_smoothing: :math:`\epsilon`.

  Returns:
    ``[B]`` per-pair losses.

  References:
    Xu et al., *Contrastive Preference Optimization: Pushing the Boundaries
    of LLM Performance in Machine Translation*, ICML 2024, eq. (3).
  """
  return _preference.dpo_loss(chosen_logps, rejected_logps, 0.0, 0.0,
                              beta=beta, label_smoothing=label_smoothing)


def simpo_loss(chosen_logps: Array, rejected_logps: Array, *,
               beta: float = 0.1, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> Array:
  r"""SimPO (TRL ``CPOTrainer``, ``loss_type="simpo"``).

  .. math:: \ell = -(1-\epsilon)\log\sigma(\beta(\bar\pi_w - \bar\pi_l) - \gamma) - \epsilon\log\sigma(-\beta(\bar\pi_w - \bar\pi_l) + \gamma)

  Defaults are TRL's (``beta=0.1``, ``simpo_gamma=0.5``); the paper uses a
  much larger :math:`\beta` (about 2 to 2.5) with :math:`\gamma/\beta` of
  order 0.5.

  Args:
    chosen_logps, rejected_logps: ``[B]`` *average* per-token log-probs.
    beta: reward scale :math:`\beta`.
    gamma: target reward margin :math:`\gamma`.
    label_smoothing: :math:`\epsilon`.

  Returns:
    ``[B]`` per-pair losses.

  References:
    Meng et al., *SimPO: Simple Preference Optimization with a
    Reference-Free Reward*, NeurIPS 2024.
  """
  # TRL subtracts gamma / beta from the log-ratio, then scales by beta.
  return _preference.dpo_loss(chosen_logps, rejected_logps, gamma / beta, 0.0,
                              beta=beta, label_smoothing=label_smoothing)


def kto_kl_baseline(kl_logps: Array, ref_kl_logps: Array) -> Array:
  r"""KTO's reference point: batch KL estimate, clamped at 0, no gradient.

  .. math:: z_0 = \mathrm{sg}\left(\max\left(0,\ \tfrac1B\sum_i \log\pi(y'_i) - \log\pi_{ref}(y'_i)\right)\right)

  Args:
    kl_logps, ref_kl_logps: ``[B]`` policy/reference log-probs of mismatched
      (prompt, completion) pairs.

  Returns:
    a scalar.
  """
  kl_logps, ref_kl_logps = check_shapes(
      ("kl_logps", "ref_kl_logps"), kl_logps, ref_kl_logps)
  kl = jnp.maximum(jnp.mean(kl_logps - ref_kl_logps), 0.0)
  return jax.lax.stop_gradient(kl)


def kto_loss(logps: Array, ref_logps: Array, kl_logps: Array,
             ref_kl_logps: Array, desirable: Array, *, beta: float = 0.1,
             desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> Array:
  r"""Kahneman-Tversky optimisation (TRL ``KTOTrainer.kto_loss``).

  .. math:: \ell_i = \begin{cases} \lambda_D\,(1 - \sigma(\beta(\rho_i - z_0))) & \text{desirable} \\ \lambda_U\,(1 - \sigma(\beta(z_0 - \rho_i))) & \text{undesirable}\end{cases}

  with :math:`\rho = \log\pi - \log\pi_{ref}` and :math:`z_0` from
  :func:`kto_kl_baseline`. TRL concatenates desirable then undesirable
  losses; here they stay in input order (same mean).

  Args:
    logps, ref_logps: ``[B]`` policy/reference log-probs of the completions.
    kl_logps, ref_kl_logps: ``[B]`` log-probs of the mismatched KL pairs;
      pass equal arrays for TRL's ``calculate_KL=False`` (:math:`z_0 = 0`).
    desirable: ``[B]`` bool, True for desirable completions.
    beta: :math:`\beta`.
    desirable_weight, undesirable_weight: :math:`\lambda_D, \lambda_U`.

  Returns:
    ``[B]`` per-example losses.

  References:
    Ethayarajh et al., *KTO: Model Alignment as Prospect Theoretic
    Optimization*, ICML 2024, eq. (7).
  """
  logps, ref_logps, desirable = check_shapes(
      ("logps", "ref_logps", "desirable"), logps, ref_logps, desirable)
  kl = kto_kl_baseline(kl_logps, ref_kl_logps)
  rho = logps - ref_logps
  return jnp.where(
      desirable,
      desirable_weight * (1.0 - jax.nn.sigmoid(beta * (rho - kl))),
      undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (kl - rho))))


def bco_loss(logps: Array, ref_logps: Array, desirable: Array, *,
             beta: float = 0.1, delta: Array | float = 0.0) -> Array:
  r"""Unpaired binary classifier optimisation (TRL ``BCOTrainer.bco_loss``).

  .. math:: \ell_i = \begin{cases} -\log\sigma(\beta\rho_i - \delta) & \text{desirable} \\ -\log\sigma(-(\beta\rho_i - \delta)) & \text{undesirable}\end{cases}

  ``delta`` is the running mean of the rewards :math:`\beta\rho` over
  training, updated *before* the loss with
  :func:`bco_running_mean_update` on this batch's
  rewards. TRL's optional underlying-distribution-matching weights multiply
  the undesirable entries and are the caller's.

  Args:
    logps, ref_logps: ``[B]`` policy/reference log-probs of the completions.
    desirable: ``[B]`` bool.
    beta: :math:`\beta`.
    delta: scalar reward shift (treated as a constant).

  Returns:
    ``[B]`` per-example losses.

  References:
    Jung et al., *Binary Classifier Optimization for Large Language Model
    Alignment*, 2024.
  """
  logps, ref_logps, desirable = check_shapes(
      ("logps", "ref_logps", "desirable"), logps, ref_logps, desirable)
  z = beta * (logps - ref_logps) - jax.lax.stop_gradient(delta)
  return -jax.nn.log_sigmoid(jnp.where(desirable, z, -z))


def bco_running_mean_update(mean: Array, count: Array, rewards: Array, *,
                            weights: Array | None = None
                            ) -> tuple[Array, Array]:
  r"""Folds a batch of implicit rewards into BCO's running mean ``delta``.

  .. math:: n' = n + \sum_i w_i,\qquad \mu' = \mu + (\bar x_w - \mu)\,\textstyle\sum_i w_i / n'

  TRL's ``RunningMoments.update`` (start ``mu = 0, n = 0``). ``BCOTrainer``
  passes all chosen and rejected rewards ``beta * logratio`` (``|x|`` = their
  number); DPO ``bco_pair`` passed their batch mean, a scalar (``|x| = 1``).
  Both then use the *updated* mean as ``delta``.

  Args:
    mean: scalar running mean.
    count: scalar number of values folded in so far.
    rewards: rewards of this batch, any shape; no gradient flows.
    weights: optional per-reward weights of ``rewards``' shape (a 0/1 mask
      of the valid ones, or counts: a batch mean with weight ``n`` folds in
      like its ``n`` values); default all 1.

  Returns:
    ``(new_mean, new_count)``; unchanged when the weights sum to 0.
  """
  rewards = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32))
  weights = (jnp.ones_like(rewards) if weights is None
             else jax.lax.stop_gradient(
                 jnp.broadcast_to(jnp.asarray(weights, jnp.float32),
                                  rewards.shape)))
  n = jnp.sum(weights)
  new_count = count + n
  batch_mean = jnp.sum(weights * rewards) / jnp.maximum(n, 1e-30)
  new_mean = jnp.where(n > 0, mean + (batch_mean - mean) * n
                       / jnp.maximum(new_count, 1e-30), mean)
  return new_mean, new_count


def npo_loss(logps: Array, ref_logps: Array, *, beta: float = 0.1) -> Array:
  r"""Negative preference optimisation (unlearning) loss.

  .. math:: \ell = -\frac{2}{\beta}\log\sigma\left(-\beta(\log\pi - \log\pi_{ref})\right)

  Args:
    logps, ref_logps: ``[B]`` policy/reference log-probs of the completions
      to forget.
    beta: :math:`\beta`; as :math:`\beta\to0` the loss tends to gradient
      ascent on the log-likelihood.

  Returns:
    ``[B]`` per-example losses.

  References:
    Zhang et al., *Negative Preference Optimization: From Catastrophic
    Collapse to Effective Unlearning*, COLM 2024.
  """
  logps, ref_logps = check_shapes(("logps", "ref_logps"), logps, ref_logps)
  return -(2.0 / beta) * jax.nn.log_sigmoid(-beta * (logps - ref_logps))


def bradley_terry_loss(chosen_rewards: Array, rejected_rewards: Array, *,
                       margin: Array | float = 0.0,
                       center_coef: float = 0.0) -> Array:
  r"""Bradley–Terry reward-model loss (TRL ``RewardTrainer``).

  .. math:: \ell_i = -\log\sigma(r^c_i - r^r_i - m_i) + \lambda\,(r^c_i + r^r_i)^2

  Args:
    chosen_rewards, rejected_rewards: ``[B]`` scalar rewards of the preferred
      and dispreferred responses.
    margin: ``[B]`` or scalar margin ``m`` the preferred reward must win by
      (Llama 2's preference-strength margin); 0 = plain Bradley–Terry.
    center_coef: :math:`\lambda`, TRL's ``center_rewards_coefficient``
      (keeps rewards centred at 0); 0 = off.

  Returns:
    ``[B]`` per-pair losses.

  References:
    Bradley & Terry, *Rank Analysis of Incomplete Block Designs*, 1952;
    Ouyang et al., *Training language models to follow instructions with
    human feedback*, 2022.
  """
  chosen_rewards, rejected_rewards = check_shapes(
      ("chosen_rewards", "rejected_rewards"), chosen_rewards, rejected_rewards)
  loss = -jax.nn.log_sigmoid(chosen_rewards - rejected_rewards - margin)
  if center_coef:
    loss = loss + center_coef * (chosen_rewards + rejected_rewards) ** 2
  return loss
