"""Language-modelling losses (pure functions on arrays)."""

import jax
import jax.numpy as jnp
import optax


def token_cross_entropy(logits, targets, *, z_loss=0.0):
  r"""Per-token softmax cross-entropy with an optional z-loss.

  .. math::
    \ell_t = \log Z_t - z_{t, y_t} + \lambda_z (\log Z_t)^2,
    \quad \log Z_t = \operatorname{logsumexp}_v z_{t, v}

  The z-loss keeps the softmax normaliser near one, which stabilises large
  bf16 runs (PaLM, Chowdhery et al. 2022, section 5).

  Args:
    logits: ``[..., V]`` unnormalised scores (any float dtype; computed in fp32).
    targets: ``[...]`` integer labels in ``[0, V)``.
    z_loss: coefficient :math:`\lambda_z` (keyword-only, default 0).

  Returns:
    per-token losses ``[...]`` in float32; weighting and reduction are the
    caller's.

  References:
    Chowdhery et al., *PaLM: Scaling Language Modeling with Pathways*, 2022.
  """
  if logits.shape[:-1] != targets.shape:
    raise ValueError(f"logits {logits.shape} and targets {targets.shape} "
                     "must agree on all but the last (vocab) axis")
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  if z_loss:
    loss = loss + z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1))
  return loss
