r"""Kernel maximum mean discrepancy (MMD) between groups of one batch.

The causal reward model (Wang et al., 2025) adds to the Bradley–Terry loss
an MMD penalty that makes the distribution of the reward model's
representation the same across the values of a spurious attribute (length
bins, a sycophancy flag, a demographic tag): counterfactual invariance in
the sense of Veitch et al. (2021), who showed that for a representation
:math:`\phi` with :math:`\phi(X) \perp Z` the predictor is invariant to
interventions on :math:`Z`, and estimated the independence with an MMD
between the conditional distributions.

With a Gaussian kernel :math:`k(x, y) = \exp(-\|x - y\|^2 / 2\sigma^2)` and
the empirical distributions :math:`P_a, P_b` of two groups,

.. math::
   \mathrm{MMD}^2(P_a, P_b) = \mathbb{E}_{a,a'} k + \mathbb{E}_{b,b'} k
   - 2\,\mathbb{E}_{a,b} k

(the biased V-statistic of Gretton et al., 2012: non-negative, smooth).
Everything here is a pure function of arrays.

References:
  Gretton, Borgwardt, Rasch, Schölkopf & Smola, *A Kernel Two-Sample Test*,
  JMLR 2012; Veitch, D'Amour, Yadlowsky & Eisenstein, *Counterfactual
  Invariance to Spurious Correlations*, NeurIPS 2021; Wang, Zhao, Jiang,
  Chen, Zhu, Chen, Liu, Zhang, Fan, Ma & Wang, *Beyond Reward Hacking:
  Causal Rewards for Large Language Model Alignment*, 2025
  (arXiv:2501.09620).
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def _features(x, name):
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 1:
    x = x[:, None]  # scalar features (e.g. rewards): [N] -> [N, 1]
  if x.ndim != 2:
    raise ValueError(f"{name} must be [N, D] or [N], got shape {x.shape}")
  return x


def squared_distances(x: Array, y: Array) -> Array:
  """``[N, M]`` squared distances between ``[N, D]`` and ``[M, D]`` rows."""
  x, y = _features(x, "x"), _features(y, "y")
  d2 = (jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :]
        - 2.0 * x @ y.T)
  return jnp.maximum(d2, 0.0)  # rounding can dip below 0


def median_bandwidth(x: Array, *, where: Array | None = None) -> Array:
  r"""The median heuristic: :math:`\sigma^2 = \mathrm{median}_{i \neq j}
  \|x_i - x_j\|^2` over the rows ``where`` is True (no gradient).

  Args:
    x: ``[N, D]`` (or ``[N]``) features.
    where: ``[N]`` bool, the rows that count (default all).

  Returns:
    the scalar :math:`\sigma` (1 when fewer than two rows differ).
  """
  x = _features(x, "x")
  n = x.shape[0]
  w = jnp.ones(n, bool) if where is None else jnp.asarray(where, bool)
  pairs = w[:, None] & w[None, :] & ~jnp.eye(n, dtype=bool)
  d2 = jnp.where(pairs, squared_distances(x, x), jnp.nan)
  med = jnp.nanmedian(d2)
  med = jnp.where(jnp.isfinite(med) & (med > 0), med, 1.0)
  return jax.lax.stop_gradient(jnp.sqrt(med))


def gaussian_kernel(x: Array, y: Array, *, bandwidth: Array | float) -> Array:
  r"""``[N, M]`` Gaussian kernel :math:`\exp(-\|x_i - y_j\|^2 / 2\sigma^2)`."""
  return jnp.exp(-squared_distances(x, y) / (2.0 * jnp.square(bandwidth)))


def mmd_squared(x: Array, y: Array, *, bandwidth: Array | float) -> Array:
  r"""Biased squared MMD between two samples (Gretton et al., 2012).

  .. math::
     \frac{1}{n^2}\sum_{i,i'} k(x_i, x_{i'}) + \frac{1}{m^2}\sum_{j,j'}
     k(y_j, y_{j'}) - \frac{2}{nm}\sum_{i,j} k(x_i, y_j)

  Args:
    x: ``[N, D]`` (or ``[N]``) first sample.
    y: ``[M, D]`` (or ``[M]``) second sample.
    bandwidth: :math:`\sigma` of the Gaussian kernel.

  Returns:
    the scalar :math:`\mathrm{MMD}^2 \ge 0`.
  """
  kxx = gaussian_kernel(x, x, bandwidth=bandwidth)
  kyy = gaussian_kernel(y, y, bandwidth=bandwidth)
  kxy = gaussian_kernel(x, y, bandwidth=bandwidth)
  return jnp.mean(kxx) + jnp.mean(kyy) - 2.0 * jnp.mean(kxy)


def binned_mmd(features: Array, bins: Array, *, num_bins: int,
               bandwidth: Array | float,
               where: Array | None = None) -> Array:
  r"""Squared MMD between the features of every pair of bins of one batch.

  .. math::
     M_{ab} = \mathrm{MMD}^2(\{\phi_i : z_i = a\}, \{\phi_i : z_i = b\})
     = G_{aa} + G_{bb} - 2 G_{ab},\qquad
     G = A^\top K A

  with :math:`K` the ``[N, N]`` kernel matrix and :math:`A_{ia} =
  [z_i = a] / n_a` the normalised bin indicators, so one kernel matrix
  serves all pairs.

  Args:
    features: ``[N, D]`` (or ``[N]``) representations :math:`\phi_i`.
    bins: ``[N]`` int bin of each row, in ``[0, num_bins)``; rows outside
      that range count nowhere.
    num_bins: M.
    bandwidth: :math:`\sigma` of the Gaussian kernel
      (:func:`median_bandwidth` for the median heuristic).
    where: ``[N]`` bool, the rows that count (default all).

  Returns:
    ``[M, M]`` symmetric, zero diagonal; entries of an empty bin are 0 (see
    :func:`bin_counts` to tell them apart).

  References:
    Wang et al., *Beyond Reward Hacking: Causal Rewards for Large Language
    Model Alignment*, 2025; Gretton et al., 2012.
  """
  features = _features(features, "features")
  counts = bin_counts(bins, num_bins=num_bins, where=where)  # [M]
  onehot = _onehot(bins, num_bins, where)  # [N, M]
  assign = onehot / jnp.maximum(counts, 1.0)  # [N, M]
  kernel = gaussian_kernel(features, features, bandwidth=bandwidth)  # [N, N]
  gram = assign.T @ kernel @ assign  # [M, M] mean kernel between bins
  diag = jnp.diag(gram)
  mmd2 = diag[:, None] + diag[None, :] - 2.0 * gram
  present = (counts > 0)[:, None] & (counts > 0)[None, :]
  off = ~jnp.eye(num_bins, dtype=bool)
  return jnp.where(present & off, jnp.maximum(mmd2, 0.0), 0.0)


def _onehot(bins, num_bins, where):
  bins = jnp.asarray(bins)
  onehot = jax.nn.one_hot(bins, num_bins, dtype=jnp.float32)  # out of range: 0
  if where is not None:
    onehot = onehot * jnp.asarray(where, bool)[:, None]
  return onehot


def bin_counts(bins: Array, *, num_bins: int,
               where: Array | None = None) -> Array:
  """``[M]`` float32 number of rows in each bin (``where`` rows only)."""
  return jnp.sum(_onehot(bins, num_bins, where), axis=0)


def binned_mmd_penalty(features: Array, bins: Array, *, num_bins: int,
                       bandwidth: Array | float, where: Array | None = None,
                       pair_mask: Array | None = None) -> Array:
  r"""Mean squared MMD over the pairs of non-empty bins (the CRM penalty).

  .. math::
     \Omega = \frac{1}{|\mathcal{P}|}\sum_{(a, b) \in \mathcal{P}}
     \mathrm{MMD}^2(P_{\phi \mid z = a}, P_{\phi \mid z = b})

  over the pairs :math:`a < b` of non-empty bins (and, with ``pair_mask``,
  only the allowed pairs: the conditional CRM compares bins within one
  preference label). 0 when no pair has both bins present.

  Args:
    features, bins, num_bins, bandwidth, where: as :func:`binned_mmd`.
    pair_mask: ``[M, M]`` bool, the pairs that count (default all).

  Returns:
    the scalar penalty.
  """
  mmd2 = binned_mmd(features, bins, num_bins=num_bins, bandwidth=bandwidth,
                    where=where)
  present = bin_counts(bins, num_bins=num_bins, where=where) > 0
  pairs = (present[:, None] & present[None, :]
           & jnp.triu(jnp.ones((num_bins, num_bins), bool), k=1))
  if pair_mask is not None:
    pairs = pairs & jnp.asarray(pair_mask, bool)
  total = jnp.sum(jnp.where(pairs, mmd2, 0.0))
  return total / jnp.maximum(jnp.sum(pairs), 1).astype(jnp.float32)
