"""ArmoRM's two stages: attribute regression, then the gate on preferences.

The model is :class:`alignax.models.multi_reward.MultiRewardModel` (the
backbone, K attribute heads, a verbosity decorrelation and a prompt gate).

* ``multi_reward`` (stage 1) regresses the K attribute rewards, read at each
  response's last token, on absolute ratings (``data.task='ratings'``, see
  :mod:`alignax.data.ratings`): the squared error over the observed ratings
  only (:func:`alignax.losses.masked_regression_loss`); the loss is the mean
  over observed ratings. The gate and the decorrelation are not trained.
* ``reward_gate`` (stage 2) trains only the gate (and its scale
  :math:`\\beta`) with the Bradley–Terry loss of the gated mixture
  (:func:`alignax.losses.gated_bradley_terry_loss`) on preference pairs;
  the backbone and the attribute heads are frozen, as in the paper: the
  objective reads them under ``stop_gradient`` and the optimizer leaves
  every other parameter as it is (``ObjectiveSpec.frozen``). Before it, the
  decorrelation is fitted on a reference set
  (:mod:`alignax.decorrelation`).

Metrics: per attribute, ``attr/<name>/mse`` (over the observed ratings) and
``attr/<name>/mean`` (the prediction); the gate's mean weight per attribute
``gate/<name>`` and ``gate/beta``; TRL's reward-model metrics
``reward/accuracy`` (of the mixture), ``chosen``, ``rejected``, ``margin``.
Held-out Pearson and Spearman correlations per attribute come from
:class:`RatingsEvaluator` (``eval/ratings/<name>/...``).

References:
  Wang, Xiong, Xie, Zhao & Zhang, *Interpretable Preferences via
  Multi-Objective Reward Modeling and Mixture-of-Experts*, 2024.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from alignax import losses
from alignax import sharding as shd
from alignax.data import ratings
from alignax.models import multi_reward as mr
from alignax.objectives import common


def slot_states(hidden, batch):
  """Hidden states of each response slot: ``([B, S, D] at its last token,
  [B, S, D] at the prompt's last token, [B, S] slot present)``.

  The last token is the one whose target is the response's last (EOS): it
  has read prompt and response. The prompt's last token is the input of the
  slot's first weighted position, in both packed layouts: it has read the
  prompt only.
  """
  in_slot = common.slot_weights(batch) != 0  # [B, S, T]
  t = in_slot.shape[-1]
  pos = jnp.arange(t)
  last = jnp.max(jnp.where(in_slot, pos, -1), axis=-1)  # [B, S]
  first = jnp.min(jnp.where(in_slot, pos, t), axis=-1)
  f32 = jnp.promote_types(hidden.dtype, jnp.float32)
  pick = lambda at: jnp.einsum("bst,btd->bsd", (pos == at[..., None]).astype(
      f32), hidden.astype(f32))  # [B, S, D]
  return pick(last), pick(first), last >= 0


def multi_reward_objective(model, batch, rng, *, frozen=None, attributes):
  """Masked squared error of the K attribute rewards (stage 1)."""
  del rng, frozen
  hidden = common.hidden_states(model, batch)
  states, _, present = slot_states(hidden, batch)
  pred = model.attribute_rewards(states)  # [B, S, K]
  k = pred.shape[-1]
  targets = batch["rewards"].astype(jnp.float32)  # [B, S, K], NaN = missing
  mask = ((batch["valid"].astype(bool) & present)[..., None]
          & jnp.isfinite(targets))
  per = losses.masked_regression_loss(pred.reshape(-1, k),
                                      targets.reshape(-1, k),
                                      mask.reshape(-1, k))
  loss_sum = jnp.sum(per)
  count = jnp.sum(mask).astype(jnp.float32)
  err = jnp.square(pred - jnp.where(mask, targets, 0.0))
  metrics = {"loss": (loss_sum, count)}
  for i, name in enumerate(attributes):
    metrics[f"attr/{name}/mse"] = common.mean_of(err[..., i], mask[..., i])
    metrics[f"attr/{name}/mean"] = common.mean_of(pred[..., i], mask[..., i])
  return loss_sum, (count, metrics)


def reward_gate_objective(model, batch, rng, *, frozen=None, attributes):
  """Bradley–Terry loss of the gated mixture, the gate only (stage 2)."""
  del rng, frozen
  hidden = jax.lax.stop_gradient(common.hidden_states(model, batch))
  states, prompt, present = slot_states(hidden, batch)
  rewards = jax.lax.stop_gradient(
      model.adjusted(model.attribute_rewards(states)))  # [B, S, K]
  logits = model.gate_logits(prompt)  # [B, S, K]
  k = rewards.shape[-1]
  pairs = rewards.reshape(-1, 2, k)
  gate = logits.reshape(-1, 2, k)[:, 0]  # both slots read the same prompt
  valid = (batch["valid"].astype(bool) & present).reshape(-1, 2).all(-1)
  beta = model.gate.beta()
  per_pair = losses.gated_bradley_terry_loss(pairs[:, 0], pairs[:, 1], gate,
                                             beta=beta)
  weights = jax.nn.softmax(gate, axis=-1)  # [P, K]
  chosen = losses.gated_rewards(pairs[:, 0], weights)
  rejected = losses.gated_rewards(pairs[:, 1], weights)
  metrics = {"reward/accuracy": common.mean_of(chosen > rejected, valid),
             "reward/chosen": common.mean_of(chosen, valid),
             "reward/rejected": common.mean_of(rejected, valid),
             "reward/margin": common.mean_of(chosen - rejected, valid),
             "gate/beta": common.mean_of(jnp.broadcast_to(beta, valid.shape),
                                     valid)}
  for i, name in enumerate(attributes):
    metrics[f"gate/{name}"] = common.mean_of(weights[:, i], valid)
  return common.reduce(per_pair, valid, metrics)


def multi_reward_from_config(config, *, mesh=None):
  """Stage 1; reads ``data.task='ratings'`` batches."""
  del mesh
  return functools.partial(multi_reward_objective,
                           attributes=tuple(config.data.preference.attributes))


def reward_gate_from_config(config, *, mesh=None):
  """Stage 2; reads preference pairs."""
  del mesh
  common.check_format(config, "pairs")
  return functools.partial(reward_gate_objective,
                           attributes=tuple(config.data.preference.attributes))


def verbose_index(config):
  """Index of ``reward.verbosity_attribute`` in the attributes (-1 = none)."""
  name = config.reward.verbosity_attribute
  attributes = tuple(config.data.preference.attributes)
  return attributes.index(name) if name in attributes else -1


def model_builder(config):
  """``MultiRewardModel`` with K = ``data.preference.attributes``."""
  return functools.partial(
      mr.MultiRewardModel,
      num_attributes=len(config.data.preference.attributes),
      gate_hidden=int(config.reward.gate_hidden),
      verbose_index=verbose_index(config),
      gate_beta=float(config.reward.gate_beta))


def stage1_frozen(path) -> bool:
  """Stage 1 trains the backbone and the attribute heads, not the gate."""
  return path[0] in (mr.GATE, mr.DECORRELATION)


def stage2_frozen(path) -> bool:
  """Stage 2 trains the gate only."""
  return path[0] != mr.GATE


class RatingsEvaluator:
  """Held-out MSE, Pearson and Spearman correlation of each attribute.

  Predictions of the held-out rating records (``train.eval_batches``
  batches of them, each process its shard), gathered on every process,
  against the observed ratings: ``ratings/<name>/{mse,pearson,spearman}``.
  """

  def __init__(self, config, tokenizer, mesh, graphdef):
    self._attributes = tuple(config.data.preference.attributes)
    self._batches = list(ratings.build_ratings_eval_batches(
        config.data, tokenizer, seq_len=config.train.seq_len,
        batch_size=config.train.batch_size // jax.process_count(),
        num_batches=config.train.eval_batches,
        process_index=jax.process_index(),
        process_count=jax.process_count()))
    self._mesh = mesh

    def predict(params, batch):
      with shd.activation_sharding(mesh):
        model = nnx.merge(graphdef, params)
        states, _, present = slot_states(common.hidden_states(model, batch),
                                         batch)
        keep = batch["valid"].astype(bool) & present
        return model.attribute_rewards(states), keep, batch["rewards"]
    self._predict = jax.jit(predict)

  def predictions(self, params):
    """Host ``(predictions [N, K], ratings [N, K])`` (NaN = not rated)."""
    preds, targets = [], []
    for batch in self._batches:
      out = self._predict(params, shd.host_to_global(batch, self._mesh))
      pred, keep, rated = (np.asarray(multihost_utils.process_allgather(
          x, tiled=True)) for x in out)
      preds.append(pred[keep])
      targets.append(rated[keep])
    return np.concatenate(preds), np.concatenate(targets)

  def __call__(self, params):
    preds, targets = self.predictions(params)
    out = {}
    for i, name in enumerate(self._attributes):
      seen = np.isfinite(targets[:, i])
      p, t = preds[seen, i], targets[seen, i]
      if len(p) < 2:
        continue
      out[f"ratings/{name}/mse"] = float(np.mean((p - t) ** 2))
      out[f"ratings/{name}/pearson"] = float(np.corrcoef(p, t)[0, 1]) if (
          np.std(p) > 0 and np.std(t) > 0) else 0.0
      out[f"ratings/{name}/spearman"] = float(losses.spearman(p, t))
    return out


def ratings_evaluator(config, tokenizer, mesh, graphdef):
  """``train.EVALUATORS['ratings']``: a :class:`RatingsEvaluator`."""
  return RatingsEvaluator(config, tokenizer, mesh, graphdef)
