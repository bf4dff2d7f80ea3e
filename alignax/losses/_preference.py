r"""Pairwise preference losses: the DPO family of TRL's ``DPOTrainer``.

One function per TRL ``loss_type`` (``sigmoid`` is :func:`dpo_loss`). All
take the policy and reference log-probabilities of the chosen and rejected
completions, ``[B]`` each (any equal shapes work; reference arguments may be
the scalar ``0.`` for reference-free training), and return unreduced per-pair
losses; TRL's reduction is the mean. Throughout, with
:math:`c = \log\pi(y_w) - \log\pi_{ref}(y_w)` and
:math:`r = \log\pi(y_l) - \log\pi_{ref}(y_l)` the chosen/rejected log-ratios
and :math:`\Delta = c - r`.

f-divergences (TRL ``f_divergence_type``) replace the log-ratios by scores
before the loss; compose them as::

  c, r = logratios(pc, pr, rc, rr)
  c, r = js_divergence_scores(c, r)
  losses = dpo_loss(c, r, 0., 0., beta=0.1)

which is TRL's computation for every loss that reads its ``chosen_scores`` /
``rejected_scores`` (all but ``aot``, ``aot_unpaired``, ``apo_zero`` and
``apo_down``, which TRL always feeds plain log-ratios).

Formulas follow TRL's current ``DPOTrainer._compute_loss``
(``trl/trainer/dpo_trainer.py``), checked term by term in the tests.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
_PAIR_NAMES = (
    "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def check_shapes(names: Sequence[str], *arrays) -> list[Array]:
  """Arrays must share the first one's shape; later ones may be scalars.

  Shared by the loss modules of this package; raises a ``ValueError`` that
  names the offending argument and its shape.
  """
  arrays = [jnp.asarray(a) for a in arrays]
  shape = arrays[0].shape
  for name, a in zip(names[1:], arrays[1:]):
    if a.shape != shape and a.shape != ():
      raise ValueError(
          f"{name} has shape {a.shape}; expected {shape} (the shape of "
          f"{names[0]}) or a scalar.")
  return arrays


def logratios(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
) -> tuple[Array, Array]:
  r"""Chosen and rejected policy/reference log-ratios :math:`(c, r)`.

  Args:
    chosen_logps, rejected_logps: ``[B]`` policy log-probs of the completions.
    ref_chosen_logps, ref_rejected_logps: ``[B]`` (or scalar) reference
      log-probs.

  Returns:
    ``(c, r)``, each ``[B]``.
  """
  c, r, rc, rr = check_shapes(
      _PAIR_NAMES, chosen_logps, rejected_logps, ref_chosen_logps,
      ref_rejected_logps)
  return c - rc, r - rr


def _margin(*logps: Array) -> Array:
  c, r = logratios(*logps)
  return c - r  # [B]


def _sigmoid_loss(z: Array, label_smoothing: float) -> Array:
  # Conservative (cDPO) mix of the two label directions.
  return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z)
          - label_smoothing * jax.nn.log_sigmoid(-z))


def _per_token_margin(c, r, chosen_lengths, rejected_lengths) -> Array:
  """``c / max(1, L_w) - r / max(1, L_l)`` (TRL's ``clamp(min=1)``)."""
  for name, n in (("chosen_lengths", chosen_lengths),
                  ("rejected_lengths", rejected_lengths)):
    if jnp.shape(n) != c.shape:
      raise ValueError(f"{name} has shape {jnp.shape(n)}; expected {c.shape}.")
  return c / jnp.maximum(chosen_lengths, 1.0) - r / jnp.maximum(
      rejected_lengths, 1.0)


# --- f-divergence score transforms (TRL ``f_divergence_type``) --------------
# Each maps the log-ratios ``(c, r)``, ``[B]`` each, to the scores that replace
# them in the losses: f'(u) at u = pi / pi_ref, additive constants included as
# TRL keeps them (Wang et al., *Beyond Reverse KL: Generalizing Direct
# Preference Optimization with Diverse Divergence Constraints*, ICLR 2024). The
# constant cancels in ``c - r`` but not in the length-normalised losses
# (``ipo``, ``sigmoid_norm``), which divide each score by its own length.


def reverse_kl_scores(chosen_logratios, rejected_logratios):
  r"""Reverse KL, TRL's default: :math:`f'(u) = \log u`, scores = ``(c, r)``."""
  return jnp.asarray(chosen_logratios), jnp.asarray(rejected_logratios)


def forward_kl_scores(chosen_logratios, rejected_logratios):
  r"""Forward KL: :math:`f'(u) = 1 - 1/u \to` ``(1 - exp(-c), 1 - exp(-r))``."""
  return 1.0 - jnp.exp(-chosen_logratios), 1.0 - jnp.exp(-rejected_logratios)


def js_divergence_scores(chosen_logratios, rejected_logratios):
  r"""Jensen-Shannon: :math:`f'(u) = \log\frac{2u}{1+u} \to \log 2 + \log\sigma(c)`."""
  return (math.log(2.0) + jax.nn.log_sigmoid(chosen_logratios),
          math.log(2.0) + jax.nn.log_sigmoid(rejected_logratios))


def alpha_divergence_scores(chosen_logratios, rejected_logratios, *,
                            alpha: float = 0.5):
  r"""α-divergence: :math:`f'(u) = (u^{\alpha-1} - 1)/(\alpha - 1)`.

  .. math:: s(c) = \frac{\exp(\min((\alpha - 1) c,\ m)) - 1}{\alpha - 1}

  with TRL's overflow clamp :math:`m` (11 for float16, else 80); near
  :math:`\alpha = 1` it falls back to reverse KL, as TRL does.

  Args:
    chosen_logratios, rejected_logratios: ``[B]`` log-ratios ``(c, r)``.
    alpha: TRL's ``f_alpha_divergence_coef`` (TRL default 0.5).

  Returns:
    ``(chosen_scores, rejected_scores)``.
  """
  if abs(alpha - 1.0) < 1e-6:
    return reverse_kl_scores(chosen_logratios, rejected_logratios)

  def score(logratio):
    logratio = jnp.asarray(logratio)
    cap = 11.0 if logratio.dtype == jnp.float16 else 80.0
    # exp in at least float32, clamped so it survives the cast back.
    t = ((alpha - 1.0) * logratio).astype(
        jnp.promote_types(logratio.dtype, jnp.float32))
    return ((jnp.exp(jnp.minimum(t, cap)) - 1.0).astype(logratio.dtype)
            * (1.0 / (alpha - 1.0)))

  return score(chosen_logratios), score(rejected_logratios)


# --- TRL loss types -----------------------------------------------------------


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps,
             ref_rejected_logps, *, beta: float = 0.1,
             label_smoothing: float = 0.0) -> Array:
  r"""DPO (TRL ``sigmoid``), with conservative-DPO label smoothing.

  .. math:: \ell = -(1-\epsilon)\log\sigma(\beta\Delta) - \epsilon\log\sigma(-\beta\Delta)

  Args:
    chosen_logps, rejected_logps: ``[B]`` policy completion log-probs.
    ref_chosen_logps, ref_rejected_logps: ``[B]`` reference log-probs.
    beta: inverse temperature :math:`\beta`.
    label_smoothing: cDPO flip probability :math:`\epsilon` (0 = plain DPO,
      TRL's current ``sigmoid``; earlier TRL applied ``label_smoothing`` here).

  Returns:
    ``[B]`` per-pair losses.

  References:
    Rafailov et al., *Direct Preference Optimization*, NeurIPS 2023;
    Mitchell, *A note on DPO with noisy preferences* (cDPO), 2023.
  """
  margin = _margin(chosen_logps, rejected_logps, ref_chosen_logps,
                   ref_rejected_logps)
  return _sigmoid_loss(beta * margin, label_smoothing)


def hinge_loss(chosen_logps, rejected_logps, ref_chosen_logps,
               ref_rejected_logps, *, beta: float = 0.1) -> Array:
  r"""SLiC hinge loss (TRL ``hinge``).

  .. math:: \ell = \max(0,\ 1 - \beta\Delta)

  Args: as :func:`dpo_loss`. Returns: ``[B]``.

  References:
    Zhao et al., *SLiC-HF: Sequence Likelihood Calibration with Human
    Feedback*, 2023.
  """
  margin = _margin(chosen_logps, rejected_logps, ref_chosen_logps,
                   ref_rejected_logps)
  return jax.nn.relu(1.0 - beta * margin)


def ipo_loss(chosen_logps, rejected_logps, ref_chosen_logps,
             ref_rejected_logps, *, beta: float = 0.1, chosen_lengths,
             rejected_lengths) -> Array:
  r"""IPO (TRL ``ipo``) on per-token averaged log-ratios.

  .. math:: \ell = \left(\frac{c}{\max(1,L_w)} - \frac{r}{\max(1,L_l)} - \frac{1}{2\beta}\right)^2

  TRL divides the summed log-ratios by the completion lengths (a choice the
  IPO authors confirmed to TRL; the paper's numbers use it).

  Args:
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: as
      :func:`dpo_loss` (summed log-probs).
    beta: the IPO regulariser :math:`\tau`.
    chosen_lengths, rejected_lengths: ``[B]`` completion token counts.

  Returns:
    ``[B]`` per-pair losses.

  References:
    Azar et al., *A General Theoretical Paradigm to Understand Learning from
    Human Preferences*, AISTATS 2024, eq. (17).
  """
  c, r = logratios(chosen_logps, rejected_logps, ref_chosen_logps,
                   ref_rejected_logps)
  delta = _per_token_margin(c, r, chosen_lengths, rejected_lengths)
  return (delta - 1.0 / (2.0 * beta)) ** 2


def sigmoid_norm_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                      ref_rejected_logps, *, beta: float = 0.1,
                      chosen_lengths, rejected_lengths) -> Array:
  r"""Length-normalised DPO (TRL ``sigmoid_norm``).

  .. math:: \ell = -\log\sigma\left(\beta\left[\frac{c}{\max(1,L_w)} - \frac{r}{\max(1,L_l)}\right]\right)

  Args: as :func:`ipo_loss`. Returns: ``[B]``.

  References:
    Meng et al., *SimPO*, NeurIPS 2024 (length normalisation); Lambert et
    al., *Tülu 3*, 2024 (length-normalised DPO).
  """
  c, r = logratios(chosen_logps, rejected_logps, ref_chosen_logps,
                   ref_rejected_logps)
  delta = _per_token_margin(c, r, chosen_lengths, rejected_lengths)
  return -jax.nn.log_sigmoid(beta * delta)


def exo_pair_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                  ref_rejected_logps, *, beta: float = 0.1,
                  epsilon: float = 1e-3) -> Array:
  r"""EXO for pairs (TRL ``exo_pair``): KL(pair softmax || smoothed labels).

  .. math:: \ell = \sigma(z)[\log\sigma(z) - \log(1-\epsilon)] + \sigma(-z)[\log\sigma(-z) - \log\epsilon],\quad z = \beta\Delta

  Args:
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: as
      :func:`dpo_loss`.
    beta: :math:`\beta`.
    epsilon: label smoothing in (0, 1); TRL substitutes 1e-3 for 0.

  Returns:
    ``[B]`` per-pair losses.

  References:
    Ji et al., *Towards Efficient Exact Optimization of Language Model
    Alignment*, ICML 2024, eq. (16).
  """
  z = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps,
                     ref_rejected_logps)
  return (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-epsilon))
          + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - jnp.log(epsilon)))


def nca_pair_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                  ref_rejected_logps, *, beta: float = 0.1) -> Array:
  r"""NCA for pairs (TRL ``nca_pair``).

  .. math:: \ell = -\log\sigma(\beta c) - \tfrac12\log\sigma(-\beta c) - \tfrac12\log\sigma(-\beta r)

  Args: as :func:`hinge_loss`. Returns: ``[B]``.

  References:
    Chen et al., *Noise Contrastive Alignment of Language Models with
    Explicit Rewards*, 2024.
  """
  c, r = logratios(chosen_logps, rejected_logps, ref_chosen_logps,
                   ref_rejected_logps)
  return (-jax.nn.log_sigmoid(beta * c) - 0.5 * jax.nn.log_sigmoid(-beta * c)
          - 0.5 * jax.nn.log_sigmoid(-beta * r))


def robust_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                ref_rejected_logps, *, beta: float = 0.1,
                label_smoothing: float = 0.0) -> Array:
  r"""Robust DPO (TRL ``robust``): unbiased under label-flip rate ε < 1/2.

  .. math:: \ell = \frac{-(1-\epsilon)\log\sigma(\beta\Delta) + \epsilon\log\sigma(-\beta\Delta)}{1 - 2\epsilon}

  Args: as :func:`dpo_loss`. Returns: ``[B]``.

  References:
    Chowdhury et al., *Provably Robust DPO*, ICML 2024.
  """
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"label_smoothing must be in [0, 0.5), got "
                     f"{label_smoothing}.")
  z = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps,
                     ref_rejected_logps)
  return ((-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z)
           + label_smoothing * jax.nn.log_sigmoid(-z))
          / (1.0 - 2.0 * label_smoothing))


def bco_pair_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                  ref_rejected_logps, *, beta: float = 0.1,
                  delta: Array | float = 0.0) -> Array:
  r"""Binary classifier optimisation on pairs (TRL ``bco_pair``).

  .. math:: \ell = -\log\sigma(\beta c - \delta) - \log\sigma(-(\beta r - \delta))

  ``delta``, the running mean of the implicit rewards, is an input (see
  ``bco_running_mean_update``); TRL's current ``DPOTrainer`` uses
  ``delta = 0``, earlier versions and ``BCOTrainer`` the running mean.

  Args:
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: as
      :func:`dpo_loss`.
    beta: :math:`\beta`.
    delta: scalar reward shift :math:`\delta` (treated as a constant).

  Returns:
    ``[B]`` per-pair losses.

  References:
    Jung et al., *Binary Classifier Optimization for Large Language Model
    Alignment*, 2024.
  """
  c, r = logratios(chosen_logps, rejected_logps, ref_chosen_logps,
                   ref_rejected_logps)
  delta = jax.lax.stop_gradient(delta)
  return (-jax.nn.log_sigmoid(beta * c - delta)
          - jax.nn.log_sigmoid(-(beta * r - delta)))


def sppo_hard_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                   ref_rejected_logps, *, beta: float = 0.1) -> Array:
  r"""SPPO with hard win probabilities (TRL ``sppo_hard``).

  .. math:: \ell = \left(c - \frac{1}{2\beta}\right)^2 + \left(r + \frac{1}{2\beta}\right)^2

  Args: as :func:`hinge_loss`. Returns: ``[B]``.

  References:
    Wu et al., *Self-Play Preference Optimization for Language Model
    Alignment*, 2024, eq. (4.7) with P = 1 / 0.
  """
  c, r = logratios(chosen_logps, rejected_logps, ref_chosen_logps,
                   ref_rejected_logps)
  return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2


def aot_loss(chosen_logps, rejected_logps, ref_chosen_logps,
             ref_rejected_logps, *, beta: float = 0.1,
             label_smoothing: float = 0.0) -> Array:
  r"""Alignment via optimal transport, paired (TRL ``aot``).

  .. math:: \ell_i = -(1-\epsilon)\log\sigma(\beta d_i) - \epsilon\log\sigma(-\beta d_i),\quad d = \mathrm{sort}(\pi_w - \pi_l) - \mathrm{sort}(\pi^{ref}_w - \pi^{ref}_l)

  Sorting couples the batch: entry ``i`` belongs to the ``i``-th quantile,
  not to pair ``i``; only the batch mean is meaningful.

  Args: as :func:`dpo_loss`, over a 1-D batch. Returns: ``[B]``.

  References:
    Melnyk et al., *Distributional Preference Alignment of LLMs via Optimal
    Transport*, 2024.
  """
  c, r, rc, rr = check_shapes(_PAIR_NAMES, chosen_logps, rejected_logps,
                               ref_chosen_logps, ref_rejected_logps)
  if c.ndim != 1:
    raise ValueError(f"aot_loss needs a [B] batch, got {c.shape}.")
  d = jnp.sort(c - r) - jnp.sort(jnp.broadcast_to(rc - rr, c.shape))
  return _sigmoid_loss(beta * d, label_smoothing)


def aot_unpaired_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                      ref_rejected_logps, *, beta: float = 0.1,
                      label_smoothing: float = 0.0) -> Array:
  r"""Alignment via optimal transport, unpaired (TRL ``aot_unpaired``).

  .. math:: \ell_i = -(1-\epsilon)\log\sigma(\beta d_i) - \epsilon\log\sigma(-\beta d_i),\quad d = \mathrm{sort}(c) - \mathrm{sort}(r)

  Args: as :func:`aot_loss`. Returns: ``[B]`` (quantile-ordered).

  References:
    Melnyk et al., 2024, see :func:`aot_loss`.
  """
  c, r = logratios(chosen_logps, rejected_logps, ref_chosen_logps,
                   ref_rejected_logps)
  if c.ndim != 1:
    raise ValueError(f"aot_unpaired_loss needs a [B] batch, got {c.shape}.")
  d = jnp.sort(c) - jnp.sort(r)
  return _sigmoid_loss(beta * d, label_smoothing)


def apo_zero_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                  ref_rejected_logps, *, beta: float = 0.1) -> Array:
  r"""Anchored preference optimisation, zero anchor (TRL ``apo_zero``).

  .. math:: \ell = 1 - \sigma(\beta c) + \sigma(\beta r)

  Use when the chosen outputs are better than the model's own.

  Args: as :func:`hinge_loss`. Returns: ``[B]``.

  References:
    D'Oosterlinck et al., *Anchored Preference Optimization and Contrastive
    Revisions*, 2024, eq. (7).
  """
  c, r = logratios(chosen_logps, rejected_logps, ref_chosen_logps,
                   ref_rejected_logps)
  return 1.0 - jax.nn.sigmoid(beta * c) + jax.nn.sigmoid(beta * r)


def apo_down_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                  ref_rejected_logps, *, beta: float = 0.1) -> Array:
  r"""Anchored preference optimisation, down anchor (TRL ``apo_down``).

  .. math:: \ell = \sigma(\beta c) + 1 - \sigma(\beta\Delta)

  Use when the chosen outputs are worse than the model's own.

  Args: as :func:`hinge_loss`. Returns: ``[B]``.

  References:
    D'Oosterlinck et al., 2024, eq. (8), see :func:`apo_zero_loss`.
  """
  c, r = logratios(chosen_logps, rejected_logps, ref_chosen_logps,
                   ref_rejected_logps)
  return jax.nn.sigmoid(beta * c) + 1.0 - jax.nn.sigmoid(beta * (c - r))


def discopop_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                  ref_rejected_logps, *, beta: float = 0.1,
                  tau: float = 0.05) -> Array:
  r"""DiscoPOP log-ratio modulated loss (TRL ``discopop``).

  .. math:: \ell = (1 - m)(-\log\sigma(z)) + m\,e^{-z},\quad z = \beta\Delta,\ m = \sigma(z/\tau)

  Args:
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: as
      :func:`dpo_loss`.
    beta: :math:`\beta`.
    tau: modulation temperature (TRL ``discopop_tau``, default 0.05).

  Returns:
    ``[B]`` per-pair losses.

  References:
    Chris Lu et al., *Discovering Preference Optimization Algorithms with
    and for Large Language Models*, 2024, eq. (5).
  """
  z = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps,
                     ref_rejected_logps)
  m = jax.nn.sigmoid(z / tau)
  return (1.0 - m) * -jax.nn.log_sigmoid(z) + m * jnp.exp(-z)


def modpo_loss(chosen_logps, rejected_logps, ref_chosen_logps,
               ref_rejected_logps, chosen_margin_rewards,
               rejected_margin_rewards, *, beta: float = 0.1,
               weights) -> Array:
  r"""Multi-objective DPO: DPO corrected by the other objectives' rewards.

  .. math:: \ell = -\log\sigma\left(\frac{\beta}{w_0}\Delta - \frac{1}{w_0} w_{1:}^\top (R_w - R_l)\right)

  Args:
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: as
      :func:`dpo_loss`, ``[B]``.
    chosen_margin_rewards, rejected_margin_rewards: ``[B, M]`` rewards of the
      M other objectives (fixed reward models), carried in the data.
    beta: :math:`\beta`.
    weights: ``[M + 1]`` objective weights; ``weights[0]`` is the objective
      this policy's log-ratios model. M = 0 with ``weights=[1.]`` is DPO.

  Returns:
    ``[B]`` per-pair losses.

  References:
    Zhou et al., *Beyond One-Preference-Fits-All Alignment: Multi-Objective
    Direct Preference Optimization*, 2023 (arXiv 2310.03708).
  """
  margin = _margin(chosen_logps, rejected_logps, ref_chosen_logps,
                   ref_rejected_logps)
  rw = jnp.asarray(chosen_margin_rewards)
  rl = jnp.asarray(rejected_margin_rewards)
  weights = jnp.asarray(weights)
  if weights.ndim != 1 or weights.shape[0] < 1:
    raise ValueError(f"weights must be [M + 1], got {weights.shape}.")
  expected = margin.shape + (weights.shape[0] - 1,)
  for name, x in (("chosen_margin_rewards", rw),
                  ("rejected_margin_rewards", rl)):
    if x.shape != expected:
      raise ValueError(
          f"{name} has shape {x.shape}; expected {expected} (logps shape + "
          f"[M] with M = len(weights) - 1 = {expected[-1]}).")
  reward_margin = (rw - rl) @ weights[1:]  # [B, M] @ [M] -> [B]
  return -jax.nn.log_sigmoid((beta * margin - reward_margin) / weights[0])


# --- auxiliary terms and combination ------------------------------------------


def sft_loss(chosen_logps: Array, chosen_lengths: Array) -> Array:
  r"""Chosen-completion NLL (TRL ``sft`` loss type and ``rpo_alpha`` term).

  .. math:: \ell_i = -\frac{B\, \log\pi(y_{w,i})}{\sum_j L_{w,j}}

  TRL's term is the token-mean cross-entropy over all chosen tokens of the
  batch; ``mean_i(ell_i)`` equals it exactly, so per-pair sums such as
  ``dpo_loss + rpo_alpha * sft_loss`` keep TRL's mean. Each entry depends on
  the whole batch through the token count.

  Args:
    chosen_logps: ``[B]`` summed chosen log-probs.
    chosen_lengths: ``[B]`` chosen completion token counts.

  Returns:
    ``[B]`` per-pair shares of the NLL.

  References:
    Pang et al., *Iterative Reasoning Preference Optimization* (RPO), 2024;
    Wang et al., *Mixed Preference Optimization* (MPO), 2024.
  """
  c, n = check_shapes(("chosen_logps", "chosen_lengths"), chosen_logps,
                       chosen_lengths)
  total = jnp.maximum(jnp.sum(jnp.broadcast_to(n, c.shape)), 1.0)
  return -c * c.size / total


def weighted_sum(losses: Sequence[Array], weights: Sequence[float]) -> Array:
  r"""Per-pair weighted sum (TRL lists of ``loss_type`` and ``loss_weights``).

  .. math:: \ell_i = \sum_k w_k\, \ell^{(k)}_i

  The mean of the result is TRL's ``sum_k w_k mean(loss_k)``; e.g. MPO is
  ``weighted_sum([dpo, bco_pair, sft], [0.8, 0.2, 1.0])``.

  Args:
    losses: K per-pair loss arrays of equal shape.
    weights: K weights.

  Returns:
    the combined per-pair losses.
  """
  if len(losses) != len(weights) or not losses:
    raise ValueError(f"need as many losses ({len(losses)}) as weights "
                     f"({len(weights)}), at least one.")
  names = [f"losses[{k}]" for k in range(len(losses))]
  losses = check_shapes(names, *losses)
  return sum(w * l for w, l in zip(weights, losses))
