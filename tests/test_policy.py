"""Tests for alignax.policy: token and sequence log-probabilities."""

import math

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from alignax import policy


def _np_token_logps(logits, targets):
  """Independent reference: full log-softmax in float64, then gather."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return np.take_along_axis(log_softmax, np.asarray(targets)[..., None],
                            -1)[..., 0]


def _data(b=2, t=7, d=5, v=11, seed=0):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(b, t, d)).astype(np.float32)
  kernel = rng.normal(size=(d, v)).astype(np.float32)
  targets = rng.integers(0, v, size=(b, t))
  weights = (rng.random((b, t)) < 0.7).astype(np.float32)
  return hidden, kernel, targets, weights


def test_token_logps_hand_value():
  # softmax([0, ln 3]) = [1/4, 3/4]: log p(1) = ln(3/4), log p(0) = ln(1/4).
  logits = jnp.array([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
  got = policy.token_logps(logits, jnp.array([[1, 0]]))
  np.testing.assert_allclose(got, [[math.log(0.75), math.log(0.25)]],
                             rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 100])
def test_token_logps_matches_numpy(chunk_size):
  hidden, kernel, targets, _ = _data()
  logits = hidden @ kernel
  got = policy.token_logps(logits, targets, chunk_size=chunk_size)
  np.testing.assert_allclose(got, _np_token_logps(logits, targets),
                             rtol=1e-5, atol=1e-5)


def test_token_logps_bf16_logits_are_upcast():
  hidden, kernel, targets, _ = _data()
  logits = jnp.asarray(hidden @ kernel, jnp.bfloat16)
  got = policy.token_logps(logits, targets, chunk_size=2)
  assert got.dtype == jnp.float32
  ref = _np_token_logps(np.asarray(logits.astype(jnp.float32)), targets)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 2, 3])
def test_token_logps_from_hidden_kernel_and_callable(chunk_size):
  hidden, kernel, targets, _ = _data()
  ref = _np_token_logps(hidden.astype(np.float64) @ kernel, targets)
  got = policy.token_logps_from_hidden(hidden, kernel, targets,
                                       chunk_size=chunk_size)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  got_fn = policy.token_logps_from_hidden(
      hidden, lambda h: h @ jnp.asarray(kernel), targets,
      chunk_size=chunk_size)
  np.testing.assert_allclose(got_fn, ref, rtol=1e-5, atol=1e-5)


def _avals(jaxpr, acc):
  """All intermediate shapes of a jaxpr, sub-jaxprs (scan, remat) included."""
  for eqn in jaxpr.eqns:
    acc.update(tuple(v.aval.shape) for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _avals(inner, acc)
  return acc


def test_token_logps_from_hidden_never_builds_full_logits():
  b, t, d, v = 2, 8, 5, 11
  hidden, kernel, targets, _ = _data(b, t, d, v)

  def loss(h, w, chunk_size):
    return policy.token_logps_from_hidden(h, w, targets,
                                          chunk_size=chunk_size).sum()

  for chunk_size, expect_full in ((2, False), (None, True)):
    grad_fn = jax.grad(lambda h, w: loss(h, w, chunk_size), argnums=(0, 1))
    shapes = _avals(jax.make_jaxpr(grad_fn)(hidden, kernel).jaxpr, set())
    # Forward and backward: no [B, T, V] value unless unchunked.
    assert ((b, t, v) in shapes) == expect_full


def test_gradients_match_finite_differences():
  hidden, kernel, targets, weights = _data(t=5)
  with jax.enable_x64(True):
    h, w = jnp.asarray(hidden, jnp.float64), jnp.asarray(kernel, jnp.float64)

    def f(h, w):
      tok = policy.token_logps_from_hidden(h, w, targets, chunk_size=2)
      return policy.sequence_logps(tok, weights)

    # jit: the checker re-evaluates at many points with identical shapes.
    check_grads(jax.jit(f), (h, w), order=1, modes=("fwd", "rev"))
    check_grads(
        jax.jit(lambda x: policy.token_logps(x, targets, chunk_size=2)),
        (h @ w,), order=1, modes=("fwd", "rev"))


def test_jit_and_vmap_equal_eager():
  hidden, kernel, targets, weights = _data()
  eager = policy.token_logps_from_hidden(hidden, kernel, targets,
                                         chunk_size=3)
  jitted = jax.jit(policy.token_logps_from_hidden,
                   static_argnames="chunk_size")(hidden, kernel, targets,
                                                 chunk_size=3)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
  # vmap over an extra leading axis of two independent batches.
  stacked = jax.vmap(
      lambda h, y: policy.token_logps(h @ kernel, y, chunk_size=3))(
          jnp.stack([hidden, hidden[::-1]]), jnp.stack([targets,
                                                         targets[::-1]]))
  np.testing.assert_allclose(stacked[0], eager, rtol=1e-5, atol=1e-5)
  seq = jax.vmap(policy.sequence_logps)(eager, weights)
  np.testing.assert_allclose(seq, policy.sequence_logps(eager, weights),
                             rtol=1e-6)


def test_sequence_mean_and_lengths():
  tok = jnp.array([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.5, -9.0, -9.0]])
  weights = jnp.array([[0, 1, 1, 0], [1, 1, 0, 0]], jnp.float32)
  # Row 0: -2 - 3 = -5 over 2 tokens; row 1: -1 over 2 tokens.
  np.testing.assert_allclose(policy.sequence_logps(tok, weights), [-5.0, -1.0])
  np.testing.assert_allclose(policy.completion_lengths(weights), [2.0, 2.0])
  np.testing.assert_allclose(policy.mean_logps(tok, weights), [-2.5, -0.5])
  # Empty completion: mean is 0 (length clamped at 1), not NaN.
  np.testing.assert_allclose(
      policy.mean_logps(tok[:1], jnp.zeros((1, 4))), [0.0])


def test_masked_tokens_never_leak_even_if_not_finite():
  # Padding ids (-100) and -inf log-probs under weight 0 are ignored.
  logits = jnp.zeros((1, 3, 4))
  targets = jnp.array([[1, -100, 2]])
  weights = jnp.array([[1.0, 0.0, 1.0]])
  tok = policy.token_logps(logits, targets)
  np.testing.assert_allclose(policy.sequence_logps(tok, weights),
                             [2 * math.log(0.25)], rtol=1e-6)
  tok = jnp.array([[-1.0, -jnp.inf]])
  value, grad = jax.value_and_grad(
      lambda x: policy.sequence_logps(x, jnp.array([[1.0, 0.0]])).sum())(tok)
  assert value == -1.0 and np.all(np.isfinite(grad))


def test_masking_equals_slicing():
  hidden, kernel, targets, weights = _data()
  tok = policy.token_logps_from_hidden(hidden, kernel, targets)
  for i in range(tok.shape[0]):
    keep = weights[i] > 0
    np.testing.assert_allclose(policy.sequence_logps(tok, weights)[i],
                               np.sum(np.asarray(tok[i])[keep]), rtol=1e-5)


def test_shape_validation():
  with pytest.raises(ValueError, match=r"\(2, 3\)"):
    policy.token_logps(jnp.zeros((2, 4, 5)), jnp.zeros((2, 3), int))
  with pytest.raises(ValueError, match=r"\(4, 6\)"):
    policy.token_logps_from_hidden(jnp.zeros((2, 3, 5)), jnp.zeros((4, 6)),
                                   jnp.zeros((2, 3), int))
  with pytest.raises(ValueError, match=r"\(2, 2\)"):
    policy.sequence_logps(jnp.zeros((2, 3)), jnp.zeros((2, 2)))
  with pytest.raises(ValueError, match="chunk_size"):
    policy.token_logps(jnp.zeros((1, 4, 5)), jnp.zeros((1, 4), int),
                       chunk_size=0)
