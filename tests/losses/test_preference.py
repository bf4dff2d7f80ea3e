"""Tests for the pairwise (DPO-family) losses in alignax.losses._preference.

NumPy references below are transcribed from TRL's ``DPOTrainer`` formulas
(``trl/trainer/dpo_trainer.py``, the per-``loss_type`` branches), written on
log-probabilities directly and independently of the alignax code.
"""

import math

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from alignax.losses import _preference as pref

# The canonical pair: c = -10, r = -12, c_ref = -10.4, r_ref = -11.5, so the
# log-ratios are c - c_ref = 0.4 and r - r_ref = -0.5, Delta = 0.9, and with
# beta = 0.1 the DPO logit is z = 0.09.
PAIR = tuple(jnp.array([v]) for v in (-10.0, -12.0, -10.4, -11.5))
BETA = 0.1


def _ls(x):  # log sigmoid
  return -np.logaddexp(0.0, -x)


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def _lr(c, r, cr, rr):
  return c - cr, r - rr


def np_dpo(c, r, cr, rr, beta, label_smoothing=0.0):
  z = beta * ((c - r) - (cr - rr))
  return -(1 - label_smoothing) * _ls(z) - label_smoothing * _ls(-z)


def np_hinge(c, r, cr, rr, beta):
  return np.maximum(0.0, 1.0 - beta * ((c - r) - (cr - rr)))


def np_ipo(c, r, cr, rr, beta, chosen_lengths, rejected_lengths):
  a = (c - cr) / np.maximum(chosen_lengths, 1)
  b = (r - rr) / np.maximum(rejected_lengths, 1)
  return (a - b - 1 / (2 * beta)) ** 2


def np_sigmoid_norm(c, r, cr, rr, beta, chosen_lengths, rejected_lengths):
  a = (c - cr) / np.maximum(chosen_lengths, 1)
  b = (r - rr) / np.maximum(rejected_lengths, 1)
  return -_ls(beta * (a - b))


def np_exo(c, r, cr, rr, beta, epsilon=1e-3):
  z = beta * ((c - cr) - (r - rr))
  return (_sig(z) * (_ls(z) - math.log(1 - epsilon))
          + _sig(-z) * (_ls(-z) - math.log(epsilon)))


def np_nca(c, r, cr, rr, beta):
  a, b = _lr(c, r, cr, rr)
  return -_ls(beta * a) - 0.5 * _ls(-beta * a) - 0.5 * _ls(-beta * b)


def np_robust(c, r, cr, rr, beta, label_smoothing=0.0):
  z = beta * ((c - cr) - (r - rr))
  clean = -(1 - label_smoothing) * _ls(z)
  flipped = -label_smoothing * _ls(-z)
  return (clean - flipped) / (1 - 2 * label_smoothing)


def np_bco_pair(c, r, cr, rr, beta, delta=0.0):
  a, b = _lr(c, r, cr, rr)
  return -_ls(beta * a - delta) - _ls(-(beta * b - delta))


def np_sppo(c, r, cr, rr, beta):
  a, b = _lr(c, r, cr, rr)
  return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2


def np_aot(c, r, cr, rr, beta, label_smoothing=0.0):
  d = np.sort(c - r) - np.sort(cr - rr)
  return (-_ls(beta * d) * (1 - label_smoothing)
          - _ls(-beta * d) * label_smoothing)


def np_aot_unpaired(c, r, cr, rr, beta, label_smoothing=0.0):
  a, b = _lr(c, r, cr, rr)
  d = np.sort(a) - np.sort(b)
  return (-_ls(beta * d) * (1 - label_smoothing)
          - _ls(-beta * d) * label_smoothing)


def np_apo_zero(c, r, cr, rr, beta):
  a, b = _lr(c, r, cr, rr)
  return 1 - _sig(beta * a) + _sig(beta * b)


def np_apo_down(c, r, cr, rr, beta):
  a, b = _lr(c, r, cr, rr)
  return _sig(beta * a) + 1 - _sig(beta * (a - b))


def np_discopop(c, r, cr, rr, beta, tau=0.05):
  logits = beta * ((c - r) - (cr - rr))
  mod = _sig(logits / tau)
  return -_ls(logits) * (1 - mod) + np.exp(-logits) * mod


# (loss, numpy reference, hyper-parameters). Lengths are added where needed.
CASES = [
    (pref.dpo_loss, np_dpo, {}),
    (pref.dpo_loss, np_dpo, {"label_smoothing": 0.2}),
    (pref.hinge_loss, np_hinge, {}),
    (pref.ipo_loss, np_ipo, {"lengths": True}),
    (pref.sigmoid_norm_loss, np_sigmoid_norm, {"lengths": True}),
    (pref.exo_pair_loss, np_exo, {}),
    (pref.exo_pair_loss, np_exo, {"epsilon": 0.1}),
    (pref.nca_pair_loss, np_nca, {}),
    (pref.robust_loss, np_robust, {"label_smoothing": 0.2}),
    (pref.bco_pair_loss, np_bco_pair, {}),
    (pref.bco_pair_loss, np_bco_pair, {"delta": 0.3}),
    (pref.sppo_hard_loss, np_sppo, {}),
    (pref.aot_loss, np_aot, {"label_smoothing": 0.1}),
    (pref.aot_unpaired_loss, np_aot_unpaired, {}),
    (pref.apo_zero_loss, np_apo_zero, {}),
    (pref.apo_down_loss, np_apo_down, {}),
    (pref.discopop_loss, np_discopop, {}),
    (pref.discopop_loss, np_discopop, {"tau": 0.5}),
]
BATCH_COUPLED = {pref.aot_loss, pref.aot_unpaired_loss}
IDS = [f"{fn.__name__}-{i}" for i, (fn, _, _) in enumerate(CASES)]


def _batch(n=6, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  c = -rng.uniform(5, 30, n)
  r = -rng.uniform(5, 30, n)
  cr = c + rng.normal(0, 1.5, n)
  rr = r + rng.normal(0, 1.5, n)
  lengths = (rng.integers(1, 20, n), rng.integers(1, 20, n))
  lengths[0][0] = lengths[1][1] = 0  # empty completions: TRL clamps to 1
  return tuple(x.astype(dtype) for x in (c, r, cr, rr)), lengths


def _kwargs(hyper, lengths, beta=0.3):
  kw = {k: v for k, v in hyper.items() if k != "lengths"}
  if hyper.get("lengths"):
    kw["chosen_lengths"], kw["rejected_lengths"] = lengths
  return dict(beta=beta, **kw)


@pytest.mark.parametrize(
    "fn, hyper, expected",
    [
        (pref.dpo_loss, {}, 0.649159339),  # log(1 + e^-0.09)
        # cDPO: 0.9 log(1+e^-0.09) + 0.1 log(1+e^0.09) = 0.649159 + 0.1*0.09.
        (pref.dpo_loss, {"label_smoothing": 0.1}, 0.658159339),
        (pref.hinge_loss, {}, 0.91),  # max(0, 1 - 0.09)
        # Lengths 4, 5: 0.4/4 - (-0.5/5) = 0.2; (0.2 - 1/(2*0.1))^2 = 4.8^2.
        (pref.ipo_loss, {"lengths": True}, 23.04),
        # -log sigmoid(0.1 * 0.2) = log(1 + e^-0.02).
        (pref.sigmoid_norm_loss, {"lengths": True}, 0.683197180),
        # s(z)[log s(z) - log(1-1e-3)] + s(-z)[log s(-z) - log 1e-3], z=0.09.
        (pref.exo_pair_loss, {}, 2.606945014),
        # -log s(0.04) - 0.5 log s(-0.04) - 0.5 log s(0.05).
        (pref.nca_pair_loss, {}, 1.364250575),
        # (0.9 log(1+e^-0.09) - 0.1 log(1+e^0.09)) / 0.8.
        (pref.robust_loss, {"label_smoothing": 0.1}, 0.637909339),
        (pref.bco_pair_loss, {}, 1.341806815),  # log(1+e^-0.04)+log(1+e^-0.05)
        # delta 0.02: log(1 + e^-(0.04-0.02)) + log(1 + e^-(0.05+0.02)).
        (pref.bco_pair_loss, {"delta": 0.02}, 1.341956735),
        (pref.sppo_hard_loss, {}, 41.41),  # (0.4 - 5)^2 + (-0.5 + 5)^2
        (pref.aot_loss, {}, 0.649159339),  # one pair: sorting is the identity
        (pref.aot_unpaired_loss, {}, 0.649159339),
        (pref.apo_zero_loss, {}, 0.977503937),  # 1 - s(0.04) + s(-0.05)
        (pref.apo_down_loss, {}, 0.987513842),  # s(0.04) + 1 - s(0.09)
        # m = s(0.09/0.05) = 0.858149; (1-m) log(1+e^-0.09) + m e^-0.09.
        (pref.discopop_loss, {}, 0.876373017),
    ],
)
def test_hand_values(fn, hyper, expected):
  lengths = (jnp.array([4.0]), jnp.array([5.0]))
  got = fn(*PAIR, **_kwargs(hyper, lengths, beta=BETA))
  np.testing.assert_allclose(got, [expected], rtol=1e-6)


@pytest.mark.parametrize("fn, ref, hyper", CASES, ids=IDS)
def test_matches_numpy(fn, ref, hyper):
  logps, lengths = _batch()
  kw = _kwargs(hyper, lengths)
  got = fn(*logps, **kw)
  assert got.shape == (6,)
  want = ref(*(x.astype(np.float64) for x in logps), **kw)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("fn, ref, hyper", CASES, ids=IDS)
def test_gradients(fn, ref, hyper):
  del ref
  logps, lengths = _batch(seed=1, dtype=np.float64)
  with jax.enable_x64(True):
    kw = _kwargs(hyper, lengths)
    f = jax.jit(lambda *a: fn(*a, **kw))
    check_grads(f, tuple(jnp.asarray(x) for x in logps), order=1,
                modes=("fwd", "rev"))


@pytest.mark.parametrize("fn, ref, hyper", CASES, ids=IDS)
def test_jit_and_vmap_equal_eager(fn, ref, hyper):
  del ref
  logps, lengths = _batch(seed=2)
  kw = _kwargs(hyper, lengths)
  eager = fn(*logps, **kw)
  np.testing.assert_allclose(jax.jit(lambda *a: fn(*a, **kw))(*logps), eager,
                             rtol=1e-6, atol=1e-6)
  # vmap over two stacked batches (lengths, if any, are shared).
  stacked = [jnp.stack([x, x[::-1]]) for x in logps]
  both = jax.vmap(lambda *a: fn(*a, **kw))(*stacked)
  np.testing.assert_allclose(both[0], eager, rtol=1e-6, atol=1e-6)
  if fn not in BATCH_COUPLED and "lengths" not in hyper:
    # Per-pair losses: vmapping over the batch (scalar inputs) is the same.
    per_pair = jax.vmap(lambda *a: fn(*a, **kw))(*logps)
    np.testing.assert_allclose(per_pair, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn, ref, hyper", CASES, ids=IDS)
def test_shape_validation(fn, ref, hyper):
  del ref
  logps, lengths = _batch()
  kw = _kwargs(hyper, lengths)
  bad = (logps[0], logps[1][:4], logps[2], logps[3])
  with pytest.raises(ValueError, match=r"rejected_logps has shape \(4,\)"):
    fn(*bad, **kw)


def test_length_validation():
  logps, _ = _batch()
  with pytest.raises(ValueError, match=r"chosen_lengths has shape \(3,\)"):
    pref.ipo_loss(*logps, chosen_lengths=jnp.ones(3),
                  rejected_lengths=jnp.ones(6))


def test_robust_rejects_half_smoothing():
  with pytest.raises(ValueError, match="label_smoothing"):
    pref.robust_loss(*PAIR, label_smoothing=0.5)


def test_reference_free_scalar_refs():
  # TRL reference_free: the reference log-probs are 0.
  logps, _ = _batch()
  got = pref.dpo_loss(logps[0], logps[1], 0.0, 0.0, beta=0.1)
  np.testing.assert_allclose(
      got, np_dpo(logps[0], logps[1], 0.0, 0.0, 0.1), rtol=1e-5)


def test_aot_is_invariant_to_batch_order():
  logps, _ = _batch()
  perm = np.random.default_rng(3).permutation(6)
  np.testing.assert_allclose(pref.aot_loss(*logps),
                             pref.aot_loss(*(x[perm] for x in logps)),
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r"\[B\] batch"):
    pref.aot_loss(*(x.reshape(2, 3) for x in logps))


# --- f-divergences ------------------------------------------------------------


def test_f_divergence_scores_match_numpy():
  c, r = np.array([0.4, -1.3, 2.0]), np.array([-0.5, 0.7, -2.5])
  np.testing.assert_allclose(pref.reverse_kl_scores(c, r), (c, r))
  # TRL keeps f'(u)'s additive constants (they matter once each score is
  # divided by its own length: ipo, sigmoid_norm).
  np.testing.assert_allclose(pref.forward_kl_scores(c, r),
                             (1 - np.exp(-c), 1 - np.exp(-r)), rtol=1e-6)
  np.testing.assert_allclose(pref.js_divergence_scores(c, r),
                             (np.log(2) + _ls(c), np.log(2) + _ls(r)),
                             rtol=1e-6)
  for alpha in (0.5, 0.2, 1.7):
    want = tuple((np.exp((alpha - 1) * x) - 1) / (alpha - 1) for x in (c, r))
    np.testing.assert_allclose(
        pref.alpha_divergence_scores(c, r, alpha=alpha), want, rtol=1e-5)
  # alpha = 1 is the reverse-KL limit.
  np.testing.assert_allclose(pref.alpha_divergence_scores(c, r, alpha=1.0),
                             (c, r))
  # Hand values: alpha = 0.5 gives -2 (e^{-0.5 * 0.4} - 1) = 0.362538;
  # forward KL at c = 1: 1 - e^-1 = 0.632121; JS at 0: log 2 + log 1/2 = 0.
  np.testing.assert_allclose(
      pref.alpha_divergence_scores(0.4, -0.5)[0], 0.3625385, rtol=1e-6)
  np.testing.assert_allclose(pref.forward_kl_scores(1.0, 0.0)[0], 0.6321206,
                             rtol=1e-6)
  np.testing.assert_allclose(pref.js_divergence_scores(0.0, 0.0)[0], 0.0,
                             atol=1e-7)


def test_f_divergence_scores_clamp_like_trl():
  # (alpha - 1) * c = 500 is clamped to 80 before exp (float32).
  got = pref.alpha_divergence_scores(jnp.float32(-1000.0), jnp.float32(0.0))
  np.testing.assert_allclose(got[0], -2 * (math.exp(80.0) - 1), rtol=1e-6)


def test_f_divergence_dpo_equals_older_trl_logits():
  # Older TRL computed the f-DPO logits directly: for JS
  #   logits = Delta - (softplus(c) - softplus(r)),
  # for alpha' = 1 - alpha:  logits = (e^{-alpha' r} - e^{-alpha' c}) / alpha'.
  logps, _ = _batch()
  logps = tuple(x.astype(np.float64) for x in logps)
  c, r = _lr(*logps)
  js = (c - r) - (np.logaddexp(0, c) - np.logaddexp(0, r))
  got = pref.dpo_loss(*pref.js_divergence_scores(*pref.logratios(*logps)),
                      0.0, 0.0, beta=0.3)
  np.testing.assert_allclose(got, -_ls(0.3 * js), rtol=1e-5)
  a = 1 - 0.5
  alpha_logits = (np.exp(-a * r) - np.exp(-a * c)) / a
  got = pref.dpo_loss(
      *pref.alpha_divergence_scores(*pref.logratios(*logps), alpha=0.5),
      0.0, 0.0, beta=0.3)
  np.testing.assert_allclose(got, -_ls(0.3 * alpha_logits), rtol=1e-5)


# --- bco_pair delta, modpo, sft, weighted_sum -------------------------------


def test_bco_pair_delta_has_no_gradient():
  grad = jax.grad(lambda d: pref.bco_pair_loss(*PAIR, delta=d).sum())(0.3)
  assert grad == 0.0


def test_modpo_one_objective_is_dpo():
  logps, _ = _batch()
  empty = jnp.zeros((6, 0))
  np.testing.assert_allclose(
      pref.modpo_loss(*logps, empty, empty, beta=0.3, weights=jnp.ones(1)),
      pref.dpo_loss(*logps, beta=0.3), rtol=1e-6)


def test_modpo_hand_value_and_numpy():
  # weights (0.5, 0.5), reward margin 3 - 2 = 1:
  #   z = (0.1 * 0.9 - 0.5 * 1) / 0.5 = -0.82, loss = log(1 + e^0.82).
  got = pref.modpo_loss(*PAIR, jnp.array([[3.0]]), jnp.array([[2.0]]),
                        beta=BETA, weights=jnp.array([0.5, 0.5]))
  np.testing.assert_allclose(got, [1.184942829], rtol=1e-6)
  logps, _ = _batch()
  rng = np.random.default_rng(4)
  rw, rl = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
  w = np.array([0.4, 0.3, 0.2, 0.1])
  c, r = _lr(*(x.astype(np.float64) for x in logps))
  z = (0.3 / w[0]) * (c - r) - (1 / w[0]) * ((rw - rl) @ w[1:])
  np.testing.assert_allclose(
      pref.modpo_loss(*logps, rw, rl, beta=0.3, weights=w), -_ls(z),
      rtol=1e-5)
  with jax.enable_x64(True):
    check_grads(
        lambda *a: pref.modpo_loss(*a, rw, rl, beta=0.3, weights=w),
        tuple(jnp.asarray(x, jnp.float64) for x in logps), order=1,
        modes=("rev",))
  with pytest.raises(ValueError, match=r"chosen_margin_rewards has shape"):
    pref.modpo_loss(*logps, rw[:, :2], rl, beta=0.3, weights=w)


def test_sft_loss_mean_is_token_mean_nll():
  # Chosen logps -10 and -12 over 4 and 6 tokens: TRL's token-mean NLL is
  # 22 / 10 = 2.2; per pair: 10 * 2 / 10 = 2.0 and 12 * 2 / 10 = 2.4.
  got = pref.sft_loss(jnp.array([-10.0, -12.0]), jnp.array([4.0, 6.0]))
  np.testing.assert_allclose(got, [2.0, 2.4], rtol=1e-6)
  rng = np.random.default_rng(5)
  tok = -rng.uniform(0, 3, (4, 9))
  mask = rng.random((4, 9)) < 0.6
  want = -tok[mask].mean()  # nn.CrossEntropyLoss over the chosen tokens
  got = pref.sft_loss(np.where(mask, tok, 0).sum(-1), mask.sum(-1))
  np.testing.assert_allclose(got.mean(), want, rtol=1e-5)


def test_weighted_sum_mpo():
  logps, lengths = _batch()
  parts = [pref.dpo_loss(*logps), pref.bco_pair_loss(*logps),
           pref.sft_loss(logps[0], lengths[0].astype(np.float32))]
  got = pref.weighted_sum(parts, [0.8, 0.2, 1.0])
  # TRL: loss = sum_k w_k * mean(loss_k).
  want = sum(w * np.mean(p) for w, p in zip([0.8, 0.2, 1.0], parts))
  np.testing.assert_allclose(got.mean(), want, rtol=1e-6)
  with pytest.raises(ValueError, match="as many losses"):
    pref.weighted_sum(parts, [1.0])
  with pytest.raises(ValueError, match=r"losses\[1\] has shape \(3,\)"):
    pref.weighted_sum([parts[0], parts[1][:3]], [1.0, 1.0])
