"""Tests for the listwise losses in alignax.losses._listwise.

NumPy references loop over explicit pairs / permutations of the *valid*
entries only (masking is slicing there), following LiPO (arXiv 2402.01878),
ListMLE (Xia et al. 2008) and TF-Ranking's softmax loss.
"""

import math

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import optax
import pytest

from alignax.losses import _listwise as lw
from alignax.losses import _preference as pref


def _softplus(x):
  return np.logaddexp(0.0, x)


def _np_ranks(keys):
  """1-based descending ranks, ties in input order."""
  order = np.argsort(-np.asarray(keys), kind="stable")
  ranks = np.empty(len(keys), int)
  ranks[order] = np.arange(1, len(keys) + 1)
  return ranks


def np_lipo(s, y, gain=lambda v: 2.0 ** v - 1,
            inv_disc=lambda t: 1 / np.log1p(t), normalize=False):
  g = gain(y)
  if normalize:
    ideal = np.sum(g * inv_disc(_np_ranks(y).astype(float)))
    g = g / ideal if ideal > 0 else 0 * g
  d = inv_disc(_np_ranks(s).astype(float))
  return sum(abs(g[i] - g[j]) * abs(d[i] - d[j]) * _softplus(-(s[i] - s[j]))
             for i in range(len(s)) for j in range(len(s)) if y[i] > y[j])


def np_list_mle(s, y):
  order = np.argsort(-y, kind="stable")
  s = s[order]
  return sum(np.logaddexp.reduce(s[k:]) - s[k] for k in range(len(s)))


def np_list_softmax(s, y):
  if y.sum() == 0:
    return 0.0
  log_softmax = s - np.logaddexp.reduce(s)
  return -np.sum(y / y.sum() * log_softmax)


def np_pairwise_logistic(s, y):
  return sum(_softplus(-(s[i] - s[j])) for i in range(len(s))
             for j in range(len(s)) if y[i] > y[j])


def np_pairwise_hinge(s, y, margin=1.0):
  return sum(max(0.0, margin - (s[i] - s[j])) for i in range(len(s))
             for j in range(len(s)) if y[i] > y[j])


CASES = [
    (lw.lipo_lambda_loss, np_lipo),
    (lw.list_mle_loss, np_list_mle),
    (lw.list_softmax_loss, np_list_softmax),
    (lw.pairwise_logistic_loss, np_pairwise_logistic),
    (lw.pairwise_hinge_loss, np_pairwise_hinge),
]
IDS = [fn.__name__ for fn, _ in CASES]


def _lists(b=4, k=5, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  # Well-separated scores: ranks (and hinge kinks) stay put under the small
  # perturbations of the gradient checker.
  # Centred, so that masked items (set to 0 inside) would rank mid-list.
  scores = np.stack([(rng.permutation(k) - k / 2) * 0.37
                     + rng.normal(0, 0.05, k) for _ in range(b)])
  scores = scores.astype(dtype)
  labels = rng.integers(0, 4, (b, k)).astype(dtype)  # graded, with ties
  where = rng.random((b, k)) < 0.75
  where[:, :2] = True  # at least two valid items per list
  return scores, labels, where


@pytest.mark.parametrize("fn, expected", [
    # s = (0.3, 0.1, -0.2), psi = (2, 0, 1): ranks (1, 2, 3), G = (3, 0, 1).
    # Pairs (0,1): 3 |1/ln2 - 1/ln3| = 1.597367; (0,2): 2 |1/ln2 - 1/ln4| =
    # 1/ln2; (2,1): |1/ln4 - 1/ln3| = 0.188892; each times
    # log(1 + e^-(s_i - s_j)) for s_i - s_j = 0.2, 0.5, -0.3.
    (lw.lipo_lambda_loss, 1.800776690),
    # Label order (0, 2, 1): [lse(.3,-.2,.1) - .3] + [lse(-.2,.1) + .2] + 0.
    (lw.list_mle_loss, 1.740294562),
    # p = (2/3, 0, 1/3): -(2/3 log softmax_0 + 1/3 log softmax_2).
    (lw.list_softmax_loss, 1.052605984),
    # log(1+e^-.2) + log(1+e^-.5) + log(1+e^.3).
    (lw.pairwise_logistic_loss, 1.926571098),
    (lw.pairwise_hinge_loss, 2.6),  # (1 - .2) + (1 - .5) + (1 + .3)
])
def test_hand_values(fn, expected):
  got = fn(jnp.array([[0.3, 0.1, -0.2]]), jnp.array([[2.0, 0.0, 1.0]]))
  np.testing.assert_allclose(got, [expected], rtol=1e-6)


@pytest.mark.parametrize("fn, ref", CASES, ids=IDS)
def test_matches_numpy_and_mask_is_slicing(fn, ref):
  scores, labels, where = _lists()
  got = fn(scores, labels, where=where)
  assert got.shape == (4,)
  for b in range(4):
    s, y = scores[b][where[b]], labels[b][where[b]]
    want = ref(s.astype(np.float64), y.astype(np.float64))
    np.testing.assert_allclose(got[b], want, rtol=2e-5, atol=1e-6)
    # The same list with its invalid items removed, no mask.
    np.testing.assert_allclose(fn(s[None], y[None])[0], got[b], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("fn, ref", CASES, ids=IDS)
def test_invalid_entries_never_leak(fn, ref):
  del ref
  scores, labels, where = _lists()
  dirty_s = np.where(where, scores, np.nan)
  dirty_y = np.where(where, labels, np.inf)
  value, grad = jax.value_and_grad(
      lambda s: fn(s, dirty_y, where=where).sum())(jnp.asarray(dirty_s))
  np.testing.assert_allclose(value, fn(scores, labels, where=where).sum(),
                             rtol=1e-6)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~where] == 0)


@pytest.mark.parametrize("fn, ref", CASES, ids=IDS)
def test_gradients(fn, ref):
  del ref
  scores, labels, where = _lists(seed=1, dtype=np.float64)
  with jax.enable_x64(True):
    check_grads(jax.jit(lambda s: fn(s, labels, where=where)),
                (jnp.asarray(scores),), order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize("fn, ref", CASES, ids=IDS)
def test_jit_and_vmap_equal_eager(fn, ref):
  del ref
  scores, labels, where = _lists(seed=2)
  eager = fn(scores, labels, where=where)
  np.testing.assert_allclose(
      jax.jit(lambda *a: fn(a[0], a[1], where=a[2]))(scores, labels, where),
      eager, rtol=1e-6, atol=1e-6)
  per_list = jax.vmap(lambda s, y, m: fn(s, y, where=m))(scores, labels, where)
  np.testing.assert_allclose(per_list, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn, ref", CASES, ids=IDS)
def test_shape_validation(fn, ref):
  del ref
  with pytest.raises(ValueError, match=r"labels \(2, 4\)"):
    fn(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match=r"where has shape \(2, 2\)"):
    fn(jnp.zeros((2, 3)), jnp.zeros((2, 3)), where=jnp.ones((2, 2), bool))


def test_k2_reduces_to_pairwise_losses():
  rng = np.random.default_rng(6)
  c, r = -rng.uniform(5, 30, 8), -rng.uniform(5, 30, 8)
  cr, rr = c + rng.normal(0, 1, 8), r + rng.normal(0, 1, 8)
  beta = 0.1
  scores = beta * np.stack([c - cr, r - rr], axis=-1)  # [B, 2]
  labels = np.tile([1.0, 0.0], (8, 1))
  dpo = pref.dpo_loss(c, r, cr, rr, beta=beta)
  np.testing.assert_allclose(lw.pairwise_logistic_loss(scores, labels), dpo,
                             rtol=1e-5)
  np.testing.assert_allclose(lw.list_mle_loss(scores, labels), dpo, rtol=1e-5)
  np.testing.assert_allclose(lw.list_softmax_loss(scores, labels), dpo,
                             rtol=1e-5)
  # Delta = |2^1 - 2^0| * |1/ln 2 - 1/ln 3|, whichever item ranks first.
  delta = 1 / math.log(2) - 1 / math.log(3)
  np.testing.assert_allclose(lw.lipo_lambda_loss(scores, labels), delta * dpo,
                             rtol=1e-5)
  np.testing.assert_allclose(lw.pairwise_hinge_loss(scores, labels),
                             pref.hinge_loss(c, r, cr, rr, beta=beta),
                             rtol=1e-5)
  # The canonical pair of the issue: DPO = 0.649159339.
  np.testing.assert_allclose(
      lw.list_mle_loss(jnp.array([[0.04, -0.05]]), jnp.array([[1.0, 0.0]])),
      [0.649159339], rtol=1e-6)


def test_lipo_weights_knobs():
  scores, labels, where = _lists(seed=3)
  # Ideal-DCG normalisation (TF-Ranking's NDCG lambda weight).
  got = lw.lipo_lambda_loss(scores, labels, where=where, normalize=True)
  for b in range(4):
    s, y = scores[b][where[b]], labels[b][where[b]]
    np.testing.assert_allclose(got[b], np_lipo(s, y, normalize=True),
                               rtol=2e-5)
  # Linear gain and 1/rank discount, passed as functions.
  got = lw.lipo_lambda_loss(scores, labels, where=where,
                            gain_fn=lambda v: v, discount_fn=lambda t: 1 / t)
  for b in range(4):
    s, y = scores[b][where[b]], labels[b][where[b]]
    want = np_lipo(s, y, gain=lambda v: v, inv_disc=lambda t: 1 / t)
    np.testing.assert_allclose(got[b], want, rtol=2e-5)
  # All-equal labels: no preferred pair, zero loss, even when normalised.
  flat = lw.lipo_lambda_loss(scores, jnp.ones_like(scores), normalize=True)
  np.testing.assert_allclose(flat, np.zeros(4))


def test_lipo_weights_are_constants_and_rank_dependent():
  s = jnp.array([[0.3, 0.1, -0.2]])
  y = jnp.array([[2.0, 0.0, 1.0]])
  delta = lw.lipo_lambda_weights(s, y)
  np.testing.assert_allclose(delta[0, 0, 2], 1 / math.log(2), rtol=1e-6)
  assert jnp.all(jax.grad(lambda x: lw.lipo_lambda_weights(x, y).sum())(s) == 0)
  # Swapping the scores of items 1 and 2 swaps their ranks: (0,1) now spans
  # ranks 1 and 3, Delta = 3 |1/ln2 - 1/ln4| = 1.5 / ln 2.
  swapped = lw.lipo_lambda_weights(jnp.array([[0.3, -0.2, 0.1]]), y)
  np.testing.assert_allclose(swapped[0, 0, 1], 1.5 / math.log(2), rtol=1e-6)


def test_list_softmax_is_optax_over_label_sum():
  scores, labels, where = _lists(seed=4)
  got = lw.list_softmax_loss(scores, labels, where=where)
  raw = optax.losses.ranking_softmax_loss(scores, labels, where=where,
                                          reduce_fn=None)
  label_sum = np.where(where, labels, 0).sum(-1)
  np.testing.assert_allclose(got * label_sum, raw, rtol=1e-5, atol=1e-6)
  zero = lw.list_softmax_loss(scores, jnp.zeros_like(scores))
  np.testing.assert_allclose(zero, np.zeros(4))
