r"""Online policy-gradient losses: the GRPO family, RLOO and DisCO.

Inputs are per-token arrays of the sampled completions, one row per sample:
``logps`` (the policy being trained), ``old_logps`` (the policy that sampled,
:math:`\pi_{old}`), ``ref_logps`` (the reference), each ``[B, T]`` and
aligned with ``mask`` ``[B, T]`` (1 on completion tokens, 0 on prompt and
padding; masked entries may hold anything, even ``-inf``). Rows come in
groups of ``G = num_generations`` samples of one prompt, prompt-major (rows
``q * G .. q * G + G - 1`` answer prompt ``q``), as TRL lays them out.

The GRPO formulas transcribe TRL's ``GRPOTrainer._compute_loss`` and the
advantages its ``_generate_and_score_completions``
(``trl/trainer/grpo_trainer.py``); RLOO transcribes ``RLOOTrainer``
(``trl/trainer/rloo_trainer.py``); both read at huggingface/trl commit
``f2cd57710ae345ea6428ae95363267fcf38a3dc8`` (2026-07-24, version
1.10.0.dev0). DisCO follows Li et al. (2025) and the authors' code
(Optimization-AI/DisCO, ``verl/verl/trainer/ppo/core_algos.py``).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
DISCO_SCORES = ("log_l", "l_ratio")


def _float(x) -> Array:
  """At least float32 (bf16 log-probs are upcast; float64 stays)."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype.itemsize < 4:
    x = x.astype(jnp.float32)
  return x


def _check_tokens(fn: str, mask, **arrays) -> None:
  """Every array ``[B, T]`` like ``mask`` (``None`` = not given)."""
  shape = np.shape(mask)
  if len(shape) != 2:
    raise ValueError(f"{fn}: mask must be [B, T], got shape {shape}.")
  for name, x in arrays.items():
    if x is not None and np.shape(x) != shape:
      raise ValueError(f"{fn}: {name} shape {np.shape(x)} must equal the "
                       f"mask shape {shape} ([B, T]).")


def _check_rows(fn: str, name: str, x, batch: int, *, per_token_ok=False):
  shape = np.shape(x)
  if shape == (batch,) or (per_token_ok and len(shape) == 2
                           and shape[0] == batch):
    return
  want = f"[{batch}]" + (f" or [{batch}, T]" if per_token_ok else "")
  raise ValueError(f"{fn}: {name} shape {shape} must be {want}.")


def _groups(fn: str, rewards, num_generations: int) -> Array:
  """``[N] -> [N / G, G]`` (prompt-major groups)."""
  rewards = _float(rewards)
  if rewards.ndim != 1 or num_generations < 1 or (
      rewards.shape[0] % num_generations):
    raise ValueError(
        f"{fn}: rewards shape {rewards.shape} must be [N] with N a multiple "
        f"of num_generations={num_generations}.")
  return rewards.reshape(-1, num_generations)


def _nanstd(x: Array, axis=None, keepdims=False) -> Array:
  """TRL's ``nanstd``: Bessel-corrected, NaN where fewer than 2 values."""
  count = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True)
  mean = jnp.nanmean(x, axis=axis, keepdims=True)
  var = jnp.nanmean((x - mean) ** 2, axis=axis, keepdims=True)
  var = jnp.where(count > 1, var * count / jnp.maximum(count - 1, 1), jnp.nan)
  std = jnp.sqrt(var)
  return std if keepdims else jnp.squeeze(std, axis=axis)


def _masked(x: Array, mask: Array) -> Array:
  """``x`` where ``mask`` is nonzero, else 0 (a masked ``-inf`` stays out)."""
  return jnp.where(mask != 0, x, 0.0)


def _row_sums(x: Array, mask: Array) -> Array:
  return jnp.sum(_masked(x, mask) * mask, axis=-1)


# --- advantages ------------------------------------------------------------------


def group_advantages(rewards, *, num_generations: int,
                     scale_rewards: str = "group", eps: float = 1e-4) -> Array:
  r"""GRPO's group-relative advantages (TRL ``scale_rewards``).

  .. math::
    A_{q,j} = \frac{r_{q,j} - \operatorname{mean}_{j'} r_{q,j'}}{\sigma + 10^{-4}}

  with :math:`\sigma` the Bessel-corrected standard deviation of the group
  (``'group'``), of the whole batch (``'batch'``, PPO-Lite), or no division
  at all (``'none'``: Dr. GRPO, which removes the question-level difficulty
  bias). NaN rewards (unscorable samples) are left out of the means and
  deviations and get advantage 0, as in TRL.

  Args:
    rewards: ``[N]`` rewards, ``N = Q * G``, prompt-major groups.
    num_generations: ``G``, samples per prompt.
    scale_rewards: ``'group'``, ``'batch'`` or ``'none'``.
    eps: added to the deviation (TRL's ``1e-4``).

  Returns:
    ``[N]`` advantages.

  References:
    Shao et al., 2024, DeepSeekMath (GRPO); Liu et al., 2025, Understanding
    R1-Zero-Like Training (Dr. GRPO).
  """
  grouped = _groups("group_advantages", rewards, num_generations)  # [Q, G]
  if scale_rewards not in SCALE_REWARDS:
    raise ValueError(f"group_advantages: scale_rewards={scale_rewards!r}; "
                     f"use one of {SCALE_REWARDS}.")
  centred = grouped - jnp.nanmean(grouped, axis=1, keepdims=True)
  if scale_rewards == "group":
    std = (_nanstd(grouped, axis=1, keepdims=True) if num_generations > 1
           else jnp.zeros_like(grouped))
    centred = centred / (std + eps)
  elif scale_rewards == "batch":
    std = _nanstd(grouped) if grouped.size > 1 else jnp.zeros(())
    centred = centred / (std + eps)
  return jnp.nan_to_num(centred.reshape(-1), nan=0.0)


def rloo_advantages(rewards, *, num_generations: int, normalize: bool = False,
                    eps: float = 1e-4) -> Array:
  r"""RLOO's leave-one-out advantages (TRL ``RLOOTrainer``).

  .. math::
    A_{q,j} = r_{q,j} - \frac{1}{G - 1}\sum_{j' \ne j} r_{q,j'}

  then, with ``normalize``, standardised over the batch:
  :math:`(A - \bar A)/(\sigma_A + 10^{-4})`. The KL penalty of RLOO lives
  in the reward (:func:`kl_penalized_rewards`). NaN rewards are left out of
  the baselines (the divisor counts the scorable siblings) and get 0.

  Args:
    rewards: ``[N]`` rewards, ``N = Q * G``, prompt-major groups.
    num_generations: ``G``.
    normalize: TRL ``normalize_advantages``.
    eps: added to the deviation.

  Returns:
    ``[N]`` advantages.

  References:
    Ahmadian et al., 2024, Back to Basics: Revisiting REINFORCE Style
    Optimization for Learning from Human Feedback in LLMs.
  """
  grouped = _groups("rloo_advantages", rewards, num_generations)  # [Q, G]
  if num_generations == 1:
    adv = jnp.where(jnp.isnan(grouped), jnp.nan, 0.0)
  else:
    count = jnp.sum(~jnp.isnan(grouped), axis=1, keepdims=True)
    total = jnp.nansum(grouped, axis=1, keepdims=True)
    adv = grouped - (total - grouped) / (count - 1)
  adv = adv.reshape(-1)
  if normalize:
    adv = (adv - jnp.nanmean(adv)) / (_nanstd(adv) + eps)
  return jnp.nan_to_num(adv, nan=0.0)


def kl_penalized_rewards(rewards, old_logps, ref_logps, mask, *,
                         beta: float) -> Array:
  r"""RLOO's rewards with the sequence KL folded in (TRL ``RLOOTrainer``).

  .. math:: \tilde r_i = r_i - \beta \sum_t m_{i,t}
            (\log\pi_{old}(y_{i,t}) - \log\pi_{ref}(y_{i,t}))

  Takes ``rewards`` ``[B]``, the rest ``[B, T]``; returns ``[B]``.
  """
  mask = _float(mask)
  _check_tokens("kl_penalized_rewards", mask, old_logps=old_logps,
                ref_logps=ref_logps)
  _check_rows("kl_penalized_rewards", "rewards", rewards, mask.shape[0])
  kl = _row_sums(_float(old_logps) - _float(ref_logps), mask)
  return _float(rewards) - beta * kl


# --- GRPO family -------------------------------------------------------------------


def log_importance_weights(logps, old_logps, mask, *,
                           level: str = "token") -> Array:
  r"""Log importance ratios: per token, or GSPO's per sequence.

  .. math::
    \log w_{i,t} = \log\pi(y_{i,t}) - \log\pi_{old}(y_{i,t}), \qquad
    \log w_i = \frac{\sum_t m_{i,t} \log w_{i,t}}{\max(1, \sum_t m_{i,t})}

  Args:
    logps, old_logps, mask: ``[B, T]``.
    level: ``'token'`` or ``'sequence'`` (Zheng et al., 2025, GSPO).

  Returns:
    ``[B, T]`` (token; 0 on masked tokens) or ``[B, 1]`` (sequence).
  """
  mask = _float(mask)
  _check_tokens("log_importance_weights", mask, logps=logps,
                old_logps=old_logps)
  log_ratio = (_masked(_float(logps), mask)
               - _masked(_float(old_logps), mask))  # [B, T], 0 where masked
  if level == "token":
    return log_ratio
  if level == "sequence":
    lengths = jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0)
    return jnp.sum(log_ratio * mask, -1, keepdims=True) / lengths  # [B, 1]
  raise ValueError(f"log_importance_weights: level={level!r}; use one of "
                   f"{IMPORTANCE_SAMPLING_LEVELS}.")


def k3_kl(logps, ref_logps) -> Array:
  r"""Schulman's k3 estimator of :math:`KL(\pi \| \pi_{ref})` per token.

  .. math:: k_3 = e^{\log\pi_{ref} - \log\pi} - (\log\pi_{ref} - \log\pi) - 1

  Elementwise on log-probs of the sampled tokens; each estimate is >= 0.
  """
  d = _float(ref_logps) - _float(logps)
  return jnp.exp(d) - d - 1.0


def clipped_surrogate(coef, advantages, *, epsilon_low: float,
                      epsilon_high: float, delta: float | None = None):
  r"""PPO's clipped objective, negated (GRPO, DAPO's asymmetric clip).

  .. math:: \ell = -\min(\min(w, \delta) A,\;
            \operatorname{clip}(w, 1 - \epsilon_{low}, 1 + \epsilon_{high}) A)

  (``delta``: INTELLECT-2's two-sided clip; ``None`` = off.)
  """
  clipped = jnp.clip(coef, 1.0 - epsilon_low, 1.0 + epsilon_high)
  if delta is not None:
    coef = jnp.minimum(coef, delta)
  return -jnp.minimum(coef * advantages, clipped * advantages)


def cispo_surrogate(coef, advantages, logps, *, epsilon_high: float):
  r"""CISPO (MiniMax-M1): a clipped, constant weight on the log-prob.

  .. math:: \ell = -\operatorname{sg}(\min(w, \epsilon_{max}))\,A\,\log\pi

  (``sg``: stop-gradient; TRL passes ``epsilon_high`` as
  :math:`\epsilon_{max}`.)
  """
  weight = jax.lax.stop_gradient(jnp.minimum(coef, epsilon_high))
  return -weight * advantages * logps


def sapo_surrogate(coef, advantages, *, temperature_pos: float,
                   temperature_neg: float):
  r"""SAPO's soft gate instead of a hard clip (Gao et al., 2025).

  .. math:: \ell = -\frac{4}{\tau}\sigma(\tau (w - 1)) A, \qquad
            \tau = \tau_{pos} \text{ if } A > 0 \text{ else } \tau_{neg}
  """
  t = jnp.where(advantages > 0, temperature_pos, temperature_neg)
  return -jax.nn.sigmoid(t * (coef - 1.0)) * 4.0 / t * advantages


# loss_type -> TRL's reduction as per-row (sums, counts), from the rows'
# token sums s, completion lengths n and dr_grpo's constant length.
_REDUCTIONS: dict[str, Callable] = {
    "grpo": lambda s, n, _: (s / jnp.maximum(n, 1.0), jnp.ones_like(n)),
    "sapo": lambda s, n, _: (s / jnp.maximum(n, 1.0), jnp.ones_like(n)),
    "dr_grpo": lambda s, n, length: (s / length, jnp.ones_like(n)),
    "bnpo": lambda s, n, _: (s, n),
    "dapo": lambda s, n, _: (s, n),
    "cispo": lambda s, n, _: (s, n),
}


def _grpo_check(mask, logps, old_logps, ref_logps, advantages, loss_type,
                importance_sampling_level, beta, max_completion_length):
  _check_tokens("grpo_loss", mask, logps=logps, old_logps=old_logps,
                ref_logps=ref_logps)
  _check_rows("grpo_loss", "advantages", advantages, mask.shape[0],
              per_token_ok=True)
  if jnp.ndim(advantages) == 2 and np.shape(advantages) != mask.shape:
    raise ValueError(f"grpo_loss: advantages shape {np.shape(advantages)} "
                     f"must be [B] or the mask shape {mask.shape}.")
  if loss_type not in GRPO_LOSS_TYPES:
    raise ValueError(f"grpo_loss: loss_type={loss_type!r}; use one of "
                     f"{GRPO_LOSS_TYPES}.")
  if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
    raise ValueError(f"grpo_loss: importance_sampling_level="
                     f"{importance_sampling_level!r}; use one of "
                     f"{IMPORTANCE_SAMPLING_LEVELS}.")
  if beta and ref_logps is None:
    raise ValueError(f"grpo_loss: beta={beta} needs ref_logps [B, T].")
  if loss_type == "dr_grpo" and not max_completion_length:
    raise ValueError("grpo_loss: loss_type='dr_grpo' needs "
                     "max_completion_length > 0.")


def grpo_loss(
    logps, old_logps, ref_logps, advantages, mask, *,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    bias_correction_kl: bool = False,
) -> tuple[Array, Array]:
  r"""The GRPO family of TRL's ``GRPOTrainer`` (every ``loss_type``).

  With :math:`w` the importance ratio (:func:`log_importance_weights`:
  per token, or GSPO's length-normalised sequence ratio) and :math:`A_i` the
  advantage, the per-token loss is

  .. math::
    \ell_{i,t} = s(w_{i,t}, A_i) + \beta\,k_3(\pi, \pi_{ref})_{i,t}

  where :math:`s` is :func:`clipped_surrogate` (grpo, bnpo, dr_grpo, dapo),
  :func:`cispo_surrogate` or :func:`sapo_surrogate`; ``bias_correction_kl``
  multiplies :math:`k_3` by :math:`w`. TRL's reductions, with
  :math:`n_i = \sum_t m_{i,t}` and :math:`S_i = \sum_t m_{i,t}\ell_{i,t}`:

  .. math::
    \text{grpo, sapo: } \frac{1}{B}\sum_i \frac{S_i}{\max(1, n_i)}, \quad
    \text{dr\_grpo: } \frac{\sum_i S_i}{B\,L_{max}}, \quad
    \text{bnpo, dapo, cispo: } \frac{\sum_i S_i}{\max(1, \sum_i n_i)}

  Returned as per-row ``(sums, counts)`` so that the batch loss is
  ``sum(sums) / max(sum(counts), 1)``: ``(S_i / max(1, n_i), 1)``,
  ``(S_i / L_max, 1)`` or ``(S_i, n_i)``. The reduction is the caller's,
  and where it runs is what tells the token-normalised types apart: DAPO and
  CISPO divide by the tokens of the whole accumulated, all-process batch
  (sum the pairs over microbatches and hosts), bnpo by each local
  (micro)batch's own tokens (reduce each microbatch, then average).

  Args:
    logps: ``[B, T]`` the policy's log-probs of the sampled tokens.
    old_logps: ``[B, T]`` the sampling policy's (``stop_gradient(logps)``
      when ``num_iterations == 1``).
    ref_logps: ``[B, T]`` the reference's, or ``None`` when ``beta == 0``.
    advantages: ``[B]`` (or ``[B, T]``) advantages, e.g.
      :func:`group_advantages`.
    mask: ``[B, T]`` completion mask.
    loss_type: one of ``GRPO_LOSS_TYPES``.
    epsilon_low, epsilon_high: clip range ``[1 - lo, 1 + hi]``
      (``epsilon_high=None``: ``epsilon_low``); cispo's ratio cap is
      ``epsilon_high`` itself.
    beta: k3 KL coefficient (TRL's default 0: no reference needed).
    importance_sampling_level: ``'token'`` or ``'sequence'`` (GSPO).
    max_completion_length: dr_grpo's constant :math:`L_{max}`.
    delta: INTELLECT-2's upper clip of the unclipped ratio (None = off).
    sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures.
    bias_correction_kl: TRL ``use_bias_correction_kl``.

  Returns:
    ``(sums, counts)``, each ``[B]``.

  References:
    Shao et al., 2024 (GRPO); Yu et al., 2025 (DAPO); Liu et al., 2025
    (Dr. GRPO); Zheng et al., 2025 (GSPO); MiniMax, 2025 (CISPO);
    Gao et al., 2025 (SAPO).
  """
  mask = _float(mask)
  _grpo_check(mask, logps, old_logps, ref_logps, advantages, loss_type,
              importance_sampling_level, beta, max_completion_length)
  # Masked entries may be -inf: zeroed first, so no NaN reaches a gradient.
  logps, old_logps = _masked(_float(logps), mask), _masked(_float(old_logps),
                                                           mask)
  adv = _float(advantages)
  adv = adv[:, None] if adv.ndim == 1 else adv  # [B, 1] or [B, T]
  eps_high = epsilon_low if epsilon_high is None else epsilon_high
  coef = jnp.exp(log_importance_weights(
      logps, old_logps, mask, level=importance_sampling_level))
  if loss_type == "cispo":
    per_token = cispo_surrogate(coef, adv, logps, epsilon_high=eps_high)
  elif loss_type == "sapo":
    per_token = sapo_surrogate(coef, adv, temperature_pos=sapo_temperature_pos,
                               temperature_neg=sapo_temperature_neg)
  else:
    per_token = clipped_surrogate(coef, adv, epsilon_low=epsilon_low,
                                  epsilon_high=eps_high, delta=delta)
  if beta:
    kl = k3_kl(logps, _masked(_float(ref_logps), mask))
    per_token = per_token + beta * (kl * coef if bias_correction_kl else kl)
  per_token = jnp.broadcast_to(per_token, mask.shape)  # [B, 1] -> [B, T]
  return _REDUCTIONS[loss_type](_row_sums(per_token, mask),
                                 jnp.sum(mask, -1), max_completion_length)


def rloo_loss(logps, old_logps, advantages, mask, *, epsilon_low: float = 0.2,
              epsilon_high: float | None = None) -> Array:
  r"""RLOO's clipped sequence-level objective (TRL ``RLOOTrainer``).

  .. math::
    w_i = \exp\Big(\sum_t m_{i,t}(\log\pi - \log\pi_{old})_{i,t}\Big), \quad
    \ell_i = -\min(w_i A_i,\;
             \operatorname{clip}(w_i, 1 - \epsilon_{low}, 1 + \epsilon_{high}) A_i)

  The ratio is of summed (not averaged) log-probs; TRL's loss is the mean
  of :math:`\ell_i`.

  Args:
    logps, old_logps, mask: ``[B, T]``.
    advantages: ``[B]``, e.g. :func:`rloo_advantages`.
    epsilon_low, epsilon_high: clip range (``None``: ``epsilon_low``).

  Returns:
    ``[B]`` per-sequence losses.

  References:
    Ahmadian et al., 2024 (RLOO); Kool et al., 2019, Buy 4 REINFORCE
    Samples, Get a Baseline for Free!
  """
  mask = _float(mask)
  _check_tokens("rloo_loss", mask, logps=logps, old_logps=old_logps)
  _check_rows("rloo_loss", "advantages", advantages, mask.shape[0])
  log_ratio = _row_sums(_masked(_float(logps), mask)
                        - _masked(_float(old_logps), mask), mask)  # [B]
  eps_high = epsilon_low if epsilon_high is None else epsilon_high
  return clipped_surrogate(jnp.exp(log_ratio), _float(advantages),
                           epsilon_low=epsilon_low, epsilon_high=eps_high)


# --- DisCO --------------------------------------------------------------------------


def disco_scores(logps, old_logps, mask, *, score: str = "log_l") -> Array:
  r"""DisCO's scoring functions, length-normalised over the completion.

  .. math::
    s^{\text{log-L}}_i = \frac{1}{n_i}\sum_t m_{i,t}\log\pi(y_{i,t}), \qquad
    s^{\text{L-ratio}}_i = \frac{1}{n_i}\sum_t m_{i,t}
      \frac{\pi(y_{i,t})}{\pi_{old}(y_{i,t})}

  (:math:`n_i = \max(1, \sum_t m_{i,t})`.)

  Args:
    logps, old_logps, mask: ``[B, T]``.
    score: ``'log_l'`` (log-likelihood) or ``'l_ratio'`` (likelihood ratio).

  Returns:
    ``[B]`` scores.
  """
  mask = _float(mask)
  _check_tokens("disco_scores", mask, logps=logps, old_logps=old_logps)
  lengths = jnp.maximum(jnp.sum(mask, -1), 1.0)
  logps = _masked(_float(logps), mask)
  if score == "log_l":
    return _row_sums(logps, mask) / lengths
  if score == "l_ratio":
    ratio = jnp.exp(logps - _masked(_float(old_logps), mask))
    return _row_sums(ratio, mask) / lengths
  raise ValueError(f"disco_scores: score={score!r}; use one of "
                   f"{DISCO_SCORES}.")


def old_policy_kl(logps, old_logps, mask) -> Array:
  r"""k3 estimate of :math:`KL(\pi_{old} \| \pi)`, mean over the batch's tokens.

  .. math:: \widehat{KL} = \frac{\sum_{i,t} m_{i,t}(w_{i,t} - 1 - \log w_{i,t})}
            {\max(1, \sum_{i,t} m_{i,t})}, \qquad w = \pi / \pi_{old}

  (verl's ``low_var_kl`` of the samples of :math:`\pi_{old}`.) Returns a
  scalar.
  """
  mask = _float(mask)
  _check_tokens("old_policy_kl", mask, logps=logps, old_logps=old_logps)
  # e^{lp - old} - (lp - old) - 1, masked entries zeroed before the exp.
  per_token = k3_kl(_masked(_float(old_logps), mask),
                    _masked(_float(logps), mask))
  return jnp.sum(_row_sums(per_token, mask)) / jnp.maximum(jnp.sum(mask), 1.0)


def disco_loss(logps, old_logps, mask, rewards, *, num_generations: int,
               score: str = "log_l", tau: float = 0.0, beta: float = 500.0,
               delta: float = 1e-4) -> Array:
  r"""DisCO: discriminative objective with a squared-hinge KL constraint.

  Per prompt :math:`q` with positive (reward 1) answers :math:`O^+_q` and
  negative (reward 0) ones :math:`O^-_q`, scored by :func:`disco_scores`:

  .. math::
    J_q = \frac{1}{|O^+_q|}\sum_{o \in O^+_q} s_o
          - \tau\log\frac{1}{|O^-_q|}\sum_{o \in O^-_q} e^{s_o / \tau},
    \qquad
    \ell_q = -J_q + \beta\,[\widehat{KL}(\pi_{old}\|\pi) - \delta]_+^2

  The log-mean-exp over negatives is the DRO form (DisCO); ``tau = 0``
  takes their plain mean instead (DisCO-b). No clipping; prompts whose
  samples are all positive or all negative have :math:`J_q = 0` but still
  count (the authors divide by the number of prompts).
  :math:`\widehat{KL}` is :func:`old_policy_kl` over the whole input batch,
  so the penalty couples the rows: the mean of the result is the paper's
  objective for this batch.

  What this follows: the paper's objective and squared-hinge penalty, with
  the authors' choices where it leaves them open (length-normalised scores,
  the k3 KL over all tokens, rewards 1 / 0). The authors' code differs in
  two gradient-preserving ways: its log-mean-exp term's value is a constant
  (``S / sg(S)``; same gradient), and its penalty
  ``sg(beta [KL - delta]_+) KL`` has the gradient of
  :math:`\tfrac{\beta}{2}[KL - \delta]_+^2`, so their ``beta`` is twice
  this one's.

  Args:
    logps, old_logps, mask: ``[B, T]``, ``B = Q * G`` prompt-major.
    rewards: ``[B]`` binary rewards: > 0.5 positive, otherwise negative
      (NaN: neither).
    num_generations: ``G``.
    score: ``'log_l'`` or ``'l_ratio'``.
    tau: DRO temperature over negatives (0 = DisCO-b's mean).
    beta, delta: penalty weight and KL budget (the authors ran delta =
      1e-4 and their beta = 1e3, which is 500 here).

  Returns:
    ``[Q]`` per-prompt losses.

  References:
    Li, Lin, Galanti, Tu and Yang, 2025, DisCO: Reinforcing Large Reasoning
    Models with Discriminative Constrained Optimization.
  """
  mask = _float(mask)
  _check_tokens("disco_loss", mask, logps=logps, old_logps=old_logps)
  _check_rows("disco_loss", "rewards", rewards, mask.shape[0])
  r = _groups("disco_loss", rewards, num_generations)  # [Q, G]
  s = disco_scores(logps, old_logps, mask, score=score).reshape(r.shape)
  pos, neg = r > 0.5, r <= 0.5
  n_pos, n_neg = jnp.sum(pos, -1), jnp.sum(neg, -1)
  valid = (n_pos > 0) & (n_neg > 0)  # [Q]
  pos_mean = jnp.sum(jnp.where(pos, s, 0.0), -1) / jnp.maximum(n_pos, 1)
  if tau:  # rows without a negative get a finite dummy (never selected)
    z = jnp.where(neg & valid[:, None], s / tau, -jnp.inf)
    z = jnp.where(valid[:, None], z, 0.0)
    neg_term = tau * (jax.nn.logsumexp(z, -1) - jnp.log(jnp.maximum(n_neg, 1)))
  else:
    neg_term = jnp.sum(jnp.where(neg, s, 0.0), -1) / jnp.maximum(n_neg, 1)
  objective = jnp.where(valid, pos_mean - neg_term, 0.0)
  excess = jnp.maximum(old_policy_kl(logps, old_logps, mask) - delta, 0.0)
  return -objective + beta * excess ** 2
