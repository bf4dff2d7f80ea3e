"""Kernel MMD between bins of a batch, against direct double sums in NumPy."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from alignax import losses


def np_kernel(a, b, sigma):
  return math.exp(-float(np.sum((np.asarray(a, np.float64)
                                 - np.asarray(b, np.float64)) ** 2))
                  / (2 * sigma ** 2))


def np_mmd2(xs, ys, sigma):
  """The biased V-statistic as the textbook triple of double sums."""
  kxx = sum(np_kernel(a, b, sigma) for a in xs for b in xs) / len(xs) ** 2
  kyy = sum(np_kernel(a, b, sigma) for a in ys for b in ys) / len(ys) ** 2
  kxy = sum(np_kernel(a, b, sigma) for a in xs for b in ys) / (
      len(xs) * len(ys))
  return kxx + kyy - 2 * kxy


def _batch(seed=0, n=24, d=3, m=4):
  rng = np.random.default_rng(seed)
  bins = rng.integers(0, m, n)
  x = (rng.normal(size=(n, d)) + 0.7 * bins[:, None]).astype(np.float32)
  return x, bins


def test_mmd_squared_is_the_double_sum():
  x, _ = _batch()
  a, b = x[:10], x[10:] + 0.5
  np.testing.assert_allclose(losses.mmd_squared(a, b, bandwidth=1.3),
                             np_mmd2(a, b, 1.3), rtol=1e-5, atol=1e-7)
  # Scalar features (the rewards themselves) are [N] -> [N, 1].
  np.testing.assert_allclose(
      losses.mmd_squared(a[:, 0], b[:, 0], bandwidth=0.7),
      np_mmd2(a[:, :1], b[:, :1], 0.7), rtol=1e-5, atol=1e-7)
  assert float(losses.mmd_squared(a, a, bandwidth=1.0)) < 1e-6


def test_binned_mmd_every_pair_is_the_double_sum():
  x, bins = _batch()
  where = np.arange(len(bins)) % 5 != 0
  got = np.asarray(losses.binned_mmd(x, bins, num_bins=5, bandwidth=2.0,
                                     where=where))
  assert got.shape == (5, 5)
  for a, b in itertools.product(range(5), repeat=2):
    xa, xb = x[(bins == a) & where], x[(bins == b) & where]
    if a == b or not len(xa) or not len(xb):
      assert got[a, b] == 0  # bin 4 is empty: its row and column are 0
    else:
      np.testing.assert_allclose(got[a, b], np_mmd2(xa, xb, 2.0), rtol=1e-4,
                                 atol=1e-6)
  np.testing.assert_allclose(
      losses.bin_counts(bins, num_bins=5, where=where),
      [np.sum((bins == a) & where) for a in range(5)])


def test_where_is_a_slice_and_penalty_is_the_mean_over_pairs():
  x, bins = _batch(1)
  where = np.arange(len(bins)) % 3 != 0
  np.testing.assert_allclose(
      losses.binned_mmd(x, bins, num_bins=4, bandwidth=1.0, where=where),
      losses.binned_mmd(x[where], bins[where], num_bins=4, bandwidth=1.0),
      rtol=1e-5, atol=1e-7)
  mmd = np.asarray(losses.binned_mmd(x, bins, num_bins=4, bandwidth=1.0))
  pen = losses.binned_mmd_penalty(x, bins, num_bins=4, bandwidth=1.0)
  np.testing.assert_allclose(pen, mmd[np.triu_indices(4, 1)].mean(), rtol=1e-5)
  # The conditional form: only the allowed pairs (here bins {0,1} and {2,3}).
  allowed = np.zeros((4, 4), bool)
  allowed[0, 1] = allowed[2, 3] = True
  np.testing.assert_allclose(
      losses.binned_mmd_penalty(x, bins, num_bins=4, bandwidth=1.0,
                                pair_mask=allowed),
      (mmd[0, 1] + mmd[2, 3]) / 2, rtol=1e-5)
  # One bin only: no pair, no penalty.
  assert float(losses.binned_mmd_penalty(x, np.zeros_like(bins), num_bins=4,
                                         bandwidth=1.0)) == 0.0


def test_median_bandwidth_and_gradients_and_jit():
  x, bins = _batch(2, n=9)
  d = [np.sum((x[i] - x[j]) ** 2) for i in range(9) for j in range(9) if i != j]
  np.testing.assert_allclose(losses.median_bandwidth(x),
                             math.sqrt(np.median(d)), rtol=1e-5)
  where = np.arange(9) < 6
  d = [np.sum((x[i] - x[j]) ** 2) for i in range(6) for j in range(6) if i != j]
  np.testing.assert_allclose(losses.median_bandwidth(x, where=where),
                             math.sqrt(np.median(d)), rtol=1e-5)
  fn = lambda f: losses.binned_mmd_penalty(f, bins, num_bins=4, bandwidth=1.5)
  check_grads(fn, (x,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
  np.testing.assert_allclose(jax.jit(fn)(x), fn(x), rtol=1e-6)
  # The median bandwidth passes no gradient.
  g = jax.grad(lambda f: losses.median_bandwidth(f))(jnp.asarray(x))
  assert np.all(g == 0)
