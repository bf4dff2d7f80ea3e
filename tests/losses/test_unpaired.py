"""Tests for the reference-free and unpaired losses in alignax.losses._unpaired.

NumPy references transcribe TRL's ``ORPOTrainer.odds_ratio_loss``,
``CPOTrainer.cpo_loss`` (sigmoid / simpo), ``KTOTrainer.kto_loss``,
``BCOTrainer.bco_loss`` with ``RunningMoments``, and the NPO paper's loss,
independently of the alignax code.
"""

import math

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from alignax.losses import _preference as pref
from alignax.losses import _unpaired as unp


def _ls(x):
  return -np.logaddexp(0.0, -x)


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_orpo(c, r, beta):
  log_odds = (c - r) - (np.log1p(-np.exp(c)) - np.log1p(-np.exp(r)))
  return -beta * _ls(log_odds)  # TRL: loss = nll - mean(beta * logsigmoid)


def np_cpo(c, r, beta, label_smoothing=0.0):
  logits = c - r
  return (-_ls(beta * logits) * (1 - label_smoothing)
          - _ls(-beta * logits) * label_smoothing)


def np_simpo(c, r, beta, gamma, label_smoothing=0.0):
  logits = (c - r) - gamma / beta
  return (-_ls(beta * logits) * (1 - label_smoothing)
          - _ls(-beta * logits) * label_smoothing)


def np_kto(logps, ref, kl_logps, ref_kl, desirable, beta, dw, uw):
  """TRL order: desirable losses, then undesirable ones."""
  kl = max(np.mean(kl_logps - ref_kl), 0.0)
  rho = logps - ref
  chosen = 1 - _sig(beta * (rho[desirable] - kl))
  rejected = 1 - _sig(beta * (kl - rho[~desirable]))
  return np.concatenate([dw * chosen, uw * rejected])


def np_bco(logps, ref, desirable, beta, delta):
  rewards = beta * (logps - ref)
  chosen = -_ls(rewards[desirable] - delta)
  rejected = -_ls(-(rewards[~desirable] - delta))
  return np.concatenate([chosen, rejected])


class NpRunningMoments:
  """TRL's RunningMoments (mean part), single process."""

  def __init__(self):
    self.mean, self.var, self.count = 0.0, 1.0, 1e-24

  def update(self, xs):
    xs = np.asarray(xs, np.float64).reshape(-1)
    n, xs_mean, xs_var = xs.size, xs.mean(), xs.var()
    delta = xs_mean - self.mean
    tot = self.count + n
    old_sum = self.var * self.count + delta ** 2 * self.count * n / tot
    self.var = (old_sum + xs_var * n) / tot
    self.mean += delta * n / tot
    self.count = tot


def _unpaired_batch(n=6, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  logps = -rng.uniform(5, 30, n)
  ref = logps + rng.normal(0, 1.5, n)
  kl_logps = -rng.uniform(5, 30, n)
  ref_kl = kl_logps - rng.normal(0.3, 0.5, n)
  desirable = np.array([True, False, True, True, False, False][:n])
  arrays = tuple(x.astype(dtype) for x in (logps, ref, kl_logps, ref_kl))
  return arrays, desirable


def _avg_pair(n=6, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (-rng.uniform(0.1, 3, n).astype(dtype),
          -rng.uniform(0.1, 3, n).astype(dtype))


# --- hand values --------------------------------------------------------------


def test_orpo_hand_value():
  # Average logps -0.5, -1.0: log-odds = 0.5 - (log(1-e^-0.5) - log(1-e^-1))
  # = 0.974077; loss = 0.1 * log(1 + e^-0.974077).
  got = unp.orpo_loss(jnp.array([-0.5]), jnp.array([-1.0]), beta=0.1)
  np.testing.assert_allclose(got, [0.032029979], rtol=1e-6)


def test_simpo_cpo_hand_values():
  # SimPO, beta 2, gamma 0.5: z = 2 * 0.5 - 0.5 = 0.5, log(1 + e^-0.5).
  got = unp.simpo_loss(jnp.array([-0.5]), jnp.array([-1.0]), beta=2.0,
                       gamma=0.5)
  np.testing.assert_allclose(got, [0.474076984], rtol=1e-6)
  # CPO, beta 0.1 on summed logps -10, -12: log(1 + e^-0.2).
  got = unp.cpo_loss(jnp.array([-10.0]), jnp.array([-12.0]), beta=0.1)
  np.testing.assert_allclose(got, [0.598138869], rtol=1e-6)


def test_kto_hand_values():
  # rho = (0.4, -0.5); KL pairs differ by 0.1 on average -> z0 = 0.1.
  # desirable: 1 - s(0.1 * (0.4 - 0.1)); undesirable, weight 1.5:
  # 1.5 * (1 - s(0.1 * (0.1 + 0.5))).
  args = (jnp.array([-10.0, -12.0]), jnp.array([-10.4, -11.5]),
          jnp.array([-5.0, -6.0]), jnp.array([-5.1, -6.1]),
          jnp.array([True, False]))
  got = unp.kto_loss(*args, beta=0.1, undesirable_weight=1.5)
  np.testing.assert_allclose(got, [0.492500562, 0.727506748], rtol=1e-6)
  # A negative KL estimate is clamped to 0: 1 - s(0.04), 1 - s(0.05).
  args = args[:2] + (args[3], args[2], args[4])
  got = unp.kto_loss(*args, beta=0.1)
  np.testing.assert_allclose(got, [0.490001333, 0.487502604], rtol=1e-6)


def test_bco_and_npo_hand_values():
  # delta 0.02: -log s(0.04 - 0.02) and -log s(-(-0.05 - 0.02)).
  got = unp.bco_loss(jnp.array([-10.0, -12.0]), jnp.array([-10.4, -11.5]),
                     jnp.array([True, False]), beta=0.1, delta=0.02)
  np.testing.assert_allclose(got, [0.683197180, 0.658759556], rtol=1e-6)
  # NPO: -(2 / 0.1) log s(-0.1 * 0.4) = 20 log(1 + e^0.04).
  got = unp.npo_loss(jnp.array([-10.0]), jnp.array([-10.4]), beta=0.1)
  np.testing.assert_allclose(got, [14.266943345], rtol=1e-6)


def test_bco_running_mean_hand_values():
  # (0, 0) + [1, 2, 3] -> mean 2, count 3; + [5] -> 2 + 3 / 4 = 2.75.
  mean, count = unp.bco_running_mean_update(0.0, 0.0, jnp.array([1., 2., 3.]))
  np.testing.assert_allclose((mean, count), (2.0, 3.0))
  mean, count = unp.bco_running_mean_update(mean, count, jnp.array(5.0))
  np.testing.assert_allclose((mean, count), (2.75, 4.0))


# --- references, gradients, jit/vmap ------------------------------------------


@pytest.mark.parametrize("fn, ref, kw", [
    (unp.orpo_loss, np_orpo, {"beta": 0.1}),
    (unp.orpo_loss, np_orpo, {"beta": 0.5}),
    (unp.cpo_loss, np_cpo, {"beta": 0.1}),
    (unp.cpo_loss, np_cpo, {"beta": 0.3, "label_smoothing": 0.1}),
    (unp.simpo_loss, np_simpo, {"beta": 2.0, "gamma": 1.0}),
    (unp.simpo_loss, np_simpo, {"beta": 0.1, "gamma": 0.5,
                                "label_smoothing": 0.2}),
])
def test_pairwise_reference_free(fn, ref, kw):
  c, r = _avg_pair()
  got = fn(c, r, **kw)
  np.testing.assert_allclose(got, ref(c.astype(np.float64),
                                      r.astype(np.float64), **kw),
                             rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda a, b: fn(a, b, **kw))(c, r), got,
                             rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(lambda a, b: fn(a, b, **kw))(c, r), got,
                             rtol=1e-6)
  with jax.enable_x64(True):
    check_grads(jax.jit(lambda a, b: fn(a, b, **kw)),
                tuple(jnp.asarray(x, jnp.float64) for x in _avg_pair(seed=1)),
                order=1, modes=("fwd", "rev"))
  with pytest.raises(ValueError, match=r"rejected_logps has shape \(4,\)"):
    fn(c, r[:4], **kw)


def test_orpo_stable_near_certain_completions():
  # log(1 - e^x) for x -> 0^- and x << 0 stays finite and accurate.
  c = jnp.array([-1e-6, -40.0])
  r = jnp.array([-2.0, -41.0])
  got = unp.orpo_loss(c, r, beta=1.0)
  assert np.all(np.isfinite(got))
  want = np_orpo(np.array([-1e-6, -40.0]), np.array([-2.0, -41.0]), 1.0)
  np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.parametrize("dw, uw", [(1.0, 1.0), (1.0, 1.33), (0.7, 1.0)])
def test_kto_matches_numpy(dw, uw):
  (logps, ref, kl, ref_kl), desirable = _unpaired_batch()
  got = unp.kto_loss(logps, ref, kl, ref_kl, desirable, beta=0.3,
                     desirable_weight=dw, undesirable_weight=uw)
  want = np_kto(*(x.astype(np.float64) for x in (logps, ref, kl, ref_kl)),
                desirable, 0.3, dw, uw)
  # TRL concatenates desirable then undesirable; alignax keeps input order.
  order = np.concatenate([np.flatnonzero(desirable),
                          np.flatnonzero(~desirable)])
  np.testing.assert_allclose(np.asarray(got)[order], want, rtol=1e-5)


def test_kto_kl_is_a_constant_and_jit_vmap():
  (logps, ref, kl, ref_kl), desirable = _unpaired_batch(dtype=np.float64)
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(x) for x in (logps, ref, kl, ref_kl))
    grads = jax.grad(
        lambda *a: unp.kto_loss(*a, desirable, beta=0.3).sum(),
        argnums=(0, 1, 2, 3))(*args)
    assert np.all(grads[2] == 0) and np.all(grads[3] == 0)
    check_grads(jax.jit(lambda a, b: unp.kto_loss(a, b, args[2], args[3],
                                                  desirable, beta=0.3)),
                args[:2], order=1, modes=("fwd", "rev"))
  eager = unp.kto_loss(logps, ref, kl, ref_kl, desirable, beta=0.3)
  jitted = jax.jit(unp.kto_loss, static_argnames=())(logps, ref, kl, ref_kl,
                                                      desirable, beta=0.3)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)
  stacked = [np.stack([x, x]) for x in (logps, ref, kl, ref_kl, desirable)]
  both = jax.vmap(lambda *a: unp.kto_loss(*a, beta=0.3))(*stacked)
  np.testing.assert_allclose(both[1], eager, rtol=1e-6)
  with pytest.raises(ValueError, match=r"desirable has shape \(2,\)"):
    unp.kto_loss(logps, ref, kl, ref_kl, desirable[:2])


def test_bco_matches_trl_with_running_mean():
  # Two training batches: update the running mean on the batch rewards
  # first, then compute the loss with the updated mean (TRL's order).
  np_running = NpRunningMoments()
  mean, count = 0.0, 0.0
  for seed in (0, 1):
    (logps, ref, _, _), desirable = _unpaired_batch(seed=seed)
    rewards = 0.3 * (logps - ref)
    np_running.update(rewards.astype(np.float64))
    mean, count = unp.bco_running_mean_update(mean, count, rewards)
    np.testing.assert_allclose(mean, np_running.mean, rtol=1e-5)
    got = unp.bco_loss(logps, ref, desirable, beta=0.3, delta=mean)
    want = np_bco(logps.astype(np.float64), ref.astype(np.float64),
                  desirable, 0.3, np_running.mean)
    order = np.concatenate([np.flatnonzero(desirable),
                            np.flatnonzero(~desirable)])
    np.testing.assert_allclose(np.asarray(got)[order], want, rtol=1e-5)


def test_bco_pair_running_mean_like_old_trl():
  # Old DPOTrainer bco_pair: update with the scalar batch-mean reward, then
  # use the running mean as delta.
  np_running = NpRunningMoments()
  mean, count = 0.0, 0.0
  for seed in (0, 1, 2):
    rng = np.random.default_rng(seed)
    c, r = -rng.uniform(5, 30, 4), -rng.uniform(5, 30, 4)
    cr, rr = c + rng.normal(0, 1, 4), r + rng.normal(0, 1, 4)
    batch_reward = np.mean(np.concatenate([0.1 * (c - cr), 0.1 * (r - rr)]))
    np_running.update(batch_reward)
    mean, count = unp.bco_running_mean_update(mean, count, batch_reward)
    np.testing.assert_allclose(mean, np_running.mean, rtol=1e-6)
    a, b = c - cr, r - rr
    want = -_ls(0.1 * a - np_running.mean) - _ls(-(0.1 * b - np_running.mean))
    np.testing.assert_allclose(
        pref.bco_pair_loss(c, r, cr, rr, beta=0.1, delta=mean), want,
        rtol=1e-5)
  assert count == 3


def test_bco_and_npo_grads_jit_vmap():
  (logps, ref, _, _), desirable = _unpaired_batch(dtype=np.float64)
  with jax.enable_x64(True):
    args = (jnp.asarray(logps), jnp.asarray(ref))
    check_grads(jax.jit(lambda a, b: unp.bco_loss(a, b, desirable, beta=0.3,
                                                  delta=0.1)),
                args, order=1, modes=("fwd", "rev"))
    check_grads(jax.jit(lambda a, b: unp.npo_loss(a, b, beta=0.3)), args,
                order=1, modes=("fwd", "rev"))
    assert jax.grad(lambda d: unp.bco_loss(*args, desirable,
                                           delta=d).sum())(0.1) == 0.0
  for fn in (lambda a, b, d: unp.bco_loss(a, b, d, beta=0.3, delta=0.1),
             lambda a, b, d: unp.npo_loss(a, b, beta=0.3)):
    eager = fn(logps, ref, desirable)
    np.testing.assert_allclose(jax.jit(fn)(logps, ref, desirable), eager,
                               rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(fn)(logps, ref, desirable), eager,
                               rtol=1e-6)
  want = -(2 / 0.3) * _ls(-0.3 * (logps - ref))
  np.testing.assert_allclose(unp.npo_loss(logps, ref, beta=0.3), want,
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r"ref_logps has shape \(3,\)"):
    unp.npo_loss(logps, ref[:3])
  with pytest.raises(ValueError, match=r"desirable has shape \(3,\)"):
    unp.bco_loss(logps, ref, desirable[:3])


def test_npo_small_beta_is_gradient_ascent():
  # d/dlogp of -(2/b) log s(-b x) -> 1 as b -> 0: plain NLL ascent.
  g = jax.grad(lambda x: unp.npo_loss(x, jnp.float32(-3.0), beta=1e-4))(
      jnp.float32(-2.0))
  np.testing.assert_allclose(g, 1.0, rtol=1e-3)
  assert math.isclose(float(unp.npo_loss(-3.0, -3.0, beta=0.5)),
                      4 * math.log(2), rel_tol=1e-6)
