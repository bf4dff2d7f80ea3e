"""What every objective shares: metric reductions and packed-batch views.

Objectives return ``(loss_sum, (count, metrics))`` with ``metrics`` mapping
names to ``(sum, count)`` pairs (see :mod:`alignax.objectives.lm`);
:func:`mean_of` and :func:`reduce` build those. The preference, binary and
reward objectives read the packed batches of
:mod:`alignax.data.preference_packing`: response *slots* ``[B, S]`` of each
row regroup into ``[B * G, K]`` examples (:class:`Lists`), and pairs are the
``K = 2`` case (:class:`Pairs`: slot 0 chosen, slot 1 rejected).

The reference model is the frozen starting parameters passed to the
step (``config.reference='frozen'``: rebuilt with ``nnx.merge`` under
``stop_gradient``), the policy's own base model with its LoRA adapters
switched off (``config.reference='base'``: same arrays, no copy), or
log-probs precomputed into the batch (``config.preference.cache_reference``:
:mod:`alignax.reference`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from alignax import losses
from alignax import policy
from alignax.models import lora

Array = jax.Array


# --- (sum, count) metrics -------------------------------------------------------


def mean_of(x, where):
  """A ``(sum, count)`` metric of ``x`` over ``where`` (no gradient)."""
  x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  return (jnp.sum(jnp.where(where, x, 0.0)),
          jnp.sum(where).astype(jnp.float32))


def reduce(per_example, valid, metrics):
  """``(loss_sum, (count, metrics + loss))`` over the valid examples."""
  loss_sum = jnp.sum(jnp.where(valid, per_example, 0.0))
  count = jnp.sum(valid).astype(jnp.float32)
  return loss_sum, (count, {"loss": (loss_sum, count), **metrics})


# --- config checks shared by the preference-data objectives -----------------------


def check_format(config, *formats) -> None:
  """Raises unless ``config.data.preference.format`` is one of ``formats``."""
  fmt = config.data.preference.format
  if fmt not in formats:
    raise ValueError(f"config.objective={config.objective!r} needs "
                     f"config.data.preference.format in {formats}, got "
                     f"{fmt!r}")


def reference_mode(config, needs_reference: bool = True) -> str:
  """``'frozen'``, ``'base'``, ``'cached'`` or ``'none'``, from the config.

  ``cache_reference=True`` without a filled cache means the run did not go
  through ``train.run`` (which fills it first, see :mod:`alignax.reference`).
  """
  if not needs_reference:
    return "none"
  if config.reference in ("frozen", "base"):
    return config.reference
  if config.data.preference.reference_cache:
    return "cached"
  if config.preference.cache_reference:
    raise ValueError(
        "config.preference.cache_reference=True but "
        "config.data.preference.reference_cache is empty: train.run fills "
        "it; outside the loop call alignax.reference.prepare(config, workdir)")
  raise ValueError(
      f"config.objective={config.objective!r} needs a reference model: set "
      "config.reference='frozen' (live) or config.preference.cache_reference"
      "=True (log-probs precomputed before training)")


# --- packed preference batches ---------------------------------------------------


def hidden_states(model, batch):
  """Final hidden states ``[B, T, D]`` of a packed preference batch."""
  return model(batch["inputs"], positions=batch["positions"],
               segment_ids=batch["segment_ids"], prefix=batch["prefix"],
               attend_to=batch["attend_to"], return_hidden=True)


def slot_weights(batch) -> Array:
  """``[B, S, T]`` completion weights of each response slot."""
  num_slots = batch["labels"].shape[1]
  in_slot = batch["slot"][:, None, :] == jnp.arange(num_slots)[None, :, None]
  weights = batch["weights"].astype(jnp.float32)[:, None, :]  # [B, 1, T]
  return jnp.where(in_slot, weights, 0.0)


def ld_weights(batch, *, list_size: int, alpha: float) -> Array:
  """``[B, S, T]`` LD-DPO weights: the tail of the longer answer scaled.

  LD-DPO (Liu et al., 2024, *Length Desensitization in Direct Preference
  Optimization*; TRL's ``ld_alpha``) splits each answer's log-prob into the
  tokens up to the shorter answer of its group (weight 1) and the rest
  (weight ``alpha``): ``log p = shared + alpha * tail``. ``alpha = 1`` is
  plain DPO.
  """
  weights = slot_weights(batch)
  in_answer = weights > 0
  position = jnp.cumsum(in_answer, axis=-1)  # 1-based within each slot
  lengths = jnp.sum(in_answer, axis=-1)  # [B, S]
  b, s = lengths.shape
  shared = jnp.min(lengths.reshape(b, s // list_size, list_size), axis=-1)
  shared = jnp.repeat(shared, list_size, axis=-1)  # [B, S]
  tail = position > shared[..., None]
  return jnp.where(tail, alpha * weights, weights)


def _per_slot(tokens, weights):
  """``[B, T]`` per-token values as ``[B, S, T]``, one copy per slot."""
  return jnp.broadcast_to(tokens[:, None, :], weights.shape)


def _slot_sums(tokens, batch, sum_weights):
  """``(sums, counts, means)`` ``[B, S]`` of per-token log-probs ``[B, T]``."""
  weights = slot_weights(batch)  # [B, S, T]
  per_slot = _per_slot(tokens, weights)
  sums = policy.sequence_logps(
      per_slot, weights if sum_weights is None else sum_weights)
  return (sums, policy.completion_lengths(weights),
          policy.mean_logps(per_slot, weights))


def slot_logps(model, batch, *, chunk_size=None, sum_weights=None):
  """Summed log-probs, token counts and mean log-probs per slot, ``[B, S]``.

  ``sum_weights`` (``[B, S, T]``, e.g. :func:`ld_weights`) weight the sums
  only; counts and means keep the plain completion weights.
  """
  hidden = hidden_states(model, batch)
  tokens = policy.model_token_logps(model, hidden, batch["targets"],
                                    chunk_size=chunk_size or 0)  # [B, T]
  return _slot_sums(tokens, batch, sum_weights)


def slot_logps_and_wpo(model, batch, *, chunk_size=None, sum_weights=None):
  """:func:`slot_logps` plus WPO's weight of each slot, ``[B, S]``.

  One forward pass: the fused LM head also returns
  :math:`\\log\\sum_v p_v^2` per token, accumulated over vocabulary chunks
  (no ``[B, T, V]`` logits), and :func:`alignax.losses.wpo_weights` turns
  it into constant (no-gradient) weights over the plain completion mask.
  """
  hidden = hidden_states(model, batch)
  tokens, log_p2 = policy.model_token_logps_and_log_sum_p2(
      model, hidden, batch["targets"], chunk_size=chunk_size or 0)  # [B, T]
  weights = slot_weights(batch)  # [B, S, T]
  wpo = losses.wpo_weights(_per_slot(tokens, weights),
                           _per_slot(log_p2, weights), weights)
  return (*_slot_sums(tokens, batch, sum_weights), wpo)


def reference_slot_logps(model, batch, frozen, *, reference, chunk_size=None,
                         sum_weights=None):
  """Reference log-probs ``[B, S]``: live from ``frozen`` or from the base
  model under the adapters (``'base'``), cached, or 0."""
  if reference == "base":
    return jax.lax.stop_gradient(slot_logps(
        lora.without_adapters(model), batch, chunk_size=chunk_size,
        sum_weights=sum_weights)[0])
  if reference == "frozen":
    if frozen is None:
      raise ValueError("reference='frozen' but the step got no frozen "
                       "parameters (config.reference must be 'frozen').")
    ref_model = nnx.merge(nnx.graphdef(model), jax.lax.stop_gradient(frozen))
    return jax.lax.stop_gradient(
        slot_logps(ref_model, batch, chunk_size=chunk_size,
                   sum_weights=sum_weights)[0])
  if reference == "cached":
    return batch["ref_logps"].astype(jnp.float32)
  return jnp.zeros(batch["labels"].shape, jnp.float32)


class Lists(NamedTuple):
  """Per-example views ``[P, K]`` (``P = B * G``) of a packed batch."""
  logps: Array
  ref_logps: Array
  lengths: Array
  mean_logps: Array
  labels: Array
  valid: Array
  rewards: Array  # [P, K, M]
  wpo_weights: Array  # WPO's weight per response (1 without use_weighting)


def gather_lists(model, batch, frozen, *, list_size, reference,
                 chunk_size=None, ld_alpha=1.0, use_weighting=False) -> Lists:
  """Runs the policy (and reference) and regroups slots into examples.

  ``ld_alpha < 1``: LD-DPO's summed log-probs (:func:`ld_weights`) for the
  policy and a live reference alike (a cached one was computed with them).
  ``use_weighting``: WPO's weights of the policy's responses
  (:func:`slot_logps_and_wpo`), else ones.
  """
  sum_weights = (None if ld_alpha == 1.0 else
                 ld_weights(batch, list_size=list_size, alpha=ld_alpha))
  if use_weighting:
    logps, lengths, means, wpo = slot_logps_and_wpo(
        model, batch, chunk_size=chunk_size, sum_weights=sum_weights)
  else:
    logps, lengths, means = slot_logps(model, batch, chunk_size=chunk_size,
                                       sum_weights=sum_weights)
    wpo = jnp.ones_like(logps)
  ref = reference_slot_logps(model, batch, frozen, reference=reference,
                             chunk_size=chunk_size, sum_weights=sum_weights)
  b, s = logps.shape
  if s % list_size:
    raise ValueError(f"{s} response slots per row are not a multiple of "
                     f"list_size={list_size}.")
  as_lists = lambda x: x.reshape(b * s // list_size, list_size, *x.shape[2:])
  valid = batch["valid"].astype(bool)
  return Lists(*(as_lists(x) for x in (
      logps, jnp.where(valid, ref, 0.0), lengths, means,
      batch["labels"].astype(jnp.float32), valid,
      batch["rewards"].astype(jnp.float32), wpo)))


class Pairs(NamedTuple):
  """Chosen (slot 0) / rejected (slot 1) views ``[P]``.

  Invalid pairs hold 0, except the mean log-probs, which hold -1 (ORPO's
  odds need a log-prob below 0).
  """
  chosen: Array
  rejected: Array
  ref_chosen: Array
  ref_rejected: Array
  chosen_lengths: Array
  rejected_lengths: Array
  chosen_mean: Array
  rejected_mean: Array
  valid: Array
  chosen_rewards: Array  # [P, M]
  rejected_rewards: Array


def to_pairs(lists: Lists) -> Pairs:
  """The ``K = 2`` view of :class:`Lists`."""
  valid = lists.valid[:, 0] & lists.valid[:, 1]

  def pick(x, k, fill=0.0):
    return jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 2)), x[:, k], fill)

  return Pairs(pick(lists.logps, 0), pick(lists.logps, 1),
               pick(lists.ref_logps, 0), pick(lists.ref_logps, 1),
               pick(lists.lengths, 0), pick(lists.lengths, 1),
               pick(lists.mean_logps, 0, -1.0), pick(lists.mean_logps, 1, -1.0),
               valid, pick(lists.rewards, 0), pick(lists.rewards, 1))
