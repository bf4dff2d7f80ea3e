r"""Causal reward model: Bradley–Terry plus an MMD across spurious bins.

The model is :class:`alignax.models.heads.RewardModel`. The loss of a batch
of preference pairs is

.. math::
   \mathcal{L} = \frac{1}{P}\sum_i -\log\sigma(r^c_i - r^r_i)
   + \lambda\,\frac{1}{|\mathcal{P}|}\sum_{(a,b)\in\mathcal{P}}
   \mathrm{MMD}^2\big(P_{\phi \mid z = a},\, P_{\phi \mid z = b}\big)

with :math:`\phi` the reward model's representation of each response (the
final hidden state its reward is read from, ``reward.mmd_features='hidden'``,
or the scalar reward itself, ``'reward'``), :math:`z` the bin of its
spurious attribute, and :math:`\mathcal{P}` the pairs of non-empty bins of
the batch (:func:`alignax.losses.binned_mmd_penalty`, Gaussian kernel,
bandwidth ``reward.mmd_bandwidth`` or the median heuristic when 0). With
``reward.mmd_conditional`` the bins are compared within the chosen and
within the rejected responses only (the paper's conditional CRM, which
conditions on the preference label); otherwise across all responses (the
unconditional CRM).

The spurious attribute (``reward.spurious``) is ``'length'``, the response's
token count, or the name of a per-response number of the records, listed in
``data.preference.reward_fields`` (``chosen_<name>`` / ``rejected_<name>``
fields of the pairs). Bins: ``reward.bins`` gives bin edges (``z <
e_0``, ``e_0 <= z < e_1``, ...); without edges, length is cut at the
batch's ``reward.num_bins``-quantiles and a named attribute's integer value
is its bin (``0 .. num_bins - 1``).

The penalty is computed over each (micro)batch and enters the summed loss
as ``count * lambda * penalty``, so the step's mean is the formula above.

References:
  Wang, Zhao, Jiang, Chen, Zhu, Chen, Liu, Zhang, Fan, Ma & Wang, *Beyond
  Reward Hacking: Causal Rewards for Large Language Model Alignment*, 2025
  (arXiv:2501.09620); Veitch et al., *Counterfactual Invariance to Spurious
  Correlations*, NeurIPS 2021.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from alignax import losses
from alignax import policy
from alignax.models import heads
from alignax.objectives import common
from alignax.objectives import multi_reward

FEATURES = ("hidden", "reward")


@dataclasses.dataclass(frozen=True)
class Spurious:
  """How a response's spurious attribute becomes its bin.

  Attributes:
    field: index into ``batch['rewards']`` (-1 = the token length).
    edges: increasing bin edges; () = quantiles (length) or the value.
    num_bins: M.
  """
  field: int = -1
  edges: tuple[float, ...] = ()
  num_bins: int = 4

  @property
  def total_bins(self):
    return len(self.edges) + 1 if self.edges else self.num_bins


def spurious_values(batch, spurious: Spurious):
  """``[B, S]`` float32 spurious attribute of every slot."""
  if spurious.field < 0:
    return policy.completion_lengths(common.slot_weights(batch)).astype(
        jnp.float32)
  return batch["rewards"][..., spurious.field].astype(jnp.float32)


def spurious_bins(values, valid, spurious: Spurious):
  """``[N]`` int bins of ``[N]`` values (see the module docstring)."""
  if spurious.edges:
    return jnp.searchsorted(jnp.asarray(spurious.edges, jnp.float32), values,
                            side="right")
  if spurious.field >= 0:  # an integer attribute is its own bin
    return jnp.round(values).astype(jnp.int32)
  qs = jnp.linspace(0.0, 1.0, spurious.num_bins + 1)[1:-1]
  edges = jnp.nanquantile(jnp.where(valid, values, jnp.nan), qs)
  return jnp.searchsorted(edges, values, side="right")


def mmd_penalty(features, values, valid, labels, *, spurious: Spurious,
                bandwidth=0.0, conditional=False):
  """The CRM penalty of ``[N, D]`` features with ``[N]`` spurious values.

  ``labels`` ``[N]`` (0 chosen, 1 rejected) separate the bins when
  ``conditional``.
  """
  bins = spurious_bins(values, valid, spurious)
  m = spurious.total_bins
  sigma = (losses.median_bandwidth(features, where=valid) if not bandwidth
           else bandwidth)
  if not conditional:
    return losses.binned_mmd_penalty(features, bins, num_bins=m,
                                     bandwidth=sigma, where=valid)
  groups = bins + m * labels  # [N] in [0, 2M)
  label_of = jnp.arange(2 * m) // m
  same = label_of[:, None] == label_of[None, :]
  in_range = (bins >= 0) & (bins < m)
  return losses.binned_mmd_penalty(features, groups, num_bins=2 * m,
                                   bandwidth=sigma, where=valid & in_range,
                                   pair_mask=same)


def causal_reward_objective(model, batch, rng, *, frozen=None, mmd_weight,
                            spurious: Spurious, bandwidth=0.0,
                            conditional=False, features="hidden"):
  """Bradley–Terry over the valid pairs plus ``mmd_weight`` x the penalty."""
  del rng, frozen
  states, _, present = multi_reward.slot_states(
      common.hidden_states(model, batch), batch)  # [B, S, D]
  r = model.rewards_from_hidden(states)  # [B, S]
  slots_valid = batch["valid"].astype(bool) & present
  pairs = r.reshape(-1, 2)
  valid = slots_valid.reshape(-1, 2).all(-1)
  chosen, rejected = pairs[:, 0], pairs[:, 1]
  per_pair = losses.bradley_terry_loss(chosen, rejected)
  b, s = r.shape
  phi = (states.reshape(b * s, -1) if features == "hidden"
         else r.reshape(b * s))
  labels = jnp.broadcast_to(jnp.arange(s) % 2, (b, s)).reshape(-1)
  penalty = mmd_penalty(phi, spurious_values(batch, spurious).reshape(-1),
                        slots_valid.reshape(-1), labels, spurious=spurious,
                        bandwidth=bandwidth, conditional=conditional)
  bt_sum = jnp.sum(jnp.where(valid, per_pair, 0.0))
  count = jnp.sum(valid).astype(jnp.float32)
  loss_sum = bt_sum + mmd_weight * penalty * count
  mean_of = common.mean_of
  metrics = {"loss": (loss_sum, count), "reward/bt_loss": (bt_sum, count),
             # Weighted by pairs, as the loss: empty (padding) batches add 0.
             "reward/mmd": (jax.lax.stop_gradient(penalty) * count, count),
             "reward/accuracy": mean_of(chosen > rejected, valid),
             "reward/chosen": mean_of(chosen, valid),
             "reward/rejected": mean_of(rejected, valid),
             "reward/margin": mean_of(chosen - rejected, valid)}
  return loss_sum, (count, metrics)


def spurious_from_config(config) -> Spurious:
  """``reward.spurious`` / ``bins`` / ``num_bins`` as a :class:`Spurious`."""
  rw = config.reward
  fields = tuple(config.data.preference.reward_fields)
  field = -1 if rw.spurious == "length" else fields.index(rw.spurious)
  return Spurious(field=field, edges=tuple(float(e) for e in rw.bins),
                  num_bins=int(rw.num_bins))


def from_config(config, *, mesh=None):
  """The causal reward-model objective; reads pairs."""
  del mesh
  common.check_format(config, "pairs")
  rw = config.reward
  return functools.partial(
      causal_reward_objective, mmd_weight=float(rw.mmd_weight),
      spurious=spurious_from_config(config),
      bandwidth=float(rw.mmd_bandwidth), conditional=bool(rw.mmd_conditional),
      features=rw.mmd_features)


def model_builder(config):
  """``RewardModel`` (the scalar head of ``objective='reward_model'``)."""
  del config
  return heads.RewardModel
