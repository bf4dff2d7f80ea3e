r"""Per-example weights that multiply a preference loss (no gradient).

WPO (TRL ``DPOConfig.use_weighting``) reweights each preference pair by how
likely the policy is to produce both of its answers itself, which makes
off-policy pairs act more like on-policy ones.
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def wpo_weights(token_logps: Array, log_sum_p2: Array, weights: Array) -> Array:
  r"""WPO's weight of one completion: its calibrated per-token probability.

  .. math::
    w(y) = \exp\Big(\frac{1}{\max(1, \sum_t m_t)} \sum_t m_t
           \big(\log p_t - \log\textstyle\sum_v p_{t,v}^2\big)\Big)

  where :math:`p_t` is the policy's probability of token :math:`y_t` and
  :math:`\sum_v p_{t,v}^2` the probability that two samples of the policy at
  position :math:`t` agree (it calibrates :math:`p_t` against how peaked the
  distribution is). A pair's weight is :math:`w(y_w)\,w(y_l)`, multiplied
  into its loss. As in TRL, where they are computed under ``torch.no_grad``,
  the weights are constants: no gradient flows through them.

  Args:
    token_logps: ``[..., T]`` the policy's per-token log-probabilities of the
      completion.
    log_sum_p2: ``[..., T]`` :math:`\log\sum_v p_{t,v}^2` at the same
      positions (``policy.TokenStats.log_sum_p2``).
    weights: ``[..., T]`` completion mask :math:`m_t`; weight-0 tokens never
      contribute, even when non-finite.

  Returns:
    ``[...]`` weights, under ``stop_gradient``; an empty completion gets 1.

  References:
    Zhou et al., *WPO: Enhancing RLHF with Weighted Preference
    Optimization*, EMNLP 2024, eq. (2); TRL ``DPOTrainer._compute_loss``
    (``use_weighting``).
  """
  token_logps, log_sum_p2, weights = (
      jnp.asarray(x) for x in (token_logps, log_sum_p2, weights))
  if token_logps.ndim == 0 or log_sum_p2.shape != token_logps.shape or (
      weights.shape != token_logps.shape):
    raise ValueError(
        "wpo_weights expects token_logps, log_sum_p2 and weights of one shape "
        f"[..., T]; got {token_logps.shape}, {log_sum_p2.shape} and "
        f"{weights.shape}.")
  weights = weights.astype(jnp.result_type(token_logps, jnp.float32))
  calibrated = jnp.where(weights != 0, token_logps - log_sum_p2, 0.0)
  count = jnp.maximum(jnp.sum(weights, axis=-1), 1.0)  # TRL's clamp_min(1)
  mean = jnp.sum(calibrated * weights, axis=-1) / count
  return jax.lax.stop_gradient(jnp.exp(mean))
