r"""GRACE's contrastive rewards on rationale embeddings, in NumPy.

GRACE (Sun et al., 2025) turns a contrastive objective into the reward of a
generative policy: the LM writes a rationale for a text, the rationale's
embedding is the mean of the policy's final hidden states over it, and the
embedding's contrastive score is the reward that GRPO maximises. This module
is the reward, on embeddings; :mod:`alignax.grace` makes the rationales and
their embeddings.

Rows come in groups of ``G`` (the GRPO group): group ``g`` holds ``G``
sampled rationales ("samples", the rows that are trained) of one text, and
each row has an anchor: the embedding of its partner text's rationale (the
query's for a document group). Following the authors' reward manager
(``verl/workers/reward_manager/grace.py``, ``HiddenRewardManager`` in
github.com/GasolSun36/GRACE at f636fdc, supervised mode with
``with_scale=True``), with :math:`s(\cdot,\cdot)` the cosine similarity,
:math:`a_{gi}` the anchor and :math:`x_{gi}` the sample of row ``i`` of
group ``g``:

.. math::

   \mathrm{pos}_{gi} &= s(a_{gi}, x_{gi}) \\
   \mathrm{neg}_{gi} &= -s(a_{g1}, n_{g1}) \\
   \mathrm{clu}_{gi} &= \tfrac{1}{G-1} \textstyle\sum_{j \ne i} s(x_{gi}, x_{gj}) \\
   \mathrm{cross}_{gi} &= -\tfrac{1}{P-1} \textstyle\sum_{h \ne g}
        \max_j s(a_{gi}, x_{hj}) \\
   r_{gi} &= \big(\mathrm{pos} + \mathrm{neg} + w_c\,\mathrm{clu}
        + w_x\,\mathrm{cross}\big)_{gi} / \tau

``neg`` needs an explicit negative text's rationale :math:`n` (the first
row's of each group, as the authors' code); without one it is 0. ``cross``
is the in-batch hard negative: each other group's most similar sample. With
one group it is 0, and with ``G = 1`` ``clu`` is 0. The authors' run
(``train.sh``) uses :math:`\tau = 0.1`, :math:`w_c = w_x = 0.2`; a
completion that reaches the length limit without its stop token gets
:math:`-1` instead (:func:`length_penalized`).

In the authors' rollout every row of a group shares one anchor (one query
rationale per prompt, sampled at temperature 0.5), so ``neg`` and ``cross``
are constant within a group and vanish from GRPO's group-centred
advantages; they still move the reward's level (and its metrics).

References:
  Sun et al., 2025, GRACE: Generative Representation Learning via
  Contrastive Policy Optimization (arXiv:2510.04506; ICLR 2026).
"""

from __future__ import annotations

import numpy as np

COMPONENTS = ("positive", "negative", "clustering", "cross_group")


def _unit(x, name):
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name} must have shape [B, D], got {x.shape}.")
  if not np.isfinite(x).all():
    raise ValueError(f"{name} must be finite (no NaN or inf).")
  # torch.nn.functional.normalize: x / max(||x||, 1e-12)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def grace_components(anchors, samples, negatives=None, *,
                     num_generations: int) -> dict[str, np.ndarray]:
  """GRACE's unscaled reward terms (module docstring), each ``[B]``.

  Args:
    anchors: ``[B, D]`` embeddings of each row's partner rationale (the
      query's for document samples).
    samples: ``[B, D]`` embeddings of the sampled rationales, ``B = P * G``
      rows in groups of ``G = num_generations`` (rows ``g*G .. g*G+G-1``).
    negatives: optional ``[B, D]`` embeddings of a negative text's
      rationale; only each group's first row is read.
    num_generations: ``G``.

  Returns:
    ``{'positive', 'negative', 'clustering', 'cross_group'}``, float64
    ``[B]`` each, before the weights and the temperature.
  """
  a, x = _unit(anchors, "anchors"), _unit(samples, "samples")
  g = int(num_generations)
  if a.shape != x.shape or g < 1 or x.shape[0] % g:
    raise ValueError(f"anchors {a.shape} and samples {x.shape} must share "
                     f"one shape [B, D] with B a multiple of G={g}.")
  b, p = x.shape[0], x.shape[0] // g
  group = np.arange(b) // g
  positive = np.sum(a * x, -1)  # [B]
  negative = np.zeros(b)
  if negatives is not None:
    n = _unit(negatives, "negatives")
    if n.shape != x.shape:
      raise ValueError(f"negatives {n.shape} must match samples {x.shape}.")
    first = np.sum(a[::g] * n[::g], -1)  # [P]
    negative = -first[group]
  clustering = np.zeros(b)
  if g > 1:
    xs = x.reshape(p, g, -1)
    sim = np.einsum("pid,pjd->pij", xs, xs)  # [P, G, G]
    off = sim.sum(-1) - np.einsum("pii->pi", sim)
    clustering = (off / (g - 1)).reshape(b)
  cross = np.zeros(b)
  if p > 1:
    sim = (a @ x.T).reshape(b, p, g).max(-1)  # [B, P]: best sample per group
    others = group[:, None] != np.arange(p)[None, :]
    cross = -np.sum(np.where(others, sim, 0.0), -1) / (p - 1)
  return {"positive": positive, "negative": negative,
          "clustering": clustering, "cross_group": cross}


def grace_rewards(anchors, samples, negatives=None, *, num_generations: int,
                  temperature: float = 0.1, clustering_weight: float = 0.2,
                  cross_group_weight: float = 0.2):
  r"""GRACE's total reward of each sampled rationale, and its terms.

  .. math:: r = (\mathrm{pos} + \mathrm{neg} + w_c\,\mathrm{clu}
            + w_x\,\mathrm{cross}) / \tau

  Args:
    anchors, samples, negatives, num_generations: as
      :func:`grace_components`.
    temperature: :math:`\tau > 0` (the authors' ``train.sh``: 0.1).
    clustering_weight: :math:`w_c` (0.2).
    cross_group_weight: :math:`w_x` (0.2).

  Returns:
    ``(total [B], terms)``: ``terms`` the components divided by
    :math:`\tau` (unweighted), as the authors log them; float64.
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  terms = {k: v / temperature for k, v in grace_components(
      anchors, samples, negatives, num_generations=num_generations).items()}
  total = (terms["positive"] + terms["negative"]
           + clustering_weight * terms["clustering"]
           + cross_group_weight * terms["cross_group"])
  return total, terms


def length_penalized(rewards, truncated, *, penalty: float = -1.0):
  """``rewards`` with ``penalty`` on rows whose completion hit the length
  limit without a stop token (the authors' ``enable_length_penalty``).

  Args:
    rewards: ``[B]``.
    truncated: ``[B]`` bool.
  """
  rewards = np.asarray(rewards, np.float64)
  truncated = np.asarray(truncated, bool)
  if rewards.shape != truncated.shape:
    raise ValueError(f"rewards {rewards.shape} and truncated "
                     f"{truncated.shape} must have one shape [B].")
  return np.where(truncated, penalty, rewards)


INFONCE_COMPONENTS = ("positive", "log_partition")


def infonce_rewards(partner_anchors, samples, *, num_generations: int,
                    temperature: float = 0.1):
  r"""Per-sample InfoNCE reward: the sample's own pair against in-batch ones.

  GRACE's terms that tell pairs apart (``neg``, ``cross``) are constant
  within a group (one anchor per text), so GRPO's group-centred advantage
  only sees ``pos + w_c clu``: closeness to the partner, which a rationale
  can raise by moving every embedding towards a common direction. This
  reward scores each sample the way the contrastive loss scores it, against
  the partner anchors of all ``P`` groups of its side:

  .. math:: r_{gi} = \frac{s(x_{gi}, a_g)}{\tau}
            - \log \sum_{h=1}^{P} e^{s(x_{gi}, a_h) / \tau}

  (:math:`\log p(g \mid x_{gi})`, at most 0), so a sample gains by being
  nearer its partner *than the other pairs' partners*, which is what
  Recall@k measures.

  Args:
    partner_anchors: ``[P, D]``, group ``g``'s partner anchor (the query's
      rationale embedding for a document group).
    samples: ``[P * G, D]`` sampled rationale embeddings, group-major.
    num_generations: ``G``.
    temperature: :math:`\tau > 0`.

  Returns:
    ``(total [P*G], {'positive', 'log_partition'})``, float64; ``total =
    positive - log_partition``.
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  a, x = _unit(partner_anchors, "anchors"), _unit(samples, "samples")
  g = int(num_generations)
  if g < 1 or a.shape[1:] != x.shape[1:] or x.shape[0] != a.shape[0] * g:
    raise ValueError(f"anchors {a.shape} and samples {x.shape} must be "
                     f"[P, D] and [P * G, D] with G={g}.")
  logits = (x @ a.T) / temperature  # [P*G, P]
  own = np.arange(x.shape[0]) // g
  positive = logits[np.arange(x.shape[0]), own]
  top = logits.max(-1)
  log_partition = top + np.log(np.exp(logits - top[:, None]).sum(-1))
  return positive - log_partition, {"positive": positive,
                                    "log_partition": log_partition}
