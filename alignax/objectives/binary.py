"""Binary-feedback objectives beside KTO: BCO and NPO.

Batches are the ``binary`` preference batches (``prompt/completion/label``,
see :mod:`alignax.data.preference`): slot 0 of each example is the
completion, slot 1 the mismatched completion KTO uses for its KL baseline
(unused here). Both need a reference model (frozen or cached).

**BCO** (Jung et al., 2024; TRL ``BCOTrainer``) shifts the implicit reward by
``delta``, the running mean of every reward seen so far. The mean and its
count live in ``TrainState.extras`` (checkpointed, so a resumed run carries
on with the same ``delta``): each step's loss uses the mean updated with
that step's rewards, as TRL updates ``RunningMoments`` before the loss (with
microbatches, each microbatch folds in its own rewards), and the step stores
the mean updated with the whole batch.

**NPO** (Zhang et al., 2024) unlearns the undesirable completions
(label 0); desirable ones (label 1) are the retain set, trained with their
mean token NLL weighted by ``preference.sft_weight`` (NPO+RT; 0 = ignored).
"""

import functools

import jax
import jax.numpy as jnp

from alignax import losses
from alignax.objectives import common

mean_of = common.mean_of


def _completions(model, batch, frozen, *, reference, chunk_size):
  lists = common.gather_lists(model, batch, frozen, list_size=2,
                              reference=reference, chunk_size=chunk_size)
  return (lists.logps[:, 0], lists.ref_logps[:, 0], lists.lengths[:, 0],
          lists.labels[:, 0] > 0.5, lists.valid[:, 0])


class BCOObjective:
  """BCO with its running reward mean in ``TrainState.extras``."""

  def __init__(self, *, beta, reference, chunk_size=None):
    self.beta, self.reference, self.chunk_size = beta, reference, chunk_size

  def init_extras(self):
    return {"bco/mean": jnp.float32(0.0), "bco/count": jnp.float32(0.0)}

  def update_extras(self, extras, metrics):
    """Folds the step's rewards (``bco/rewards``: sum, count) into the mean.

    The batch mean weighted by its count folds in like the rewards it
    averages (``losses.bco_running_mean_update``).
    """
    total, n = metrics["bco/rewards"]
    mean, count = losses.bco_running_mean_update(
        extras["bco/mean"], extras["bco/count"],
        total / jnp.maximum(n, 1.0), weights=n)
    return {"bco/mean": mean.astype(jnp.float32),
            "bco/count": count.astype(jnp.float32)}

  def __call__(self, model, batch, rng, *, frozen=None, extras):
    del rng
    logps, ref, _, desirable, valid = _completions(
        model, batch, frozen, reference=self.reference,
        chunk_size=self.chunk_size)
    rewards = self.beta * (logps - ref)
    seen = mean_of(rewards, valid)  # (sum, count), no gradient
    delta, _ = losses.bco_running_mean_update(
        extras["bco/mean"], extras["bco/count"], rewards, weights=valid)
    per_example = losses.bco_loss(logps, ref, desirable, beta=self.beta,
                                  delta=delta)
    one = jnp.float32(1.0)
    metrics = {
        "rewards/chosen": mean_of(rewards, valid & desirable),
        "rewards/rejected": mean_of(rewards, valid & ~desirable),
        "logps/chosen": mean_of(logps, valid & desirable),
        "logps/rejected": mean_of(logps, valid & ~desirable),
        "bco/rewards": seen,
        "bco/delta": (jax.lax.stop_gradient(delta), one),
    }
    return common.reduce(per_example, valid, metrics)


def npo_objective(model, batch, rng, *, frozen=None, beta, retain_weight,
                  reference, chunk_size=None):
  """NPO on label-0 completions, retain NLL on label-1 ones."""
  del rng
  logps, ref, lengths, desirable, valid = _completions(
      model, batch, frozen, reference=reference, chunk_size=chunk_size)
  forget = losses.npo_loss(logps, ref, beta=beta)
  retain = -logps / jnp.maximum(lengths, 1.0)
  per_example = jnp.where(desirable, retain_weight * retain, forget)
  counted = valid & (~desirable | (retain_weight > 0))
  metrics = {
      "npo/forget_logps": mean_of(logps, valid & ~desirable),
      "npo/retain_nll": mean_of(retain, valid & desirable),
      "rewards/rejected": mean_of(beta * (logps - ref), valid & ~desirable),
  }
  return common.reduce(per_example, counted, metrics)


def bco_from_config(config, *, mesh=None):
  del mesh
  p = config.preference
  common.check_format(config, "binary")
  return BCOObjective(beta=p.beta, reference=common.reference_mode(config),
                      chunk_size=p.logps_chunk or None)


def npo_from_config(config, *, mesh=None):
  del mesh
  p = config.preference
  common.check_format(config, "binary")
  return functools.partial(
      npo_objective, beta=p.beta, retain_weight=p.sft_weight,
      reference=common.reference_mode(config),
      chunk_size=p.logps_chunk or None)
