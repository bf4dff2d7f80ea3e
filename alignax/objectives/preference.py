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
:mod:`alignax.data.reference_cache`); ORPO, SimPO and CPO need none.

Metrics follow TRL's names: ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies`` (ties count as wrong), ``rewards/margins``,
``logps/chosen``, ``logps/rejected``; plus ``logps/accuracies`` (the
policy's own ranking, meaningful before training) and, for lists,
``rewards/ndcg`` and ``logps/ndcg`` (NDCG of the ranking by implicit reward
or by log-prob, gains ``2^label - 1``).
"""

import functools
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from alignax import losses
from alignax import policy
from alignax.data import preference as preference_data

Array = jax.Array


def slot_logps(model, batch, *, chunk_size=None):
  """Summed log-probs and token counts of every response slot, ``[B, S]``."""
  hidden = model(batch["inputs"], positions=batch["positions"],
                 segment_ids=batch["segment_ids"], prefix=batch["prefix"],
                 attend_to=batch["attend_to"], return_hidden=True)
  tokens = policy.token_logps_from_hidden(
      hidden, model.logits_from_hidden, batch["targets"],
      chunk_size=chunk_size)  # [B, T]
  weights = batch["weights"].astype(tokens.dtype)
  num_slots = batch["labels"].shape[1]
  onehot = ((batch["slot"][..., None] == jnp.arange(num_slots))
            & (weights[..., None] != 0)).astype(tokens.dtype)  # [B, T, S]
  masked = jnp.where(weights != 0, tokens * weights, 0.0)
  return (jnp.einsum("bt,bts->bs", masked, onehot),
          jnp.einsum("bt,bts->bs", weights, onehot))


def reference_slot_logps(model, batch, frozen, *, reference, chunk_size=None):
  """Reference log-probs ``[B, S]``: live from ``frozen``, cached, or 0."""
  if reference == "frozen":
    if frozen is None:
      raise ValueError("reference='frozen' but the step got no frozen "
                       "parameters (config.reference must be 'frozen').")
    ref_model = nnx.merge(nnx.graphdef(model), jax.lax.stop_gradient(frozen))
    return jax.lax.stop_gradient(
        slot_logps(ref_model, batch, chunk_size=chunk_size)[0])
  if reference == "cached":
    return batch["ref_logps"].astype(jnp.float32)
  return jnp.zeros(batch["labels"].shape, jnp.float32)


class Lists(NamedTuple):
  """Per-example views ``[P, K]`` (``P = B * G``) of a packed batch."""
  logps: Array
  ref_logps: Array
  lengths: Array
  labels: Array
  valid: Array
  rewards: Array  # [P, K, M]


def gather_lists(model, batch, frozen, *, list_size, reference,
                 chunk_size=None) -> Lists:
  """Runs policy (and reference) and regroups slots into examples."""
  logps, lengths = slot_logps(model, batch, chunk_size=chunk_size)
  ref = reference_slot_logps(model, batch, frozen, reference=reference,
                             chunk_size=chunk_size)
  b, s = logps.shape
  if s % list_size:
    raise ValueError(f"{s} response slots per row are not a multiple of "
                     f"list_size={list_size}.")
  as_lists = lambda x: x.reshape(b * s // list_size, list_size, *x.shape[2:])
  valid = batch["valid"].astype(bool)
  return Lists(*(as_lists(x) for x in (
      logps, jnp.where(valid, ref, 0.0), lengths,
      batch["labels"].astype(jnp.float32), valid,
      batch["rewards"].astype(jnp.float32))))


class Pairs(NamedTuple):
  """Chosen (slot 0) / rejected (slot 1) views ``[P]``; invalid pairs are 0."""
  chosen: Array
  rejected: Array
  ref_chosen: Array
  ref_rejected: Array
  chosen_lengths: Array
  rejected_lengths: Array
  valid: Array
  chosen_rewards: Array  # [P, M]
  rejected_rewards: Array


def to_pairs(lists: Lists) -> Pairs:
  valid = lists.valid[:, 0] & lists.valid[:, 1]
  pick = lambda x, k: jnp.where(
      valid.reshape((-1,) + (1,) * (x.ndim - 2)), x[:, k], 0.0)
  return Pairs(pick(lists.logps, 0), pick(lists.logps, 1),
               pick(lists.ref_logps, 0), pick(lists.ref_logps, 1),
               pick(lists.lengths, 0), pick(lists.lengths, 1), valid,
               pick(lists.rewards, 0), pick(lists.rewards, 1))


def _mean_of(x, where):
  """A ``(sum, count)`` metric of ``x`` over ``where``."""
  x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  return (jnp.sum(jnp.where(where, x, 0.0)),
          jnp.sum(where).astype(jnp.float32))


def _reduce(per_example, valid, metrics):
  loss_sum = jnp.sum(jnp.where(valid, per_example, 0.0))
  count = jnp.sum(valid).astype(jnp.float32)
  return loss_sum, (count, {"loss": (loss_sum, count), **metrics})


def pair_metrics(p: Pairs, beta):
  """TRL's DPO metrics as ``(sum, count)`` over the valid pairs."""
  chosen = beta * (p.chosen - p.ref_chosen)
  rejected = beta * (p.rejected - p.ref_rejected)
  return {
      "rewards/chosen": _mean_of(chosen, p.valid),
      "rewards/rejected": _mean_of(rejected, p.valid),
      "rewards/accuracies": _mean_of(chosen > rejected, p.valid),
      "rewards/margins": _mean_of(chosen - rejected, p.valid),
      "logps/chosen": _mean_of(p.chosen, p.valid),
      "logps/rejected": _mean_of(p.rejected, p.valid),
      "logps/accuracies": _mean_of(p.chosen > p.rejected, p.valid),
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
    out[f"{name}/accuracies"] = _mean_of(diff(s) > 0, better)
    value, defined = ndcg(s, lists.labels, where)
    out[f"{name}/ndcg"] = _mean_of(value, defined & list_valid)
  out["rewards/margins"] = _mean_of(diff(scores), better)
  return out


# --- pairwise losses: config.preference.loss_type -> pure loss --------------


def nll_loss(chosen_logps, rejected_logps, ref_chosen_logps,
             ref_rejected_logps, *, chosen_lengths, valid):
  """TRL's ``sft`` term over the valid pairs: token-mean NLL of the chosen.

  Spread so that the mean over valid pairs is ``-sum(c) / sum(L_w)``.
  """
  del rejected_logps, ref_chosen_logps, ref_rejected_logps
  n = jnp.sum(valid).astype(chosen_logps.dtype)
  tokens = jnp.maximum(jnp.sum(jnp.where(valid, chosen_lengths, 0.0)), 1.0)
  return jnp.where(valid, -chosen_logps * n / tokens, 0.0)


PAIR_LOSSES = {
    "sigmoid": losses.dpo_loss,
    "hinge": losses.hinge_loss,
    "ipo": losses.ipo_loss,
    "exo_pair": losses.exo_pair_loss,
    "nca_pair": losses.nca_pair_loss,
    "robust": losses.robust_loss,
    "bco_pair": losses.bco_pair_loss,
    "sppo_hard": losses.sppo_hard_loss,
    "aot": losses.aot_loss,
    "aot_unpaired": losses.aot_unpaired_loss,
    "apo_zero": losses.apo_zero_loss,
    "apo_down": losses.apo_down_loss,
    "discopop": losses.discopop_loss,
    "sigmoid_norm": losses.sigmoid_norm_loss,
    "sft": nll_loss,
}
# TRL feeds these the plain log-probs, never f-divergence scores.
_PLAIN_LOGRATIOS = (losses.aot_loss, losses.aot_unpaired_loss,
                    losses.apo_zero_loss, losses.apo_down_loss, nll_loss)
F_DIVERGENCES = {
    "reverse_kl": losses.reverse_kl_scores,
    "forward_kl": losses.forward_kl_scores,
    "js_divergence": losses.js_divergence_scores,
    "alpha_divergence": losses.alpha_divergence_scores,
}


def pair_term(loss_fn, hparams, scores_fn=losses.reverse_kl_scores):
  """``Pairs -> [P]`` for one pure loss, passing the keywords it takes."""
  params = inspect.signature(loss_fn).parameters
  kwargs = {k: v for k, v in hparams.items() if k in params}

  def term(p: Pairs):
    extra = {k: getattr(p, k) for k in ("chosen_lengths", "rejected_lengths")
             if k in params}
    if "valid" in params:
      extra["valid"] = p.valid
    if loss_fn in _PLAIN_LOGRATIOS:
      return loss_fn(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected,
                     **kwargs, **extra)
    c, r = scores_fn(*losses.logratios(p.chosen, p.rejected, p.ref_chosen,
                                       p.ref_rejected))
    return loss_fn(c, r, 0.0, 0.0, **kwargs, **extra)

  return term


def build_pair_loss(pref_cfg):
  """``Pairs -> [P]``: the weighted sum of ``loss_type``'s TRL losses."""
  names = [n.strip() for n in pref_cfg.loss_type.split(",") if n.strip()]
  unknown = [n for n in names if n not in PAIR_LOSSES]
  if not names or unknown:
    raise ValueError(f"config.preference.loss_type={pref_cfg.loss_type!r}: "
                     f"unknown {unknown}; known: {sorted(PAIR_LOSSES)}")
  weights = tuple(pref_cfg.loss_weights) or (1.0,) * len(names)
  if len(weights) != len(names):
    raise ValueError(f"config.preference.loss_weights={weights} needs one "
                     f"weight per loss_type entry ({len(names)})")
  if pref_cfg.f_divergence not in F_DIVERGENCES:
    raise ValueError(f"config.preference.f_divergence="
                     f"{pref_cfg.f_divergence!r}: use {sorted(F_DIVERGENCES)}")
  scores_fn = F_DIVERGENCES[pref_cfg.f_divergence]
  if pref_cfg.f_divergence == "alpha_divergence":
    scores_fn = functools.partial(scores_fn,
                                  alpha=pref_cfg.alpha_divergence_coef)
  hparams = {"beta": pref_cfg.beta, "label_smoothing": pref_cfg.label_smoothing,
             "tau": pref_cfg.discopop_tau,
             "epsilon": pref_cfg.label_smoothing or 1e-3}
  terms = [pair_term(PAIR_LOSSES[n], hparams, scores_fn) for n in names]
  return lambda p: sum(w * t(p) for w, t in zip(weights, terms))


def _mean_logps(p: Pairs):
  """Length-normalised logps; invalid pairs get -1 (ORPO needs < 0)."""
  mean = lambda x, n: jnp.where(p.valid, x / jnp.maximum(n, 1.0), -1.0)
  return mean(p.chosen, p.chosen_lengths), mean(p.rejected, p.rejected_lengths)


def orpo_pair_loss(p: Pairs, *, beta, sft_weight=1.0):
  """ORPO: chosen NLL + beta * odds-ratio term on mean log-probs."""
  return (sft_weight * pair_term(nll_loss, {})(p)
          + losses.orpo_loss(*_mean_logps(p), beta=beta))


def simpo_pair_loss(p: Pairs, *, beta, gamma, label_smoothing, sft_weight):
  return (losses.simpo_loss(*_mean_logps(p), beta=beta, gamma=gamma,
                            label_smoothing=label_smoothing)
          + sft_weight * pair_term(nll_loss, {})(p))


def cpo_pair_loss(p: Pairs, *, beta, label_smoothing, sft_weight):
  return (losses.cpo_loss(p.chosen, p.rejected, beta=beta,
                          label_smoothing=label_smoothing)
          + sft_weight * pair_term(nll_loss, {})(p))


def modpo_pair_loss(p: Pairs, *, beta, weights):
  return losses.modpo_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected,
                           p.chosen_rewards, p.rejected_rewards, beta=beta,
                           weights=weights)


# --- objectives ---------------------------------------------------------------


def pairwise_objective(model, batch, rng, *, frozen=None, pair_loss, beta,
                       reference, chunk_size=None):
  """Pairs (slot 0 chosen, slot 1 rejected) under ``pair_loss(Pairs)``."""
  del rng
  p = to_pairs(gather_lists(model, batch, frozen, list_size=2,
                            reference=reference, chunk_size=chunk_size))
  return _reduce(pair_loss(p), p.valid, pair_metrics(p, beta))


def listwise_objective(model, batch, rng, *, frozen=None, list_loss, beta,
                       list_size, reference, chunk_size=None):
  """Lists of K graded responses under ``list_loss(scores, labels, where)``.

  Scores are the implicit rewards :math:`\\beta(\\log\\pi - \\log\\pi_{ref})`;
  lists with fewer than two valid responses are skipped.
  """
  del rng
  lists = gather_lists(model, batch, frozen, list_size=list_size,
                       reference=reference, chunk_size=chunk_size)
  scores = beta * (lists.logps - lists.ref_logps)
  list_valid = jnp.sum(lists.valid, axis=-1) >= 2
  per_list = list_loss(scores, lists.labels, where=lists.valid)
  return _reduce(per_list, list_valid,
                 list_metrics(scores, lists, list_valid))


def kto_objective(model, batch, rng, *, frozen=None, beta, desirable_weight,
                  undesirable_weight, reference, chunk_size=None):
  """KTO on binary feedback; slot 1 is the mismatched KL completion."""
  del rng
  lists = gather_lists(model, batch, frozen, list_size=2,
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
      "rewards/chosen": _mean_of(rewards, valid & desirable),
      "rewards/rejected": _mean_of(rewards, valid & ~desirable),
      "logps/chosen": _mean_of(lists.logps[:, 0], valid & desirable),
      "logps/rejected": _mean_of(lists.logps[:, 0], valid & ~desirable),
      "kl": _mean_of(losses.kto_kl_baseline(kl_ratio, 0.0 * kl_ratio),
                     jnp.bool_(True)),
  }
  return _reduce(per_example, valid, metrics)


# --- from_config: config.objective -> objective -------------------------------


def _reference_mode(config, needs_reference=True):
  if not needs_reference:
    return "none"
  if config.reference == "frozen":
    return "frozen"
  if config.data.preference.reference_cache:
    return "cached"
  if config.preference.cache_reference:
    raise ValueError(
        "config.preference.cache_reference=True but no cache is set: fill it "
        "with alignax.data.reference_cache.prepare(config, workdir) (or run "
        "python -m alignax.data.reference_cache with the launcher's flags)")
  raise ValueError(
      f"config.objective={config.objective!r} needs a reference model: set "
      "config.reference='frozen' (live) or config.preference.cache_reference"
      "=True (log-probs precomputed by alignax.data.reference_cache)")


def _check_format(config, *formats):
  fmt = config.data.preference.format
  if fmt not in formats:
    raise ValueError(f"config.objective={config.objective!r} needs "
                     f"config.data.preference.format in {formats}, got "
                     f"{fmt!r}")


def _pairwise(config, pair_loss, needs_reference=True):
  _check_format(config, "pairs")
  p = config.preference
  return functools.partial(
      pairwise_objective, pair_loss=pair_loss, beta=p.beta,
      reference=_reference_mode(config, needs_reference),
      chunk_size=p.logps_chunk or None)


def dpo_from_config(config):
  """DPO family: ``preference.loss_type`` (+ ``sft_weight`` NLL)."""
  loss = build_pair_loss(config.preference)
  w = config.preference.sft_weight
  nll = pair_term(nll_loss, {})
  return _pairwise(config, (lambda p: loss(p) + w * nll(p)) if w else loss)


def orpo_from_config(config):
  p = config.preference
  return _pairwise(config, functools.partial(
      orpo_pair_loss, beta=p.beta, sft_weight=1.0 + p.sft_weight), False)


def simpo_from_config(config):
  p = config.preference
  return _pairwise(config, functools.partial(
      simpo_pair_loss, beta=p.beta, gamma=p.simpo_gamma,
      label_smoothing=p.label_smoothing, sft_weight=p.sft_weight), False)


def cpo_from_config(config):
  p = config.preference
  return _pairwise(config, functools.partial(
      cpo_pair_loss, beta=p.beta, label_smoothing=p.label_smoothing,
      sft_weight=p.sft_weight), False)


def modpo_from_config(config):
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


def lipo_from_config(config):
  """Listwise (LiPO-λ by default): ``preference.list_loss``."""
  p = config.preference
  _check_format(config, "lists", "pairs")
  if p.list_loss not in LIST_LOSSES:
    raise ValueError(f"config.preference.list_loss={p.list_loss!r}: use "
                     f"{sorted(LIST_LOSSES)}")
  list_loss = LIST_LOSSES[p.list_loss]
  if p.list_loss == "lipo_lambda":
    list_loss = functools.partial(list_loss, normalize=p.lambda_normalize)
  return functools.partial(
      listwise_objective, list_loss=list_loss, beta=p.beta,
      list_size=preference_data.list_size(config.data.preference),
      reference=_reference_mode(config), chunk_size=p.logps_chunk or None)


def kto_from_config(config):
  p = config.preference
  _check_format(config, "binary")
  return functools.partial(
      kto_objective, beta=p.beta, desirable_weight=p.kto_desirable_weight,
      undesirable_weight=p.kto_undesirable_weight,
      reference=_reference_mode(config), chunk_size=p.logps_chunk or None)
