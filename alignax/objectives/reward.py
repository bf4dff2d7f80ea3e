"""Reward-model objective: Bradley–Terry on packed preference pairs.

The model is :class:`alignax.models.heads.RewardModel` (the backbone plus a
scalar head); a response's reward is read at its last token (see there).
Batches are the preference pairs of :mod:`alignax.data.preference_packing`
(slot 0 chosen, slot 1 rejected), so shared-prompt packing and every
preference data format that yields pairs work unchanged. Metrics follow
TRL's ``RewardTrainer``: ``accuracy`` (ties count as wrong), plus the mean
chosen / rejected reward and margin.
"""

import functools

import jax.numpy as jnp

from alignax import losses
from alignax.models import heads
from alignax.objectives import common


def slot_rewards(model, batch):
  """Reward of every response slot, ``[B, S]`` (0 for empty slots)."""
  hidden = common.hidden_states(model, batch)  # [B, T, D]
  per_token = model.rewards_from_hidden(hidden)  # [B, T]
  in_slot = common.slot_weights(batch) != 0  # [B, S, T]
  pos = jnp.arange(per_token.shape[1])
  last = jnp.max(jnp.where(in_slot, pos, -1), axis=-1)  # [B, S]
  picked = jnp.take_along_axis(per_token, jnp.maximum(last, 0), axis=1)
  return jnp.where(last >= 0, picked, 0.0)


def reward_objective(model, batch, rng, *, frozen=None, center_coef=0.0):
  """Bradley–Terry loss of chosen over rejected, summed over valid pairs."""
  del rng, frozen  # deterministic; no reference model
  r = slot_rewards(model, batch)  # [B, S]
  pairs = r.reshape(-1, 2)  # [B * G, 2]
  valid = batch["valid"].astype(bool).reshape(-1, 2).all(-1)
  chosen, rejected = pairs[:, 0], pairs[:, 1]
  per_pair = losses.bradley_terry_loss(chosen, rejected,
                                       center_coef=center_coef)
  mean_of = common.mean_of
  metrics = {"reward/accuracy": mean_of(chosen > rejected, valid),
             "reward/chosen": mean_of(chosen, valid),
             "reward/rejected": mean_of(rejected, valid),
             "reward/margin": mean_of(chosen - rejected, valid)}
  return common.reduce(per_pair, valid, metrics)


def from_config(config, *, mesh=None):
  """The Bradley–Terry objective; reads pairs (``data.preference.format``)."""
  del mesh
  common.check_format(config, "pairs")
  return functools.partial(reward_objective,
                           center_coef=config.preference.reward_center_coef)


def model_builder(config):
  """``RewardModel`` for ``state.create_train_state``."""
  del config
  return heads.RewardModel

