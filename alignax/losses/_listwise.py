r"""Listwise preference losses on ``[B, K]`` lists of scored responses.

Each list holds K responses to one prompt with scores
:math:`s_i = \beta(\log\pi(y_i) - \log\pi_{ref}(y_i))` and graded labels
:math:`\psi_i` (higher is better), plus an optional ``where`` validity mask
(``[B, K]`` bool, like optax's ranking losses): an invalid entry behaves
exactly as if it were removed from its list. Losses are per list, ``[B]``
(any leading shape works; the list is the last axis). With K = 2 and labels
``(1, 0)`` each loss is its pairwise twin: DPO for the logistic, ListMLE,
softmax and (times a constant) LiPO-λ losses, SLiC's hinge for the hinge loss.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _check_list(scores, labels, where):
  """Validates shapes; masked scores/labels become 0 so no NaN can leak."""
  scores, labels = jnp.asarray(scores), jnp.asarray(labels)
  if scores.ndim < 1 or labels.shape != scores.shape:
    raise ValueError(
        f"scores and labels must both be [..., K]; got scores {scores.shape}"
        f" and labels {labels.shape}.")
  if where is None:
    where = jnp.ones(scores.shape, bool)
  where = jnp.asarray(where)
  if where.shape != scores.shape:
    raise ValueError(
        f"where has shape {where.shape}; expected {scores.shape}.")
  where = where.astype(bool)
  labels = jnp.where(where, labels.astype(scores.dtype), 0.0)
  return jnp.where(where, scores, 0.0), labels, where


def _pair_mask(labels: Array, where: Array) -> Array:
  """``[..., K, K]``: item i is labelled strictly better than item j."""
  both = where[..., :, None] & where[..., None, :]
  return both & (labels[..., :, None] > labels[..., None, :])


def _pair_diffs(scores: Array) -> Array:
  return scores[..., :, None] - scores[..., None, :]  # [..., K, K]: s_i - s_j


def _ranks(keys: Array, where: Array) -> Array:
  """1-based positions when sorting ``keys`` descending; invalid items last.

  Ties keep input order (stable sort), as TF-Ranking's ``sort_by_scores``
  without shuffling.
  """
  order = jnp.argsort(jnp.where(where, -keys, jnp.inf), axis=-1)
  return jnp.argsort(order, axis=-1) + 1


def _exp2_gain(labels: Array) -> Array:
  return 2.0 ** labels - 1.0


def _inverse_log_discount(ranks: Array) -> Array:
  return 1.0 / jnp.log1p(ranks)


def lipo_lambda_weights(
    scores: Array,
    labels: Array,
    *,
    where: Array | None = None,
    gain_fn: Callable[[Array], Array] = _exp2_gain,
    discount_fn: Callable[[Array], Array] = _inverse_log_discount,
    normalize: bool = False,
) -> Array:
  r"""LambdaLoss pair weights :math:`\Delta_{ij}` of LiPO-λ (no gradient).

  .. math:: \Delta_{ij} = |G_i - G_j|\ \left|\frac{1}{D(\tau_i)} - \frac{1}{D(\tau_j)}\right|\ [\psi_i > \psi_j]

  with :math:`G = 2^\psi - 1`, :math:`D(\tau) = \ln(1 + \tau)` and
  :math:`\tau` the 1-based rank under the current scores. These are the
  paper's choices (natural log, as TF-Ranking's ``log1p``; the base only
  rescales all weights) and LambdaMART's absolute-rank discount, i.e.
  TF-Ranking's ``DCGLambdaWeight`` with ``smooth_fraction=1``. LiPO's
  formula has no ideal-DCG normalisation, so ``normalize`` defaults to False;
  True multiplies the gains by 1 / maxDCG as TF-Ranking's NDCG lambda weight.

  Args:
    scores: ``[..., K]`` scores :math:`s`.
    labels: ``[..., K]`` graded labels :math:`\psi`.
    where: optional ``[..., K]`` validity mask.
    gain_fn: :math:`G`, elementwise on labels.
    discount_fn: :math:`1/D`, elementwise on float ranks (1-based).
    normalize: divide gains by the ideal DCG of the list.

  Returns:
    ``[..., K, K]`` weights, zero unless i is strictly preferred over j.
  """
  scores, labels, where = _check_list(scores, labels, where)
  gains = jnp.where(where, gain_fn(labels), 0.0)
  if normalize:
    ideal = discount_fn(_ranks(labels, where).astype(scores.dtype))
    max_dcg = jnp.sum(jnp.where(where, gains * ideal, 0.0), axis=-1)
    gains = gains * jnp.where(max_dcg > 0, 1.0 / max_dcg, 0.0)[..., None]
  discounts = discount_fn(_ranks(scores, where).astype(scores.dtype))
  delta = (jnp.abs(_pair_diffs(gains)) * jnp.abs(_pair_diffs(discounts)))
  return jax.lax.stop_gradient(
      jnp.where(_pair_mask(labels, where), delta, 0.0))


def lipo_lambda_loss(
    scores: Array,
    labels: Array,
    *,
    where: Array | None = None,
    gain_fn: Callable[[Array], Array] = _exp2_gain,
    discount_fn: Callable[[Array], Array] = _inverse_log_discount,
    normalize: bool = False,
) -> Array:
  r"""LiPO-λ: Lambda-weighted pairwise logistic loss over each list.

  .. math:: \ell = \sum_{i,j:\ \psi_i > \psi_j} \Delta_{ij} \log(1 + e^{-(s_i - s_j)})

  with :math:`\Delta` from :func:`lipo_lambda_weights` (held constant). At
  K = 2 with labels (1, 0) this is DPO times :math:`1/\ln 2 - 1/\ln 3`.

  Args:
    scores: ``[..., K]`` scores :math:`\beta(\log\pi - \log\pi_{ref})`.
    labels: ``[..., K]`` graded labels.
    where: optional ``[..., K]`` validity mask.
    gain_fn, discount_fn, normalize: see :func:`lipo_lambda_weights`.

  Returns:
    ``[...]`` per-list losses.

  References:
    Liu et al., *LiPO: Listwise Preference Optimization through
    Learning-to-Rank*, 2024 (arXiv 2402.01878), LiPO-λ;
    Wang et al., *The LambdaLoss Framework for Ranking Metric Optimization*,
    CIKM 2018.
  """
  delta = lipo_lambda_weights(scores, labels, where=where, gain_fn=gain_fn,
                              discount_fn=discount_fn, normalize=normalize)
  scores, _, _ = _check_list(scores, labels, where)
  return jnp.sum(delta * jax.nn.softplus(-_pair_diffs(scores)),
                 axis=(-2, -1))


def pairwise_logistic_loss(scores: Array, labels: Array, *,
                           where: Array | None = None) -> Array:
  r"""RankNet pairwise logistic loss, summed over preferred pairs.

  .. math:: \ell = \sum_{i,j:\ \psi_i > \psi_j} \log(1 + e^{-(s_i - s_j)})

  Args:
    scores: ``[..., K]`` scores.
    labels: ``[..., K]`` graded labels.
    where: optional ``[..., K]`` validity mask.

  Returns:
    ``[...]`` per-list losses (K = 2, labels (1, 0): DPO).

  References:
    Burges et al., *Learning to Rank using Gradient Descent*, ICML 2005.
  """
  scores, labels, where = _check_list(scores, labels, where)
  pair = jax.nn.softplus(-_pair_diffs(scores))
  return jnp.sum(jnp.where(_pair_mask(labels, where), pair, 0.0),
                 axis=(-2, -1))


def pairwise_hinge_loss(scores: Array, labels: Array, *,
                        where: Array | None = None,
                        margin: float = 1.0) -> Array:
  r"""Pairwise hinge loss, summed over preferred pairs.

  .. math:: \ell = \sum_{i,j:\ \psi_i > \psi_j} \max(0,\ m - (s_i - s_j))

  Args:
    scores: ``[..., K]`` scores.
    labels: ``[..., K]`` graded labels.
    where: optional ``[..., K]`` validity mask.
    margin: :math:`m`.

  Returns:
    ``[...]`` per-list losses (K = 2, labels (1, 0): SLiC hinge).

  References:
    Herbrich et al., *Large Margin Rank Boundaries for Ordinal Regression*,
    2000; Zhao et al., *SLiC-HF*, 2023.
  """
  scores, labels, where = _check_list(scores, labels, where)
  pair = jax.nn.relu(margin - _pair_diffs(scores))
  return jnp.sum(jnp.where(_pair_mask(labels, where), pair, 0.0),
                 axis=(-2, -1))


def list_mle_loss(scores: Array, labels: Array, *,
                  where: Array | None = None) -> Array:
  r"""ListMLE: negative Plackett-Luce log-likelihood of the label order.

  .. math:: \ell = \sum_{k=1}^{n} \left[\log\sum_{m \ge k} e^{s_{\pi(m)}} - s_{\pi(k)}\right]

  with :math:`\pi` sorting the valid items by label, descending; ties keep
  input order (deterministic, where TF-Ranking shuffles them).

  Args:
    scores: ``[..., K]`` scores.
    labels: ``[..., K]`` graded labels.
    where: optional ``[..., K]`` validity mask.

  Returns:
    ``[...]`` per-list losses (K = 2, labels (1, 0): DPO).

  References:
    Xia et al., *Listwise Approach to Learning to Rank: Theory and
    Algorithm*, ICML 2008.
  """
  scores, labels, where = _check_list(scores, labels, where)
  order = jnp.argsort(jnp.where(where, -labels, jnp.inf), axis=-1)
  sorted_valid = jnp.take_along_axis(where, order, axis=-1)
  # Invalid items sit at the end with score ~ -inf: they add exp(.) = 0.
  sorted_scores = jnp.where(
      sorted_valid, jnp.take_along_axis(scores, order, axis=-1),
      jnp.finfo(scores.dtype).min)
  tail_lse = jax.lax.cumlogsumexp(sorted_scores, axis=scores.ndim - 1,
                                  reverse=True)
  return jnp.sum(jnp.where(sorted_valid, tail_lse - sorted_scores, 0.0),
                 axis=-1)


def list_softmax_loss(scores: Array, labels: Array, *,
                      where: Array | None = None) -> Array:
  r"""Softmax cross-entropy between normalised labels and the scores.

  .. math:: \ell = -\sum_i \frac{\psi_i}{\sum_j \psi_j} \log\frac{e^{s_i}}{\sum_j e^{s_j}}

  Labels (non-negative) are normalised to sum to 1 per list as in
  TF-Ranking's ``SoftmaxLoss``; lists whose labels sum to 0 give 0. optax's
  ``ranking_softmax_loss`` uses raw labels, i.e. this loss times
  :math:`\sum_j\psi_j`.

  Args:
    scores: ``[..., K]`` scores.
    labels: ``[..., K]`` non-negative labels.
    where: optional ``[..., K]`` validity mask.

  Returns:
    ``[...]`` per-list losses (K = 2, labels (1, 0): DPO).

  References:
    Cao et al., *Learning to Rank: From Pairwise Approach to Listwise
    Approach* (ListNet), ICML 2007; Bruch et al., *An Analysis of the Softmax
    Cross Entropy Loss for Learning-to-Rank with Binary Relevance*, ICTIR
    2019.
  """
  scores, labels, where = _check_list(scores, labels, where)
  total = jnp.sum(labels, axis=-1, keepdims=True)
  probs = labels / jnp.where(total > 0, total, 1.0)
  log_probs = jax.nn.log_softmax(
      jnp.where(where, scores, jnp.finfo(scores.dtype).min), axis=-1)
  return -jnp.sum(jnp.where(where, probs * log_probs, 0.0), axis=-1)
