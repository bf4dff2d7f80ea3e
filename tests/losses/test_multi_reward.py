"""ArmoRM's losses: masked attribute regression, the gated Bradley–Terry
loss, and the verbosity decorrelation, each against NumPy written here."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import stats

from alignax import losses


def np_regression(pred, target, mask):
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  out = np.zeros(pred.shape[0])
  for i in range(pred.shape[0]):
    for k in range(pred.shape[1]):
      if mask[i, k]:
        out[i] += (pred[i, k] - target[i, k]) ** 2
  return out


def np_gated_bt(chosen, rejected, logits, beta):
  z = np.asarray(logits, np.float64)
  g = np.exp(z - z.max(-1, keepdims=True))
  g /= g.sum(-1, keepdims=True)
  margin = (g * (np.asarray(chosen) - np.asarray(rejected))).sum(-1)
  return np.log1p(np.exp(-beta * margin))


def _data(seed=0, b=6, k=4):
  rng = np.random.default_rng(seed)
  pred = rng.normal(size=(b, k)).astype(np.float32)
  target = rng.normal(size=(b, k)).astype(np.float32)
  mask = rng.random((b, k)) < 0.6
  return pred, target, mask


def test_masked_regression_numpy_and_nan_targets():
  pred, target, mask = _data()
  got = losses.masked_regression_loss(pred, target, mask)
  np.testing.assert_allclose(got, np_regression(pred, target, mask), rtol=1e-6)
  # Missing ratings may be NaN: neither the loss nor its gradient sees them.
  nan_target = np.where(mask, target, np.nan)
  fn = lambda p: losses.masked_regression_loss(p, nan_target, mask).sum()
  np.testing.assert_allclose(fn(pred), got.sum(), rtol=1e-6)
  grad = jax.grad(fn)(pred)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, np.where(mask, 2 * (pred - target), 0),
                             rtol=1e-5)
  # Hand value: one observed rating off by 0.5, one off by 2.
  np.testing.assert_allclose(
      losses.masked_regression_loss([[1.0, 3.0, 7.0]], [[0.5, 1.0, 0.0]],
                                    [[True, True, False]]), [4.25])


def test_masked_regression_mask_is_slice_grads_jit_vmap():
  pred, target, mask = _data(1)
  mask[:, 2] = False  # attribute 2 unobserved everywhere = dropping it
  keep = [0, 1, 3]
  np.testing.assert_allclose(
      losses.masked_regression_loss(pred, target, mask),
      losses.masked_regression_loss(pred[:, keep], target[:, keep],
                                    mask[:, keep]), rtol=1e-6)
  fn = lambda p, t: losses.masked_regression_loss(p, t, mask)
  check_grads(fn, (pred, target), order=1, modes=["rev"], atol=1e-2,
              rtol=1e-2)
  np.testing.assert_allclose(jax.jit(fn)(pred, target), fn(pred, target),
                             rtol=1e-6)
  rows = jax.vmap(lambda p, t, m: losses.masked_regression_loss(
      p[None], t[None], m[None])[0])(pred, target, mask)
  np.testing.assert_allclose(rows, fn(pred, target), rtol=1e-6)
  with pytest.raises(ValueError, match="mask"):
    losses.masked_regression_loss(pred, target, mask[:, :2])


def test_gated_mixture_is_the_weighted_sum_of_heads():
  rng = np.random.default_rng(2)
  r = rng.normal(size=(5, 3)).astype(np.float32)
  g = jax.nn.softmax(rng.normal(size=(5, 3)), axis=-1)
  np.testing.assert_allclose(
      losses.gated_rewards(r, g),
      [sum(float(g[i, k]) * float(r[i, k]) for k in range(3))
       for i in range(5)],
      rtol=1e-6)


def test_gated_bradley_terry_numpy_and_hand_values():
  rng = np.random.default_rng(3)
  c, r, z = (rng.normal(size=(7, 4)).astype(np.float32) for _ in range(3))
  np.testing.assert_allclose(
      losses.gated_bradley_terry_loss(c, r, z, beta=2.5),
      np_gated_bt(c, r, z, 2.5), rtol=1e-5)
  # Uniform gate over [1, 0] vs [0, 1]: margin 0, loss log 2.
  np.testing.assert_allclose(
      losses.gated_bradley_terry_loss([[1.0, 0.0]], [[0.0, 1.0]],
                                      [[0.0, 0.0]]), [math.log(2)], rtol=1e-6)
  # Gate (3/4, 1/4): margin 3/4 - 1/4 = 1/2, beta 2: -log sigmoid(1).
  np.testing.assert_allclose(
      losses.gated_bradley_terry_loss([[1.0, 0.0]], [[0.0, 1.0]],
                                      [[math.log(3.0), 0.0]], beta=2.0),
      [0.31326168751822286], rtol=1e-6)
  # A one-hot gate is Bradley-Terry on that attribute.
  hot = np.array([[0.0, 60.0, 0.0, 0.0]] * 7, np.float32)
  np.testing.assert_allclose(
      losses.gated_bradley_terry_loss(c, r, hot),
      losses.bradley_terry_loss(c[:, 1], r[:, 1]), rtol=1e-5)
  with pytest.raises(ValueError, match="gate_logits"):
    losses.gated_bradley_terry_loss(c, r, z[:, :2])


def test_gated_bradley_terry_gradients_and_jit():
  rng = np.random.default_rng(4)
  c, r, z = (rng.normal(size=(3, 3)).astype(np.float32) for _ in range(3))
  fn = lambda a, b, g, beta: losses.gated_bradley_terry_loss(a, b, g,
                                                             beta=beta)
  check_grads(fn, (c, r, z, 1.5), order=1, modes=["rev"], atol=1e-2,
              rtol=1e-2)
  np.testing.assert_allclose(jax.jit(fn)(c, r, z, 1.5), fn(c, r, z, 1.5),
                             rtol=1e-6)


def _reference_set(n=400, seed=5):
  """Attribute rewards that lean on verbosity by different amounts."""
  rng = np.random.default_rng(seed)
  v = rng.gamma(2.0, 1.0, n).astype(np.float32)
  noise = rng.normal(size=(n, 3)).astype(np.float32)
  r = np.stack([0.8 * v + noise[:, 0], -0.3 * v + noise[:, 1],
                np.log1p(v) + 0.3 * noise[:, 2]], axis=1)
  return r.astype(np.float32), v


def test_pearson_decorrelation_zeroes_the_correlation_and_is_the_slope():
  r, v = _reference_set()
  lam = np.asarray(losses.pearson_decorrelation(r, v))
  slopes = [np.polyfit(v.astype(np.float64), r[:, k].astype(np.float64), 1)[0]
            for k in range(3)]
  np.testing.assert_allclose(lam, slopes, rtol=1e-4)
  adj = np.asarray(losses.verbosity_adjusted(r, v, lam))
  np.testing.assert_allclose(adj, r - lam * v[:, None], rtol=1e-6)
  for k in range(3):
    assert abs(np.corrcoef(adj[:, k], v)[0, 1]) < 1e-4
    assert abs(np.corrcoef(r[:, k], v)[0, 1]) > 0.2  # there was one to remove
  # The verbosity reward itself: lambda = 1, nothing left.
  np.testing.assert_allclose(losses.pearson_decorrelation(v[:, None], v), [1.0],
                             rtol=1e-5)


def test_spearman_matches_scipy_and_where_is_a_slice():
  r, v = _reference_set(60)
  np.testing.assert_allclose(losses.spearman(r[:, 0], v),
                             stats.spearmanr(r[:, 0], v).statistic, rtol=1e-5)
  where = np.arange(60) % 3 != 0
  np.testing.assert_allclose(
      losses.spearman(r[:, 0], v, where=where),
      stats.spearmanr(r[where, 0], v[where]).statistic, rtol=1e-5)


def test_spearman_decorrelation_zeroes_the_rank_correlation():
  r, v = _reference_set()
  lam = np.asarray(jax.jit(losses.spearman_decorrelation)(r, v))
  adj = r - lam * v[:, None]
  for k in range(3):
    assert abs(stats.spearmanr(adj[:, k], v).statistic) < 3.0 / len(v) + 1e-3
    assert abs(stats.spearmanr(r[:, k], v).statistic) > 0.2
  # Masked rows do not count: the same as fitting on the kept rows only.
  where = np.arange(len(v)) % 4 != 0
  np.testing.assert_allclose(
      losses.spearman_decorrelation(r, v, where=where),
      losses.spearman_decorrelation(r[where], v[where]), rtol=1e-4, atol=1e-5)
