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

from alignax import policy


def forward(model, batch, *, return_hidden=False):
  """Logits ``[B, T, V]`` (or final hidden states ``[B, T, D]``) for a
  packed batch (segments, positions, prefix)."""
  return model(batch["inputs"], positions=batch["positions"],
               segment_ids=batch["segment_ids"], prefix=batch["prefix"],
               return_hidden=return_hidden)


def token_losses(model, batch, *, z_loss=0.0, chunk_size=0):
  r"""Per-token cross-entropy of a packed batch and its ``(sum, count)`` metrics.

  .. math:: \ell_t = -\log p(y_t) + z\,(\log Z_t)^2

  (``losses.token_cross_entropy``) computed by the fused log-prob path
  (``policy.model_token_logps_and_stats``), which never holds ``[B, T, V]``
  logits; ``chunk_size`` also splits the sequence.

  Returns:
    ``(per_token [B, T], weights [B, T], metrics)`` with ``metrics`` holding
    ``loss`` and ``accuracy`` over ``batch['weights']``.
  """
  hidden = forward(model, batch, return_hidden=True)  # [B, T, D]
  logps, stats = policy.model_token_logps_and_stats(
      model, hidden, batch["targets"], chunk_size=chunk_size, entropy=False)
  per_token = z_loss * jnp.square(stats.lse) - logps
  weights = batch["weights"].astype(jnp.float32)
  count = jnp.sum(weights)
  correct = stats.correct
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
