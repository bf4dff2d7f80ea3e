"""Preference objectives: the DPO family, LiPO and listwise, KTO, MODPO, and
the reference-free ORPO / SimPO / CPO, on packed preference batches.

Every objective has the shared signature
``objective(model, batch, rng, *, frozen) -> (loss_sum, (count, metrics))``
(see ``alignax.objectives.lm``); ``count`` is the number of valid pairs,
lists or examples of the (micro)batch, so accumulation stays exact. Batches
are those of :mod:`alignax.data.preference_packing`: response slots
``[B, S]`` regroup into ``[B * G, K]`` examples.

The reference model is, by ``config``, either the frozen starting
parameters passed to the step (``config.reference='frozen'``; rebuilt here
with ``nnx.merge`` under ``stop_gradient``) or log-probs precomputed into
the batch (``config.preference.cache_reference``, see
:mod:`alignax.reference`); ORPO, SimPO and CPO need none. The batch views
and reference handling are :mod:`alignax.objectives.common`'s; every loss
is a public function of :mod:`alignax.losses`, called through the explicit
adapter table :data:`PAIR_LOSSES`.

Metrics follow TRL's names: ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies`` (ties count as wrong), ``rewards/margins``,
``logps/chosen``, ``logps/rejected``; plus ``logps/accuracies`` (the
policy's own ranking, meaningful before training) and, for lists,
``rewards/ndcg`` and ``logps/ndcg`` (NDCG of the ranking by implicit reward
or by log-prob, gains ``2^label - 1``).
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from alignax import losses
from alignax.data import preference as preference_data
from alignax.objectives import common
from alignax.objectives.common import Lists, Pairs

Array = jax.Array
mean_of = common.mean_of


def pair_metrics(p: Pairs, beta):
  """TRL's DPO metrics as ``(sum, count)`` over the valid pairs."""
  chosen = beta * (p.chosen - p.ref_chosen)
  rejected = beta * (p.rejected - p.ref_rejected)
  return {
      "rewards/chosen": mean_of(chosen, p.valid),
      "rewards/rejected": mean_of(rejected, p.valid),
      "rewards/accuracies": mean_of(chosen > rejected, p.valid),
      "rewards/margins": mean_of(chosen - rejected, p.valid),
      "logps/chosen": mean_of(p.chosen, p.valid),
      "logps/rejected": mean_of(p.rejected, p.valid),
      "logps/accuracies": mean_of(p.chosen > p.rejected, p.valid),
  }


def ndcg(scores, labels, where):
  r"""NDCG of ranking each list by ``scores``, ``[P]`` (and defined ``[P]``).

  .. math:: \mathrm{NDCG} = \frac{\sum_i (2^{\psi_i} - 1)/\log_2(1 + \tau_i)}{\max_\tau \sum_i (2^{\psi_i} - 1)/\log_2(1 + \tau_i)}

  Ties keep list order (stable sort); invalid items rank last.
  """
  gains = jnp.where(where, 2.0 ** labels - 1.0, 0.0)

  def dcg(keys):
    order = jnp.argsort(jnp.where(where, -keys, jnp.inf), axis=-1)
    ranks = jnp.argsort(order, axis=-1) + 1  # [P, K], 1-based
    return jnp.sum(gains / jnp.log2(1.0 + ranks), axis=-1)

  ideal = dcg(labels)
  return dcg(scores) / jnp.where(ideal > 0, ideal, 1.0), ideal > 0


def list_metrics(scores, lists: Lists, list_valid):
  """Pairwise accuracy, margins and NDCG of rewards and of log-probs."""
  where = lists.valid
  better = (where[:, :, None] & where[:, None, :]
            & (lists.labels[:, :, None] > lists.labels[:, None, :])
            & list_valid[:, None, None])  # [P, K, K]: i labelled over j
  diff = lambda x: x[:, :, None] - x[:, None, :]
  out = {}
  for name, s in (("rewards", scores), ("logps", lists.logps)):
    out[f"{name}/accuracies"] = mean_of(diff(s) > 0, better)
    value, defined = ndcg(s, lists.labels, where)
    out[f"{name}/ndcg"] = mean_of(value, defined & list_valid)
  out["rewards/margins"] = mean_of(diff(scores), better)
  return out


# --- pairwise losses: config.preference.loss_type -> adapter ---------------------


@dataclasses.dataclass(frozen=True)
class PairHparams:
  """The ``config.preference`` values the pair losses read."""
  beta: float = 0.1
  label_smoothing: float = 0.0
  discopop_tau: float = 0.05


def _on(scores):
  """A loss's four log-prob arguments fed f-divergence scores (TRL)."""
  return scores[0], scores[1], 0.0, 0.0


def _plain(p: Pairs):
  return p.chosen, p.rejected, p.ref_chosen, p.ref_rejected


def _lengths(p: Pairs):
  return {"chosen_lengths": p.chosen_lengths,
          "rejected_lengths": p.rejected_lengths}


def sft_term(p: Pairs) -> Array:
  """TRL's ``sft`` term: the token-mean chosen NLL over the valid pairs.

  ``losses.sft_loss`` spreads the batch's NLL over all ``P`` pairs; scaled
  by the valid share its sum over the valid pairs is ``n`` times the mean.
  """
  share = jnp.sum(p.valid) / p.valid.size
  return losses.sft_loss(p.chosen, p.chosen_lengths) * share


# loss_type -> adapter(pairs, scores, hparams) -> [P]. ``scores`` are the
# f-divergence scores of the log-ratios (the log-ratios for reverse KL); the
# losses TRL feeds plain log-ratios take ``_plain(p)``.
PairLoss = Callable[[Pairs, tuple[Array, Array], PairHparams], Array]
PAIR_LOSSES: dict[str, PairLoss] = {
    # TRL >= 1.0 smooths only robust, exo_pair and aot*: no cDPO here.
    "sigmoid": lambda p, s, h: losses.dpo_loss(*_on(s), beta=h.beta),
    "hinge": lambda p, s, h: losses.hinge_loss(*_on(s), beta=h.beta),
    "ipo": lambda p, s, h: losses.ipo_loss(*_on(s), beta=h.beta,
                                           **_lengths(p)),
    "sigmoid_norm": lambda p, s, h: losses.sigmoid_norm_loss(
        *_on(s), beta=h.beta, **_lengths(p)),
    "exo_pair": lambda p, s, h: losses.exo_pair_loss(
        *_on(s), beta=h.beta, epsilon=h.label_smoothing),
    "robust": lambda p, s, h: losses.robust_loss(
        *_on(s), beta=h.beta, label_smoothing=h.label_smoothing),
    "discopop": lambda p, s, h: losses.discopop_loss(
        *_on(s), beta=h.beta, tau=h.discopop_tau),
    "sft": lambda p, s, h: sft_term(p),
    "nca_pair": lambda p, s, h: losses.nca_pair_loss(*_plain(p), beta=h.beta),
    "bco_pair": lambda p, s, h: losses.bco_pair_loss(*_plain(p), beta=h.beta),
    "sppo_hard": lambda p, s, h: losses.sppo_hard_loss(*_plain(p),
                                                       beta=h.beta),
    "aot": lambda p, s, h: losses.aot_loss(
        *_plain(p), beta=h.beta, label_smoothing=h.label_smoothing),
    "aot_unpaired": lambda p, s, h: losses.aot_unpaired_loss(
        *_plain(p), beta=h.beta, label_smoothing=h.label_smoothing),
    "apo_zero": lambda p, s, h: losses.apo_zero_loss(*_plain(p), beta=h.beta),
    "apo_down": lambda p, s, h: losses.apo_down_loss(*_plain(p), beta=h.beta),
}
# The loss types TRL accepts an f-divergence other than reverse KL with
# (``DPOTrainer.__init__``); it refuses the others, and so do we.
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair",
                       "robust", "discopop", "sft")
F_DIVERGENCES = {
    "reverse_kl": losses.reverse_kl_scores,
    "forward_kl": losses.forward_kl_scores,
    "js_divergence": losses.js_divergence_scores,
    "alpha_divergence": losses.alpha_divergence_scores,
}


def _check_pair_config(pref_cfg, names, weights) -> None:
  """The checks TRL's ``DPOTrainer`` makes, as one-line errors."""
  unknown = [n for n in names if n not in PAIR_LOSSES]
  if not names or unknown:
    raise ValueError(f"config.preference.loss_type={pref_cfg.loss_type!r}: "
                     f"unknown {unknown}; known: {sorted(PAIR_LOSSES)}")
  if len(weights) != len(names):
    raise ValueError(f"config.preference.loss_weights={tuple(weights)} needs "
                     f"one weight per loss_type entry ({len(names)})")
  f_div = pref_cfg.f_divergence
  if f_div not in F_DIVERGENCES:
    raise ValueError(f"config.preference.f_divergence={f_div!r}: use "
                     f"{sorted(F_DIVERGENCES)}")
  refused = [n for n in names if n not in F_DIVERGENCE_LOSSES]
  if f_div != "reverse_kl" and refused:
    raise ValueError(f"config.preference.f_divergence={f_div!r} does not go "
                     f"with loss_type {refused} (as in TRL): use it with "
                     f"{list(F_DIVERGENCE_LOSSES)}, or f_divergence="
                     "'reverse_kl'")
  sorting = [n for n in names if n in ("aot", "aot_unpaired")]
  if pref_cfg.get("use_weighting", False) and sorting:
    raise ValueError(f"config.preference.use_weighting=True (WPO) does not go "
                     f"with loss_type {sorting} (as in TRL): they sort the "
                     "pairs, which would misalign the per-pair weights")
  ls = pref_cfg.label_smoothing
  if "robust" in names and not 0.0 <= ls < 0.5:
    raise ValueError(f"config.preference.label_smoothing={ls} must lie in "
                     "[0, 0.5) for loss_type 'robust'")
  if "exo_pair" in names and not 0.0 < ls < 1.0:
    raise ValueError(f"config.preference.label_smoothing={ls} must lie in "
                     "(0, 1) for loss_type 'exo_pair' (EXO's epsilon; the "
                     "paper uses 1e-3)")


def build_pair_loss(pref_cfg, extra=()):
  """``Pairs -> [P]``: the weighted sum of ``loss_type``'s TRL losses.

  Args:
    pref_cfg: ``config.preference`` (``loss_type``, ``loss_weights``,
      ``f_divergence``, ``beta``, ...).
    extra: more ``(loss_type, weight)`` terms, e.g. ``("sft", rpo_alpha)``.
  """
  names = [n.strip() for n in pref_cfg.loss_type.split(",") if n.strip()]
  weights = list(pref_cfg.loss_weights) or [1.0] * len(names)
  _check_pair_config(pref_cfg, names, weights)
  names += [n for n, _ in extra]
  weights += [w for _, w in extra]
  scores_fn = F_DIVERGENCES[pref_cfg.f_divergence]
  if pref_cfg.f_divergence == "alpha_divergence":
    scores_fn = functools.partial(scores_fn,
                                  alpha=pref_cfg.alpha_divergence_coef)
  hparams = PairHparams(beta=pref_cfg.beta,
                        label_smoothing=pref_cfg.label_smoothing,
                        discopop_tau=pref_cfg.discopop_tau)
  terms = [PAIR_LOSSES[n] for n in names]

  def pair_loss(p: Pairs, pair_weights=None) -> Array:
    scores = scores_fn(*losses.logratios(*_plain(p)))
    values = [t(p, scores, hparams) for t in terms]
    if pair_weights is not None:  # WPO
      values = [v * _weights_of(n, pair_weights, p.valid)
                for n, v in zip(names, values)]
    return losses.weighted_sum(values, weights)

  return pair_loss


def _weights_of(name, pair_weights, valid):
  """What WPO multiplies a term by: its pair's weight ``[P]``.

  TRL's ``sft`` term is the batch's token-mean NLL copied to every pair, so
  its weighted mean is that NLL times the mean weight; ``sft_term``'s
  entries differ per pair, so they get the mean weight of the valid pairs.
  """
  if name != "sft":
    return pair_weights
  return (jnp.sum(jnp.where(valid, pair_weights, 0.0))
          / jnp.maximum(jnp.sum(valid), 1))


def orpo_pair_loss(p: Pairs, *, beta, sft_weight=1.0):
  """ORPO: chosen NLL + beta * odds-ratio term on mean log-probs."""
  return losses.weighted_sum(
      [sft_term(p), losses.orpo_loss(p.chosen_mean, p.rejected_mean,
                                     beta=beta)], [sft_weight, 1.0])


def simpo_pair_loss(p: Pairs, *, beta, gamma, label_smoothing, sft_weight):
  return losses.weighted_sum(
      [losses.simpo_loss(p.chosen_mean, p.rejected_mean, beta=beta,
                         gamma=gamma, label_smoothing=label_smoothing),
       sft_term(p)], [1.0, sft_weight])


def cpo_pair_loss(p: Pairs, *, beta, label_smoothing, sft_weight):
  return losses.weighted_sum(
      [losses.cpo_loss(p.chosen, p.rejected, beta=beta,
                       label_smoothing=label_smoothing), sft_term(p)],
      [1.0, sft_weight])


def modpo_pair_loss(p: Pairs, *, beta, weights):
  return losses.modpo_loss(*_plain(p), p.chosen_rewards, p.rejected_rewards,
                           beta=beta, weights=weights)


# --- objectives ---------------------------------------------------------------


def pairwise_objective(model, batch, rng, *, frozen=None, pair_loss, beta,
                       reference, chunk_size=None, ld_alpha=1.0,
                       use_weighting=False):
  """Pairs (slot 0 chosen, slot 1 rejected) under ``pair_loss(Pairs)``.

  ``ld_alpha < 1``: LD-DPO's length-desensitised log-probs
  (:func:`alignax.objectives.common.ld_weights`). ``use_weighting``: WPO,
  each pair's loss times the constant :math:`w(y_w) w(y_l)`
  (:func:`alignax.losses.wpo_weights`; ``pair_loss`` takes
  ``pair_weights=``), and their mean as ``wpo/weights``.
  """
  del rng
  lists = common.gather_lists(
      model, batch, frozen, list_size=2, reference=reference,
      chunk_size=chunk_size, ld_alpha=ld_alpha, use_weighting=use_weighting)
  p = common.to_pairs(lists)
  metrics = pair_metrics(p, beta)
  if not use_weighting:
    return common.reduce(pair_loss(p), p.valid, metrics)
  weights = lists.wpo_weights[:, 0] * lists.wpo_weights[:, 1]  # [P]
  metrics["wpo/weights"] = mean_of(weights, p.valid)
  return common.reduce(pair_loss(p, pair_weights=weights), p.valid, metrics)


def listwise_objective(model, batch, rng, *, frozen=None, list_loss, beta,
                       list_size, reference, chunk_size=None):
  """Lists of K graded responses under ``list_loss(scores, labels, where)``.

  Scores are the implicit rewards :math:`\\beta(\\log\\pi - \\log\\pi_{ref})`;
  lists with fewer than two valid responses are skipped.
  """
  del rng
  lists = common.gather_lists(model, batch, frozen, list_size=list_size,
                              reference=reference, chunk_size=chunk_size)
  scores = beta * (lists.logps - lists.ref_logps)
  list_valid = jnp.sum(lists.valid, axis=-1) >= 2
  per_list = list_loss(scores, lists.labels, where=lists.valid)
  return common.reduce(per_list, list_valid,
                       list_metrics(scores, lists, list_valid))


def kto_objective(model, batch, rng, *, frozen=None, beta, desirable_weight,
                  undesirable_weight, reference, chunk_size=None):
  """KTO on binary feedback; slot 1 is the mismatched KL completion."""
  del rng
  lists = common.gather_lists(model, batch, frozen, list_size=2,
                              reference=reference, chunk_size=chunk_size)
  valid = lists.valid[:, 0]
  kl_valid = lists.valid[:, 0] & lists.valid[:, 1]
  # kto_kl_baseline averages over all P entries; rescaling the valid log
  # ratios by P / n makes that the mean over the valid ones.
  scale = kl_valid.size / jnp.maximum(jnp.sum(kl_valid), 1)
  kl_ratio = jnp.where(kl_valid, lists.logps[:, 1] - lists.ref_logps[:, 1],
                       0.0) * scale
  desirable = lists.labels[:, 0] > 0.5
  per_example = losses.kto_loss(
      lists.logps[:, 0], lists.ref_logps[:, 0], kl_ratio,
      jnp.zeros_like(kl_ratio), desirable, beta=beta,
      desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
  rewards = beta * (lists.logps[:, 0] - lists.ref_logps[:, 0])
  metrics = {
      "rewards/chosen": mean_of(rewards, valid & desirable),
      "rewards/rejected": mean_of(rewards, valid & ~desirable),
      "logps/chosen": mean_of(lists.logps[:, 0], valid & desirable),
      "logps/rejected": mean_of(lists.logps[:, 0], valid & ~desirable),
      "kl": mean_of(losses.kto_kl_baseline(kl_ratio, 0.0 * kl_ratio),
                    jnp.bool_(True)),
  }
  return common.reduce(per_example, valid, metrics)


# --- from_config: config.objective -> objective -------------------------------


def _pairwise(config, pair_loss, needs_reference=True, use_weighting=False):
  common.check_format(config, "pairs")
  p = config.preference
  return functools.partial(
      pairwise_objective, pair_loss=pair_loss, beta=p.beta,
      reference=common.reference_mode(config, needs_reference),
      chunk_size=p.logps_chunk or None,
      ld_alpha=float(p.get("ld_alpha", 1.0)), use_weighting=use_weighting)


def reads_reference(config) -> bool:
  """Whether ``objective='dpo'`` reads a reference model: every loss type
  but ``'sft'`` alone (TRL's chosen NLL, i.e. rejection-sampling
  fine-tuning on the chosen responses) does."""
  names = {n.strip() for n in str(config.preference.loss_type).split(",")
           if n.strip()}
  return names != {"sft"}


def dpo_from_config(config, *, mesh=None):
  """DPO family: ``preference.loss_type`` (+ ``sft_weight`` NLL, WPO)."""
  del mesh
  w = config.preference.sft_weight
  return _pairwise(config, build_pair_loss(
      config.preference, extra=(("sft", w),) if w else ()),
                   needs_reference=reads_reference(config),
                   use_weighting=bool(config.preference.get("use_weighting",
                                                            False)))


def orpo_from_config(config, *, mesh=None):
  del mesh  # every builder takes it; only the contrastive path uses it
  p = config.preference
  return _pairwise(config, functools.partial(
      orpo_pair_loss, beta=p.beta, sft_weight=1.0 + p.sft_weight), False)


def simpo_from_config(config, *, mesh=None):
  del mesh  # every builder takes it; only the contrastive path uses it
  p = config.preference
  return _pairwise(config, functools.partial(
      simpo_pair_loss, beta=p.beta, gamma=p.simpo_gamma,
      label_smoothing=p.label_smoothing, sft_weight=p.sft_weight), False)


def cpo_from_config(config, *, mesh=None):
  del mesh  # every builder takes it; only the contrastive path uses it
  p = config.preference
  return _pairwise(config, functools.partial(
      cpo_pair_loss, beta=p.beta, label_smoothing=p.label_smoothing,
      sft_weight=p.sft_weight), False)


def modpo_from_config(config, *, mesh=None):
  del mesh  # every builder takes it; only the contrastive path uses it
  p, fields = config.preference, config.data.preference.reward_fields
  if len(p.modpo_weights) != len(fields) + 1:
    raise ValueError(
        f"config.preference.modpo_weights={tuple(p.modpo_weights)} needs "
        f"1 + len(config.data.preference.reward_fields) = {len(fields) + 1} "
        "entries")
  return _pairwise(config, functools.partial(
      modpo_pair_loss, beta=p.beta, weights=tuple(p.modpo_weights)))


LIST_LOSSES = {
    "lipo_lambda": losses.lipo_lambda_loss,
    "list_mle": losses.list_mle_loss,
    "list_softmax": losses.list_softmax_loss,
    "pairwise_logistic": losses.pairwise_logistic_loss,
    "pairwise_hinge": losses.pairwise_hinge_loss,
}


def lipo_from_config(config, *, mesh=None):
  """Listwise (LiPO-λ by default): ``preference.list_loss``."""
  del mesh
  p = config.preference
  common.check_format(config, "lists", "pairs")
  if p.list_loss not in LIST_LOSSES:
    raise ValueError(f"config.preference.list_loss={p.list_loss!r}: use "
                     f"{sorted(LIST_LOSSES)}")
  list_loss = LIST_LOSSES[p.list_loss]
  if p.list_loss == "lipo_lambda":
    list_loss = functools.partial(list_loss, normalize=p.lambda_normalize)
  return functools.partial(
      listwise_objective, list_loss=list_loss, beta=p.beta,
      list_size=preference_data.list_size(config.data.preference),
      reference=common.reference_mode(config),
      chunk_size=p.logps_chunk or None)


def kto_from_config(config, *, mesh=None):
  del mesh  # every builder takes it; only the contrastive path uses it
  p = config.preference
  common.check_format(config, "binary")
  return functools.partial(
      kto_objective, beta=p.beta, desirable_weight=p.kto_desirable_weight,
      undesirable_weight=p.kto_undesirable_weight,
      reference=common.reference_mode(config),
      chunk_size=p.logps_chunk or None)
