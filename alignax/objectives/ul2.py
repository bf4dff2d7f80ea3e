"""UL2 pretraining objective: token cross-entropy with per-denoiser metrics.

The loss is the prefix-LM token cross-entropy of :mod:`alignax.objectives.lm`
(weights are 0 on every prefix, so only denoiser targets count); UL2 adds
metrics that split it by denoiser, read from the batch's ``denoiser`` field
(see :mod:`alignax.data.ul2_pipeline`). With ``K`` denoisers, for each family
``F`` in R, X, S present in the mixture and each denoiser ``d``:

* ``ul2/F/loss``: ``(sum of F's token losses, F's loss tokens)``, the mean
  loss on F's targets;
* ``ul2/F/tokens``: ``(F's loss tokens, all loss tokens)``, F's share of the
  loss tokens;
* ``ul2/<d.name>/loss``, e.g. ``ul2/X(0.5,64)/loss``: as the family's.

All are ``(sum, count)`` pairs, so they stay exact when the loop adds them
over microbatches, steps and hosts: the family loss sums add up to the
``loss`` sum and the token shares to one.

References:
  Tay et al., *UL2: Unifying Language Learning Paradigms*, ICLR 2023,
  arXiv:2205.05131.
"""

import functools

import jax.numpy as jnp

from alignax.data import ul2_pipeline
from alignax.objectives import lm

FAMILIES = ("R", "X", "S")


def denoiser_metrics(per_token, weights, denoiser_ids, denoisers):
  """Per-family and per-denoiser ``(sum, count)`` metrics.

  Args:
    per_token: ``[B, T]`` float token losses.
    weights: ``[B, T]`` float loss weights (0 on prefixes and padding).
    denoiser_ids: ``[B, T]`` int index of each token's denoiser in
      ``denoisers``.
    denoisers: the mixture, a sequence of ``alignax.data.ul2.Denoiser``
      (``.name`` and ``.kind`` are read).

  Returns:
    dict of ``(sum, count)`` scalar pairs named as in the module docstring.
  """
  if not per_token.shape == weights.shape == denoiser_ids.shape:
    raise ValueError(f"per_token {per_token.shape}, weights {weights.shape} "
                     f"and denoiser {denoiser_ids.shape} must have one shape")
  k = len(denoisers)
  member = (denoiser_ids[..., None] == jnp.arange(k)).astype(weights.dtype)
  tokens_k = jnp.einsum("btk,bt->k", member, weights)  # [K]
  loss_k = jnp.einsum("btk,bt->k", member, weights * per_token)  # [K]
  total = jnp.sum(weights)
  metrics = {}
  for family in FAMILIES:
    ids = [i for i, d in enumerate(denoisers) if d.kind == family]
    if ids:
      tokens = jnp.sum(tokens_k[jnp.asarray(ids)])
      metrics[f"ul2/{family}/loss"] = (jnp.sum(loss_k[jnp.asarray(ids)]),
                                       tokens)
      metrics[f"ul2/{family}/tokens"] = (tokens, total)
  for i, d in enumerate(denoisers):
    metrics[f"ul2/{d.name}/loss"] = (loss_k[i], tokens_k[i])
  return metrics


def ul2_objective(model, batch, rng, *, frozen=None, denoisers, z_loss=0.0):
  """Token cross-entropy on the denoiser targets, metrics per denoiser.

  Args:
    model: an NNX module mapping tokens to logits.
    batch: dict of ``[B, T]`` arrays: the packed fields (``inputs``,
      ``targets``, ``weights``, ``positions``, ``segment_ids``, ``prefix``)
      and ``denoiser``.
    rng: unused (deterministic model); kept for the shared signature.
    frozen: unused; UL2 needs no reference model.
    denoisers: the mixture the batches were made with, in the same order
      (``alignax.data.ul2_pipeline.denoisers_from_config``).
    z_loss: z-loss coefficient (see ``token_cross_entropy``).

  Returns:
    ``(loss_sum, (loss_count, metrics))``: ``loss``, ``accuracy`` and
    :func:`denoiser_metrics`.
  """
  del rng, frozen
  if "denoiser" not in batch:
    raise ValueError(f"ul2_objective needs batches with a 'denoiser' field "
                     f"(config.data.task='ul2'); got fields {sorted(batch)}")
  per_token, weights, metrics = lm.token_losses(model, batch, z_loss=z_loss)
  metrics.update(denoiser_metrics(per_token, weights, batch["denoiser"],
                                  denoisers))
  loss_sum, count = metrics["loss"]
  return loss_sum, (count, metrics)


def from_config(config, *, mesh=None):
  """The UL2 objective for ``config.data.ul2``'s mixture and z-loss."""
  del mesh
  return functools.partial(
      ul2_objective, z_loss=config.train.z_loss,
      denoisers=ul2_pipeline.denoisers_from_config(config.data.ul2))
