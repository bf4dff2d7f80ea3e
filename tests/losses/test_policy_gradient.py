"""Tests for the GRPO family, RLOO and DisCO in alignax.losses._policy_gradient.

The NumPy references transcribe TRL's ``GRPOTrainer._compute_loss`` and the
advantages of ``_generate_and_score_completions`` / ``RLOOTrainer``
(huggingface/trl f2cd57710ae345ea6428ae95363267fcf38a3dc8), and DisCO's
objective from the paper (Li et al., 2025) with the authors' grouping
(Optimization-AI/DisCO ``core_algos.py``), written on NumPy arrays
independently of the alignax code.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from alignax import losses
from alignax.losses import _policy_gradient as pg

LOSS_TYPES = pg.GRPO_LOSS_TYPES


# --- NumPy references ------------------------------------------------------------


def np_grpo(logps, old, ref, adv, mask, loss_type, eps_low=0.2, eps_high=None,
            beta=0.0, level="token", max_len=None, delta=None, t_pos=1.0,
            t_neg=1.05, bias_kl=False):
  """TRL ``GRPOTrainer._compute_loss`` (one process, no accumulation)."""
  eps_high = eps_low if eps_high is None else eps_high
  adv = adv[:, None]
  log_ratio = logps - old
  if level == "token":
    liw = log_ratio
  else:
    liw = ((log_ratio * mask).sum(-1)
           / np.clip(mask.sum(-1), 1.0, None))[:, None]
  coef_1 = np.exp(liw)
  if beta:
    kl = np.exp(ref - logps) - (ref - logps) - 1
    if bias_kl:
      kl = kl * coef_1
  if loss_type == "cispo":
    ptl = -np.minimum(coef_1, eps_high) * adv * logps
  elif loss_type == "sapo":
    t = np.where(adv > 0, t_pos, t_neg)
    ptl = -(1.0 / (1.0 + np.exp(-t * (coef_1 - 1)))) * 4 / t * adv
  else:
    coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
    if delta is not None:
      coef_1 = np.minimum(coef_1, delta)
    ptl = -np.minimum(coef_1 * adv, coef_2 * adv)
  if beta:
    ptl = ptl + beta * kl
  if loss_type in ("grpo", "sapo"):
    return ((ptl * mask).sum(-1) / np.clip(mask.sum(-1), 1.0, None)).mean()
  if loss_type == "dr_grpo":
    return (ptl * mask).sum() / (ptl.shape[0] * max_len)
  return (ptl * mask).sum() / max(mask.sum(), 1.0)  # bnpo, dapo, cispo


def np_nanstd(x, axis=None):
  mean = np.nanmean(x, axis=axis, keepdims=True)
  var = np.nanmean((x - mean) ** 2, axis=axis, keepdims=True)
  count = np.sum(~np.isnan(x), axis=axis, keepdims=True)
  var = np.where(count > 1, var * count / np.maximum(count - 1, 1), np.nan)
  return np.squeeze(np.sqrt(var), axis=axis)


def np_group_advantages(rewards, g, scale):
  grouped = rewards.reshape(-1, g)
  mean = np.repeat(np.nanmean(grouped, 1), g)
  if scale == "batch":
    std = np.full_like(rewards, np_nanstd(rewards))
  else:
    std = np.repeat(np_nanstd(grouped, 1), g)
  adv = rewards - mean
  if scale != "none":
    adv = adv / (std + 1e-4)
  return np.nan_to_num(adv, nan=0.0)


def np_rloo_advantages(rewards, g, normalize):
  grouped = rewards.reshape(-1, g)
  counts = (~np.isnan(grouped)).sum(1, keepdims=True)
  base = (np.nansum(grouped, 1, keepdims=True) - grouped) / (counts - 1)
  adv = rewards - base.reshape(-1)
  if normalize:
    adv = (adv - np.nanmean(adv)) / (np_nanstd(adv) + 1e-4)
  return np.nan_to_num(adv, nan=0.0)


def np_rloo(logps, old, adv, mask, eps_low=0.2, eps_high=None):
  eps_high = eps_low if eps_high is None else eps_high
  coef_1 = np.exp((logps * mask).sum(1) - (old * mask).sum(1))
  coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
  return -np.minimum(coef_1 * adv, coef_2 * adv)  # [B]; TRL's loss: mean


def np_disco(logps, old, mask, rewards, g, score, tau, beta, delta):
  """The paper's objective; groups, scores and KL as the authors' code."""
  ratio = np.exp(logps - old)
  kl = ((ratio - 1 - (logps - old)) * mask).sum() / mask.sum()
  per_token = logps if score == "log_l" else ratio
  s = ((per_token * mask).sum(1) / mask.sum(1)).reshape(-1, g)
  r = rewards.reshape(-1, g)
  out = []
  for q in range(s.shape[0]):
    pos, neg = s[q][r[q] == 1], s[q][r[q] == 0]
    j = 0.0
    if len(pos) and len(neg):
      agg = tau * np.log(np.mean(np.exp(neg / tau))) if tau else neg.mean()
      j = pos.mean() - agg
    out.append(-j + beta * max(kl - delta, 0.0) ** 2)
  return np.array(out)


# --- random inputs ---------------------------------------------------------------


def rollout(seed=0, b=8, t=7, dtype=np.float32):
  """Log-probs of a group batch with padded completions (one empty row)."""
  rng = np.random.default_rng(seed)
  logps = rng.normal(-1.5, 0.7, (b, t))
  old = logps + rng.normal(0.0, 0.25, (b, t))
  ref = logps + rng.normal(0.0, 0.3, (b, t))
  lengths = rng.integers(1, t + 1, b)
  lengths[3] = 0  # an empty completion (TRL clamps its length to 1)
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float64)
  adv = rng.normal(0.0, 1.0, b)
  return tuple(x.astype(dtype) for x in (logps, old, ref, adv, mask))


def reduce(out):
  sums, counts = out
  return jnp.sum(sums) / jnp.maximum(jnp.sum(counts), 1.0)


CASES = [dict(loss_type=lt) for lt in LOSS_TYPES] + [
    dict(loss_type="dapo", eps_high=0.28),
    dict(loss_type="grpo", level="sequence"),  # GSPO
    dict(loss_type="dapo", level="sequence"),
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="bnpo", beta=0.1, bias_kl=True),
    dict(loss_type="dr_grpo", beta=0.04),
    dict(loss_type="cispo", eps_high=1.1, beta=0.04),
    dict(loss_type="sapo", beta=0.04, level="sequence"),
    dict(loss_type="grpo", delta=1.15),
]
IDS = ["-".join(f"{k}={v}" for k, v in c.items()) for c in CASES]


def kwargs(case, t=7):
  """``np_grpo`` keywords -> ``grpo_loss`` keywords."""
  return dict(loss_type=case["loss_type"],
              epsilon_high=case.get("eps_high"), beta=case.get("beta", 0.0),
              importance_sampling_level=case.get("level", "token"),
              max_completion_length=t, delta=case.get("delta"),
              bias_correction_kl=case.get("bias_kl", False))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grpo_loss_matches_trl_numpy(case):
  logps, old, ref, adv, mask = rollout()
  f = jax.jit(functools.partial(losses.grpo_loss, **kwargs(case)))
  sums, counts = f(logps, old, ref, adv, mask)
  assert sums.shape == counts.shape == (8,)
  want = np_grpo(*(x.astype(np.float64) for x in (logps, old, ref, adv, mask)),
                 max_len=7, **case)
  np.testing.assert_allclose(reduce((sums, counts)), want, rtol=1e-5,
                             atol=1e-6)


def _cispo_grad(logps, old, ref, adv, mask, eps_high, beta, level):
  """d loss / d logps of CISPO (the clipped weight is a constant)."""
  liw = logps - old
  if level == "sequence":
    liw = np.repeat(((liw * mask).sum(-1) / np.clip(mask.sum(-1), 1, None))
                    [:, None], logps.shape[1], 1)
  g = -np.minimum(np.exp(liw), eps_high) * adv[:, None]
  g = g + beta * (1.0 - np.exp(ref - logps))
  return g * mask / max(mask.sum(), 1.0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grpo_loss_gradients(case):
  arrays = rollout(seed=1, dtype=np.float64)
  with jax.enable_x64(True):
    logps, old, ref, adv, mask = (jnp.asarray(x) for x in arrays)
    f = jax.jit(lambda lp: reduce(losses.grpo_loss(lp, old, ref, adv, mask,
                                                   **kwargs(case))))
    if case["loss_type"] == "cispo":  # stop-gradient: no finite differences
      want = _cispo_grad(*arrays, case.get("eps_high", 0.2),
                         case.get("beta", 0.0), case.get("level", "token"))
      np.testing.assert_allclose(jax.grad(f)(logps), want, rtol=1e-9,
                                 atol=1e-12)
    else:
      check_grads(f, (logps,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
    grad = jax.grad(f)(logps)
  assert np.all(np.asarray(grad)[np.asarray(mask) == 0] == 0)


def test_grpo_loss_ignores_masked_entries_even_inf():
  logps, old, ref, adv, mask = rollout(seed=2)
  kw = kwargs(dict(loss_type="grpo", beta=0.1))
  base = reduce(losses.grpo_loss(logps, old, ref, adv, mask, **kw))
  junk = [np.where(mask == 0, -np.inf, x) for x in (logps, old, ref)]
  f = lambda lp: reduce(losses.grpo_loss(lp, junk[1], junk[2], adv, mask,
                                         **kw))
  np.testing.assert_allclose(f(junk[0]), base, rtol=1e-6)
  assert np.all(np.isfinite(jax.grad(f)(jnp.asarray(junk[0]))))


def test_grpo_hand_values():
  # Two rows, ratios w = [[1.5, 0.5], [1.1, -]], A = [1, -1], eps = 0.2:
  # clipped terms -1.2, -0.5 (row 0) and +1.1 (row 1).
  w = np.array([[1.5, 0.5], [1.1, 1.0]])
  logps = np.array([[-1.0, -2.0], [-0.5, 0.0]])
  old = logps - np.log(w)
  mask = np.array([[1.0, 1.0], [1.0, 0.0]])
  adv = np.array([1.0, -1.0])
  ref = logps.copy()
  ref[0, 0] += math.log(2.0)  # k3 = 2 - ln 2 - 1 = 0.30685282 on one token

  def loss(**kw):
    f = jax.jit(lambda *a: reduce(losses.grpo_loss(*a, **kw)))
    return float(f(logps, old, ref, adv, mask))

  np.testing.assert_allclose(loss(loss_type="grpo"), 0.125, rtol=1e-6)
  np.testing.assert_allclose(loss(loss_type="dapo"), -0.2, rtol=1e-6)
  np.testing.assert_allclose(loss(loss_type="bnpo"), -0.2, rtol=1e-6)
  # Dr. GRPO: -0.6 / (B * L_max) = -0.6 / 8.
  np.testing.assert_allclose(
      loss(loss_type="dr_grpo", max_completion_length=4), -0.075, rtol=1e-6)
  # DAPO's asymmetric clip: 1.5 -> 1.28, so (-1.28 - 0.5 + 1.1) / 3.
  np.testing.assert_allclose(loss(loss_type="dapo", epsilon_high=0.28),
                             -0.68 / 3, rtol=1e-6)
  # GSPO: row 0's ratio is sqrt(1.5 * 0.5) = 0.8660254 (inside the clip).
  np.testing.assert_allclose(
      loss(loss_type="grpo", importance_sampling_level="sequence"),
      (1.1 - 0.8660254037844386) / 2, rtol=1e-6)
  # CISPO, cap 1.2: -min(w, 1.2) A logp = 1.2, 1.0, -0.55; / 3 tokens.
  np.testing.assert_allclose(loss(loss_type="cispo", epsilon_high=1.2), 0.55,
                             rtol=1e-6)
  # SAPO: row 0 is -4(sig(0.5) + sig(-0.5)) / 2 = -2; row 1 is
  # (4 / 1.05) sig(0.105) = 2.00467013.
  np.testing.assert_allclose(loss(loss_type="sapo"), 0.00233506547, atol=1e-6)
  # KL: 0.125 + beta * 0.30685282 / 2 tokens / 2 rows.
  np.testing.assert_allclose(loss(loss_type="grpo", beta=0.1), 0.1326713205,
                             rtol=1e-6)


def test_grpo_shape_errors_name_the_shape():
  logps, old, ref, adv, mask = rollout()
  with pytest.raises(ValueError, match=r"old_logps shape \(8, 6\)"):
    losses.grpo_loss(logps, old[:, :6], ref, adv, mask)
  with pytest.raises(ValueError, match=r"advantages shape \(7,\)"):
    losses.grpo_loss(logps, old, ref, adv[:7], mask)
  with pytest.raises(ValueError, match="dr_grpo.*max_completion_length"):
    losses.grpo_loss(logps, old, ref, adv, mask, loss_type="dr_grpo")
  with pytest.raises(ValueError, match="beta=0.1 needs ref_logps"):
    losses.grpo_loss(logps, old, None, adv, mask, beta=0.1)
  with pytest.raises(ValueError, match="loss_type='ppo'"):
    losses.grpo_loss(logps, old, ref, adv, mask, loss_type="ppo")


# --- advantages and RLOO ---------------------------------------------------------------


@pytest.mark.parametrize("scale", pg.SCALE_REWARDS)
def test_group_advantages_match_trl(scale):
  rng = np.random.default_rng(3)
  rewards = rng.normal(size=12)
  rewards[[1, 4, 5]] = np.nan  # unscorable; group 1 keeps one value
  rewards[6:9] = 0.5  # a group with zero deviation
  got = jax.jit(functools.partial(losses.group_advantages, num_generations=3,
                                  scale_rewards=scale))(rewards)
  want = np_group_advantages(rewards, 3, scale)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_match_trl(normalize):
  rng = np.random.default_rng(4)
  rewards = rng.normal(size=12)
  rewards[[2, 9, 10]] = np.nan
  got = losses.rloo_advantages(rewards, num_generations=4,
                               normalize=normalize)
  want = np_rloo_advantages(rewards, 4, normalize)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _jit(fn, *args, **kw):
  return jax.jit(functools.partial(fn, **kw))(*args)


def test_advantages_hand_values():
  r = np.array([1.0, 0.0, 2.0], np.float32)  # mean 1, Bessel std 1
  np.testing.assert_allclose(
      _jit(losses.group_advantages, r, num_generations=3),
      [0.0, -1 / 1.0001, 1 / 1.0001], rtol=1e-6)
  np.testing.assert_allclose(
      _jit(losses.group_advantages, r, num_generations=3,
           scale_rewards="none"), [0.0, -1.0, 1.0], rtol=1e-6)
  # Leave-one-out baselines (0 + 2) / 2, (1 + 2) / 2, (1 + 0) / 2.
  np.testing.assert_allclose(
      _jit(losses.rloo_advantages, r, num_generations=3), [0.0, -1.5, 1.5],
      rtol=1e-6)
  # Normalised: mean 0, Bessel std 1.5.
  np.testing.assert_allclose(
      _jit(losses.rloo_advantages, r, num_generations=3, normalize=True),
      [0.0, -1.5 / 1.5001, 1.5 / 1.5001], rtol=1e-6)
  # RLOO's KL in the reward: 1 - 0.5 * ((-1 - -1.5) + (-2 - -2.5)) = 0.5.
  np.testing.assert_allclose(_jit(
      losses.kl_penalized_rewards, np.array([1.0]),
      np.array([[-1.0, -2.0, 7.0]]), np.array([[-1.5, -2.5, 0.0]]),
      np.array([[1, 1, 0]]), beta=0.5), [0.5])


def test_rloo_loss_matches_trl_and_gradients():
  logps, old, _, adv, mask = rollout(seed=5, dtype=np.float64)
  old = logps + (old - logps) * 0.3  # summed ratios stay near the clip
  got = jax.jit(losses.rloo_loss)(*(x.astype(np.float32)
                                    for x in (logps, old, adv, mask)))
  np.testing.assert_allclose(got, np_rloo(logps, old, adv, mask), rtol=1e-5,
                             atol=1e-6)
  with jax.enable_x64(True):
    f = jax.jit(lambda lp: jnp.mean(losses.rloo_loss(lp, old, adv, mask,
                                                     epsilon_high=0.28)))
    check_grads(f, (jnp.asarray(logps),), order=1, modes=("rev",))
  # Hand: ratios exp(ln 0.75) and 1.1 with A = 1, -1 -> -0.75 and +1.1.
  w = np.array([[1.5, 0.5], [1.1, 1.0]])
  lp = np.array([[-1.0, -2.0], [-0.5, 0.0]])
  np.testing.assert_allclose(
      _jit(losses.rloo_loss, lp, lp - np.log(w), np.array([1.0, -1.0]),
           np.array([[1.0, 1.0], [1.0, 0.0]])), [-0.75, 1.1], rtol=1e-6)
  with pytest.raises(ValueError, match=r"advantages shape \(8, 7\)"):
    losses.rloo_loss(logps, old, mask, mask)


# --- DisCO --------------------------------------------------------------------------


def disco_inputs(seed=6, dtype=np.float64):
  logps, old, _, _, mask = rollout(seed=seed, b=12, dtype=dtype)
  mask[3, 0] = 1.0  # no empty rows: the authors divide by the raw length
  rewards = np.array([1, 0, 0, 1,  1, 1, 1, 1,  0, 1, 0, 0], dtype)  # G = 4
  return logps, old, mask, rewards


DISCO_CASES = [("log_l", 0.0), ("log_l", 10.0), ("l_ratio", 0.0),
               ("l_ratio", 1.0)]


@pytest.mark.parametrize("score, tau", DISCO_CASES)
def test_disco_matches_paper_numpy_and_gradients(score, tau):
  logps, old, mask, rewards = disco_inputs()
  kw = dict(num_generations=4, score=score, tau=tau, beta=50.0, delta=1e-3)
  got = jax.jit(functools.partial(losses.disco_loss, **kw))(
      logps, old, mask, rewards)
  want = np_disco(logps, old, mask, rewards, 4, score, tau, 50.0, 1e-3)
  assert got.shape == (3,) and want[1] > 0  # group 1 (all positive): penalty
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with jax.enable_x64(True):
    f = jax.jit(lambda lp: jnp.mean(losses.disco_loss(lp, old, mask, rewards,
                                                      **kw)))
    check_grads(f, (jnp.asarray(logps),), order=1, modes=("rev",))


def authors_disco_surrogate(logps, old, mask, rewards, g, tau, beta, delta):
  """The authors' torch loss (log-L score), transcribed to JAX."""
  ratio = jnp.exp(logps - old)
  kl = jnp.sum((-(logps - old) + ratio - 1) * mask) / jnp.sum(mask)
  s = (jnp.sum(logps * mask, 1) / jnp.sum(mask, 1)).reshape(-1, g)
  r = rewards.reshape(-1, g)
  pos, neg = r == 1, r == 0
  valid = (pos.sum(1) > 0) & (neg.sum(1) > 0)
  neg_max = jax.lax.stop_gradient(jnp.max(jnp.where(neg, s / tau, -jnp.inf),
                                          -1, keepdims=True))
  neg_max = jnp.where(neg_max == -jnp.inf, 0.0, neg_max)  # all-masked rows
  neg_exp = jnp.exp((s / tau - neg_max) * neg) * neg
  neg_sum = neg_exp.sum(-1, keepdims=True)
  lme = neg_sum / (jax.lax.stop_gradient(neg_sum) + 1e-30)
  per_q = ((s - tau * lme) * pos).sum(1) / jnp.maximum(pos.sum(1), 1)
  pg_loss = jnp.sum(jnp.where(valid, per_q, 0.0)) / r.shape[0]
  hinge = jax.lax.stop_gradient(jnp.maximum(beta * (kl - delta), 0.0))
  return -pg_loss + hinge * kl


def test_disco_gradient_equals_authors_code_with_twice_beta():
  logps, old, mask, rewards = disco_inputs()
  with jax.enable_x64(True):
    ours = jax.jit(jax.grad(lambda lp: jnp.mean(losses.disco_loss(
        lp, old, mask, rewards, num_generations=4, tau=10.0, beta=50.0,
        delta=1e-3))))(jnp.asarray(logps))
    theirs = jax.jit(jax.grad(lambda lp: authors_disco_surrogate(
        lp, old, mask, rewards, 4, 10.0, 100.0, 1e-3)))(jnp.asarray(logps))
  np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=1e-12)


def test_disco_hand_values():
  # One prompt, G = 3: log-L scores -1.5 (positive), -0.5 and -2 (negative).
  logps = np.array([[-1.0, -2.0], [-0.5, 9.9], [-3.0, -1.0]])
  mask = np.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
  rewards = np.array([1.0, 0.0, 0.0])
  # pi / pi_old = e^0.1 on row 0's two tokens: k3 = e^0.1 - 1.1 each, over
  # 5 tokens: KL = 0.00206837; beta (KL - 1e-3)^2 = 0.00114141 at beta 1e3.
  old = logps - np.array([[0.1, 0.1], [0.0, 0.0], [0.0, 0.0]])

  def loss(beta=1e3, delta=1e-3, **kw):
    return jax.jit(functools.partial(
        losses.disco_loss, num_generations=3, beta=beta, delta=delta,
        **kw))(logps, old, mask, rewards)

  # DisCO-b: -(-1.5 - (-0.5 - 2) / 2) = 0.25.
  np.testing.assert_allclose(loss(), [0.25 + 0.00114140854], rtol=1e-6)
  # DRO, tau = 1: -(-1.5 - log((e^-0.5 + e^-2) / 2)) = 0.50826610.
  np.testing.assert_allclose(loss(tau=1.0), [0.5082660974 + 0.00114140854],
                             rtol=1e-6)
  # L-ratio: scores e^0.1, 1, 1 -> -(1.10517092 - 1).
  np.testing.assert_allclose(loss(score="l_ratio"),
                             [-0.10517092 + 0.00114140854], rtol=1e-6)
  # Within the budget (delta = 0.01): no penalty.
  np.testing.assert_allclose(loss(delta=0.01), [0.25], rtol=1e-6)


def test_disco_shape_errors_name_the_shape():
  logps, old, mask, rewards = disco_inputs()
  with pytest.raises(ValueError, match=r"rewards shape \(11,\)"):
    losses.disco_loss(logps, old, mask, rewards[:11], num_generations=4)
  with pytest.raises(ValueError, match="multiple of num_generations=5"):
    losses.disco_loss(logps, old, mask, rewards, num_generations=5)
  with pytest.raises(ValueError, match=r"old_logps shape \(12, 6\)"):
    losses.disco_loss(logps, old[:, :6], mask, rewards, num_generations=4)
  with pytest.raises(ValueError, match="score='logl'"):
    losses.disco_loss(logps, old, mask, rewards, num_generations=4,
                      score="logl")
