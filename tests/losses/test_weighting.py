"""Tests for alignax.losses._weighting (WPO's per-pair weights).

The NumPy reference is TRL's ``use_weighting`` branch of
``DPOTrainer._compute_loss`` written on full logits:
``log_denom = logsumexp(2 z) - 2 logsumexp(z)``,
``w = exp(sum(mask * (logp - log_denom)) / clamp_min(sum(mask), 1))``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax import losses
from alignax import policy


def np_wpo(logits, targets, mask):
  """TRL's weights from full ``[B, T, V]`` logits, float64."""
  z = np.asarray(logits, np.float64)
  lse = lambda x: np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + (
      x.max(-1))
  lse1, lse2 = lse(z), lse(2.0 * z)
  logp = np.take_along_axis(z, targets[..., None], -1)[..., 0] - lse1
  aligned = (logp - (lse2 - 2.0 * lse1)) * mask
  return np.exp(aligned.sum(-1) / np.maximum(mask.sum(-1), 1.0))


def test_hand_example_tiny_vocab():
  # Vocabulary of 2, completion of 2 tokens, one-hot hidden states pick the
  # kernel's rows as logits: [0, log 3] then [0, 0].
  #   t=0: p = (1/4, 3/4), target 1: p_t / sum p^2 = (3/4) / (10/16) = 6/5
  #   t=1: p = (1/2, 1/2), target 0: (1/2) / (1/2) = 1
  # w = exp(mean(log 6/5, log 1)) = sqrt(6/5); a masked third token (a
  # padding id) does not count; an empty completion gets weight 1.
  kernel = np.array([[0.0, math.log(3.0)], [0.0, 0.0]], np.float32)  # [D, V]
  hidden = np.array([[[1, 0], [0, 1], [1, 0]]] * 2, np.float32)  # [2, 3, D]
  targets = np.array([[1, 0, -100]] * 2)
  mask = np.array([[1, 1, 0], [0, 0, 0]], np.float32)
  logp, log_sum_p2 = policy.fused_token_logps_and_log_sum_p2(
      hidden, kernel, targets, vocab_chunk=1)
  w = losses.wpo_weights(logp, log_sum_p2, mask)
  np.testing.assert_allclose(w, [1.0954451150103321, 1.0], rtol=1e-6)
  # One token alone: exactly 6/5.
  one = losses.wpo_weights(logp, log_sum_p2, np.array(
      [[1, 0, 0], [0, 0, 0]], np.float32))
  np.testing.assert_allclose(one, [1.2, 1.0], rtol=1e-6)


def test_equals_numpy_from_full_logits_under_jit_without_gradient():
  rng = np.random.default_rng(0)
  b, t, d, v = 3, 6, 5, 17
  hidden = rng.normal(size=(b, t, d)).astype(np.float32)
  kernel = (2.0 * rng.normal(size=(d, v))).astype(np.float32)
  targets = rng.integers(0, v, (b, t))
  mask = (rng.random((b, t)) < 0.7).astype(np.float32)
  mask[2] = 0.0  # an empty completion

  @jax.jit
  def weights(h, w):
    logp, log_sum_p2 = policy.fused_token_logps_and_log_sum_p2(
        h, w, targets, chunk_size=4, vocab_chunk=6)
    return losses.wpo_weights(logp, log_sum_p2, mask)

  got = weights(hidden, kernel)
  want = np_wpo(hidden.astype(np.float64) @ kernel, targets, mask)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(float(want[0]) - 1.0) > 0.05 and want[2] == 1.0
  # Constants: a loss times the weights differentiates as the loss alone.
  grads = jax.jit(jax.grad(lambda h, w: jnp.sum(weights(h, w)), (0, 1)))(
      hidden, kernel)
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


def test_shape_errors_name_the_shapes():
  with pytest.raises(ValueError, match=r"\(2, 3\), \(2, 4\)"):
    losses.wpo_weights(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.ones((2, 3)))
