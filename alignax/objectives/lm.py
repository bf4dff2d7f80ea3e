"""Causal / prefix LM objective: weighted token cross-entropy.

Every objective has the signature
``objective(model, batch, rng, *, frozen) -> (loss_sum, (loss_count, metrics))``
where ``loss_sum`` is the differentiated sum over this (micro)batch,
``loss_count`` its denominator (independent of the parameters, so the step can
divide gradients summed over microbatches by the total count and stay exact),
and ``metrics`` maps names to ``(sum, count)`` pairs.
"""

import functools

import jax.numpy as jnp

from alignax import losses


def forward(model, batch):
  """Logits ``[B, T, V]`` for a packed batch (segments, positions, prefix)."""
  return model(batch["inputs"], positions=batch["positions"],
               segment_ids=batch["segment_ids"], prefix=batch["prefix"])


def token_losses(model, batch, *, z_loss=0.0):
  """Per-token cross-entropy of a packed batch and its ``(sum, count)`` metrics.

  Returns:
    ``(per_token [B, T], weights [B, T], metrics)`` with ``metrics`` holding
    ``loss`` and ``accuracy`` over ``batch['weights']``.
  """
  logits = forward(model, batch)  # [B, T, V]
  per_token = losses.token_cross_entropy(logits, batch["targets"],
                                         z_loss=z_loss)
  weights = batch["weights"].astype(jnp.float32)
  count = jnp.sum(weights)
  correct = jnp.argmax(logits, axis=-1) == batch["targets"]
  metrics = {
      "loss": (jnp.sum(per_token * weights), count),
      "accuracy": (jnp.sum(correct * weights), count),
  }
  return per_token, weights, metrics


def lm_objective(model, batch, rng, *, frozen=None, z_loss=0.0):
  """Token cross-entropy over ``batch['weights']`` (prefix-LM aware).

  Args:
    model: an NNX module mapping tokens to logits.
    batch: dict of ``[B, T]`` arrays: ``inputs``, ``targets``, ``weights``,
      ``positions``, ``segment_ids``, ``prefix``.
    rng: unused (deterministic model); kept for the shared signature.
    frozen: unused; the LM objective needs no reference model.
    z_loss: z-loss coefficient (see ``token_cross_entropy``).
  """
  del rng, frozen
  _, _, metrics = token_losses(model, batch, z_loss=z_loss)
  loss_sum, count = metrics["loss"]
  return loss_sum, (count, metrics)


def from_config(config, *, mesh=None):
  """The LM objective with ``config.train.z_loss``."""
  del mesh
  return functools.partial(lm_objective, z_loss=config.train.z_loss)
