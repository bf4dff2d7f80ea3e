"""Tests for alignax.losses._contrastive against loop-based NumPy references."""

import functools
import itertools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from alignax.losses import _contrastive as C

# Jitted entry points: one compilation per test instead of one per primitive
# (several times faster on the shared CPU). Validation tests use C directly.
J = types.SimpleNamespace(
    **{name: jax.jit(getattr(C, name)) for name in (
        "infonce_loss", "clip_loss", "siglip_loss", "mnrl_loss", "gist_loss",
        "dcl_loss", "dhel_loss", "mv_infonce_loss", "mv_dhel_loss",
        "symile_loss", "symile_sampled_loss", "alignment", "uniformity")},
    matryoshka_loss=jax.jit(C.matryoshka_loss, static_argnums=0,
                            static_argnames=("dims", "weights")))

# The issue's example: unit rows, so cosine = dot product.
X3 = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
Y3 = np.array([[0.8, 0.6], [1.0, 0.0], [-0.6, 0.8]])


# --------------------------------------------------------------------------
# NumPy references: explicit loops over candidates, written from the papers'
# formulas independently of the implementation.
# --------------------------------------------------------------------------
def np_lse(values):
  values = np.asarray(values, np.float64)
  top = values.max()
  return top + math.log(np.exp(values - top).sum())


def np_unit(v):
  v = np.asarray(v, np.float64)
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def ref_infonce(x, y, t):
  b = len(x)
  return np.array([np_lse([t * x[i] @ y[j] for j in range(b)])
                   - t * x[i] @ y[i] for i in range(b)])


def ref_clip(x, y, t):
  return 0.5 * (ref_infonce(x, y, t) + ref_infonce(y, x, t))


def ref_siglip(x, y, t, bias):
  b = len(x)
  out = np.zeros(b)
  for i in range(b):
    for j in range(b):
      z = 1.0 if i == j else -1.0
      out[i] += math.log1p(math.exp(-z * (t * x[i] @ y[j] + bias)))
  return out


def ref_mnrl(a, p, negs, scale):
  a, p = np_unit(a), np_unit(p)
  cands = list(p) + ([] if negs is None else list(np_unit(negs).reshape(
      -1, a.shape[1])))
  return np.array([np_lse([scale * a[i] @ c for c in cands])
                   - scale * a[i] @ p[i] for i in range(len(a))])


def ref_gist(a, p, ga, gp, negs, gnegs, tau, margin):
  a, p, ga, gp = map(np_unit, (a, p, ga, gp))
  b = len(a)
  out = []
  for i in range(b):
    # (model row, model candidate, guide row, guide candidate, is positive)
    cands = [(a[i], p[j], ga[i], gp[j], j == i) for j in range(b)]
    cands += [(a[i], a[j], ga[i], ga[j], False) for j in range(b)]
    cands += [(p[i], p[j], gp[i], gp[j], False) for j in range(b)]
    if negs is not None:
      flat = np_unit(negs).reshape(-1, a.shape[1])
      gflat = np_unit(gnegs).reshape(-1, ga.shape[1])
      cands += [(a[i], n, ga[i], gn, False) for n, gn in zip(flat, gflat)]
    threshold = ga[i] @ gp[i] - margin
    scores = [row @ c / tau for row, c, grow, gc, positive in cands
              if positive or grow @ gc <= threshold]
    out.append(np_lse(scores) - a[i] @ p[i] / tau)
  return np.array(out)


def ref_dcl(x, y, t):
  b = len(x)

  def one_way(u, v):
    return np.array([
        -t * u[i] @ v[i] + np_lse([t * u[i] @ u[j] for j in range(b) if j != i]
                                  + [t * u[i] @ v[j] for j in range(b)
                                     if j != i]) for i in range(b)])

  return 0.5 * (one_way(x, y) + one_way(y, x))


def ref_dhel(x, y, t):
  b = len(x)
  return np.array([
      -t * x[i] @ y[i]
      + np_lse([t * x[i] @ x[j] for j in range(b) if j != i])
      + np_lse([t * y[i] @ y[j] for j in range(b) if j != i])
      for i in range(b)])


def ref_mv_infonce(views, t):
  n, b, _ = views.shape
  out = []
  for i in range(b):
    num = [t * views[l, i] @ views[m, i] for l in range(n) for m in range(n)
           if l != m]
    den = [t * views[l, i] @ views[m, j] for l in range(n) for m in range(n)
           for j in range(b) if (j, m) != (i, l)]
    out.append(np_lse(den) - np_lse(num))
  return np.array(out)


def ref_mv_dhel(views, t):
  n, b, _ = views.shape
  out = []
  for i in range(b):
    num = [t * views[l, i] @ views[m, i] for l in range(n)
           for m in range(l + 1, n)]
    energy = sum(np_lse([t * views[l, i] @ views[l, j] for j in range(b)
                         if j != i]) for l in range(n))
    out.append(energy - np_lse(num))
  return np.array(out)


def np_mip(*rows):
  return np.prod(np.stack(rows), axis=0).sum()


def ref_symile(mods, t):
  m_count, b = len(mods), len(mods[0])
  out = np.zeros(b)
  for i in range(b):
    pos = t * np_mip(*[m[i] for m in mods])
    for m in range(m_count):
      others = [mods[o] for o in range(m_count) if o != m]
      scores = [t * np_mip(mods[m][i], *[o[j] for o, j in zip(others, idx)])
                for idx in itertools.product(range(b), repeat=m_count - 1)]
      out[i] += (np_lse(scores) - pos) / m_count
  return out


def ref_symile_sampled(mods, key, t):
  m_count, b = len(mods), len(mods[0])
  out = np.zeros(b)
  for m in range(m_count):
    key_m = jax.random.fold_in(key, m)
    perms = {o: np.asarray(jax.random.permutation(
        jax.random.fold_in(key_m, o), b)) for o in range(m_count) if o != m}
    for i in range(b):
      pos = t * np_mip(*[x[i] for x in mods])
      scores = [pos if j == i else t * np_mip(
          mods[m][i], *[mods[o][perms[o][j]] for o in perms])
                for j in range(b)]
      out[i] += (np_lse(scores) - pos) / m_count
  return out


def ref_alignment(x, y, alpha):
  return np.mean([np.linalg.norm(x[i] - y[i]) ** alpha for i in range(len(x))])


def ref_uniformity(x, t):
  b = len(x)
  vals = [math.exp(-t * np.sum((x[i] - x[j]) ** 2)) for i in range(b)
          for j in range(b) if i != j]
  return math.log(np.mean(vals))


# --------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------
def unit_rows(seed, *shape):
  return np_unit(np.random.default_rng(seed).normal(size=shape))


B, D = 5, 4
XR, YR, ZR = unit_rows(0, B, D), unit_rows(1, B, D), unit_rows(2, B, D)
NEGS = unit_rows(3, B, 2, D)
GA, GP, GN = unit_rows(4, B, 3), unit_rows(5, B, 3), unit_rows(6, B, 2, 3)
# A guide close to the model's own geometry masks some but not all candidates.
GA_NEAR = np_unit(XR[:, :3] + 0.1 * GA)
VIEWS = np.stack([XR, YR, ZR])
KEY = jax.random.key(7)


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------
# Hard-coded values.
# --------------------------------------------------------------------------
def test_clip_issue_value():
  # From the issue: symmetric CLIP, t = 10, mean over directions and batch.
  loss = J.clip_loss(X3, Y3, logit_scale=10.0)
  assert loss.shape == (3,)
  close(loss.mean(), 1.952045, 1e-6)


def test_siglip_issue_value():
  # From the issue: SigLIP, t = 10, b = -10, sum over pairs divided by B.
  loss = J.siglip_loss(X3, Y3, logit_scale=10.0, logit_bias=-10.0)
  close(loss.mean(), 3.165703, 1e-6)


def test_hand_values_on_one_hot_rows():
  eye2 = np.eye(2)
  # InfoNCE, t = 1, X = Y = I: logits I, loss = log(e + 1) - 1.
  close(J.infonce_loss(eye2, eye2, logit_scale=1.0),
        [math.log(math.e + 1) - 1] * 2)
  # DCL, t = 1, X = Y = I: negatives x0.x1 = 0 and x0.y1 = 0 -> log 2 - 1.
  close(J.dcl_loss(eye2, eye2, logit_scale=1.0), [math.log(2) - 1] * 2)
  # DHEL: each energy is a single e^0 -> loss = -1.
  close(J.dhel_loss(eye2, eye2, logit_scale=1.0), [-1.0, -1.0])
  # MV-DHEL, 3 identical views: -log(3 e) + 3 * 0.
  close(J.mv_dhel_loss(np.stack([eye2] * 3), logit_scale=1.0),
        [-1 - math.log(3)] * 2)
  # MV-InfoNCE, 2 identical views: numerator 2e; denominator per view
  # e (other view of i) + 1 + 1 (instance j in both views), twice.
  close(J.mv_infonce_loss(np.stack([eye2] * 2), logit_scale=1.0),
        [math.log(2 * math.e + 4) - math.log(2 * math.e)] * 2)
  # Symile, 3 modalities = I: per target, 1 positive e^t and 3 tuples e^0.
  close(J.symile_loss(eye2, eye2, eye2, logit_scale=1.0),
        [math.log(math.e + 3) - 1] * 2)


def test_mnrl_hand_values():
  anchors = np.array([[1.0, 0.0], [0.0, 1.0]])
  positives = np.array([[2.0, 0.0], [0.0, 3.0]])  # cosine normalises
  close(J.mnrl_loss(anchors, positives, scale=1.0),
        [math.log(math.e + 1) - 1] * 2)
  negatives = np.array([[[0.0, -1.0]], [[1.0, 1.0]]])  # [B=2, k=1, D=2]
  s = math.exp(math.sqrt(0.5))
  expected = [math.log(math.e + 1 + 1 + s) - 1,
              math.log(1 + math.e + math.exp(-1) + s) - 1]
  close(J.mnrl_loss(anchors, positives, negatives, scale=1.0), expected)


def test_gist_hand_values():
  a = np.array([[1.0, 0.0], [0.0, 1.0]])
  p = np.array([[0.6, 0.8], [0.8, 0.6]])
  # Guide = model: threshold a_i.p_i = 0.6. Dropped: ap[0,1] = ap[1,0] = 0.8,
  # aa/pp diagonals (1), pp off-diagonal (0.96). Kept: the positive 0.6 and
  # aa off-diagonal 0.
  close(J.gist_loss(a, p, a, p, temperature=1.0),
        [math.log(1 + math.exp(-0.6))] * 2)
  # A margin of -0.5 lifts the threshold to 1.1: nothing is dropped.
  row = [0.6, 0.8, 1.0, 0.0, 1.0, 0.96]
  close(J.gist_loss(a, p, a, p, temperature=1.0, margin=-0.5),
        [np_lse(row) - 0.6] * 2)


def test_monitors_hand_values():
  # ||x_i - y_i||^2 = 0.4, 0.8, 0.4.
  close(J.alignment(X3, Y3), 1.6 / 3)
  # Squared distances between rows of X3: 0.8, 2, 0.4 (each pair twice).
  expected = math.log((math.exp(-1.6) + math.exp(-4) + math.exp(-0.8)) / 3)
  close(J.uniformity(X3, t=2.0), expected)


# --------------------------------------------------------------------------
# NumPy references on random data.
# --------------------------------------------------------------------------
CASES = {
    "infonce": (lambda: J.infonce_loss(XR, YR, logit_scale=3.0),
                lambda: ref_infonce(XR, YR, 3.0)),
    "clip": (lambda: J.clip_loss(XR, YR, logit_scale=3.0),
             lambda: ref_clip(XR, YR, 3.0)),
    "siglip": (lambda: J.siglip_loss(XR, YR, logit_scale=3.0,
                                     logit_bias=-1.5),
               lambda: ref_siglip(XR, YR, 3.0, -1.5)),
    "mnrl": (lambda: J.mnrl_loss(2 * XR, YR, scale=20.0),
             lambda: ref_mnrl(XR, YR, None, 20.0)),
    "mnrl_negatives": (lambda: J.mnrl_loss(XR, 3 * YR, NEGS, scale=7.0),
                       lambda: ref_mnrl(XR, YR, NEGS, 7.0)),
    "gist": (lambda: J.gist_loss(XR, YR, GA_NEAR, GP, temperature=0.1),
             lambda: ref_gist(XR, YR, GA_NEAR, GP, None, None, 0.1, 0.0)),
    "gist_negatives_margin": (
        lambda: J.gist_loss(XR, YR, GA, GP, NEGS, GN, temperature=0.05,
                            margin=0.1),
        lambda: ref_gist(XR, YR, GA, GP, NEGS, GN, 0.05, 0.1)),
    "dcl": (lambda: J.dcl_loss(XR, YR, logit_scale=2.0),
            lambda: ref_dcl(XR, YR, 2.0)),
    "dhel": (lambda: J.dhel_loss(XR, YR, logit_scale=2.0),
             lambda: ref_dhel(XR, YR, 2.0)),
    "mv_infonce": (lambda: J.mv_infonce_loss(VIEWS, logit_scale=2.0),
                   lambda: ref_mv_infonce(VIEWS, 2.0)),
    "mv_dhel": (lambda: J.mv_dhel_loss(VIEWS, logit_scale=2.0),
                lambda: ref_mv_dhel(VIEWS, 2.0)),
    "symile3": (lambda: J.symile_loss(XR, YR, ZR, logit_scale=4.0),
                lambda: ref_symile([XR, YR, ZR], 4.0)),
    "symile4": (lambda: J.symile_loss(XR, YR, ZR, XR[::-1], logit_scale=4.0),
                lambda: ref_symile([XR, YR, ZR, XR[::-1]], 4.0)),
    "symile_sampled": (
        lambda: J.symile_sampled_loss(XR, YR, ZR, key=KEY, logit_scale=4.0),
        lambda: ref_symile_sampled([XR, YR, ZR], KEY, 4.0)),
    "alignment": (lambda: J.alignment(XR, YR, alpha=3.0),
                  lambda: ref_alignment(XR, YR, 3.0)),
    "uniformity": (lambda: J.uniformity(XR, t=1.5),
                   lambda: ref_uniformity(XR, 1.5)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_numpy_reference(name):
  ours, ref = CASES[name]
  out = ours()
  expected = ref()
  assert out.shape == np.shape(expected)
  close(out, expected)


def test_gist_guide_masks_something():
  # Guards the reference test above against a guide that masks nothing.
  ga, gp = np_unit(GA_NEAR), np_unit(GP)
  thresholds = np.sum(ga * gp, -1)[:, None]
  assert ((ga @ gp.T > thresholds) & ~np.eye(B, dtype=bool)).any()
  assert not (ga @ gp.T > thresholds).all()


# --------------------------------------------------------------------------
# Identities.
# --------------------------------------------------------------------------
def test_clip_is_mean_of_two_infonce_directions():
  close(J.clip_loss(XR, YR, logit_scale=5.0),
        0.5 * (J.infonce_loss(XR, YR, logit_scale=5.0)
               + J.infonce_loss(YR, XR, logit_scale=5.0)))


def test_mnrl_without_negatives_is_infonce_on_cosines():
  a, p = 3 * XR, 0.5 * YR  # unnormalised on purpose
  close(J.mnrl_loss(a, p, scale=20.0),
        J.infonce_loss(np_unit(a), np_unit(p), logit_scale=20.0))


def test_mv_dhel_with_two_views_is_dhel():
  close(J.mv_dhel_loss(np.stack([XR, YR]), logit_scale=3.0),
        J.dhel_loss(XR, YR, logit_scale=3.0))


def test_symile_with_two_modalities_is_clip():
  close(J.symile_loss(XR, YR, logit_scale=3.0),
        J.clip_loss(XR, YR, logit_scale=3.0))


def test_gist_mask_is_slicing():
  # Candidates the guide drops contribute exactly nothing: same loss as the
  # model scores with those columns sliced away.
  a, p = np_unit(XR), np_unit(YR)
  ga, gp = np_unit(GA_NEAR), np_unit(GP)
  thr = np.sum(ga * gp, -1)
  scores = np.concatenate([a @ p.T, a @ a.T, p @ p.T], 1) / 0.1
  drop = np.concatenate([(ga @ gp.T > thr[:, None]) & ~np.eye(B, dtype=bool),
                         ga @ ga.T > thr[:, None], gp @ gp.T > thr[:, None]], 1)
  expected = [np_lse(scores[i][~drop[i]]) - scores[i, i] for i in range(B)]
  close(J.gist_loss(XR, YR, GA_NEAR, GP, temperature=0.1), expected)


# --------------------------------------------------------------------------
# Matryoshka.
# --------------------------------------------------------------------------
def test_matryoshka_renormalises_each_truncation():
  def norms(x, y):  # "loss" that reports the norms it was given
    return jnp.linalg.norm(x, axis=-1) + 10 * jnp.linalg.norm(y, axis=-1)

  out = J.matryoshka_loss(norms, 3 * XR, YR, dims=(1, 2, 4),
                          weights=(1.0, 0.5, 0.25))
  close(out, np.full(B, 11 * 1.75))


def test_matryoshka_is_weighted_sum_of_truncated_losses():
  out = J.matryoshka_loss(C.clip_loss, XR, YR, dims=(2, 4), weights=(1.0, 0.5),
                          logit_scale=4.0)
  expected = (ref_clip(np_unit(XR[:, :2]), np_unit(YR[:, :2]), 4.0)
              + 0.5 * ref_clip(XR, YR, 4.0))
  close(out, expected)


def test_matryoshka_composes_with_negatives_and_guides():
  out = J.matryoshka_loss(C.mnrl_loss, XR, YR, NEGS, dims=(3,), scale=5.0)
  close(out, ref_mnrl(XR[:, :3], YR[:, :3], NEGS[..., :3], 5.0))
  # Guide embeddings go through kwargs and keep their full width.
  out = J.matryoshka_loss(C.gist_loss, XR, YR, dims=(2,), guide_anchors=GA,
                          guide_positives=GP, temperature=0.1)
  close(out, ref_gist(XR[:, :2], YR[:, :2], GA, GP, None, None, 0.1, 0.0))


def test_matryoshka_validates_dims_and_weights():
  with pytest.raises(ValueError, match=r"\[1, 4\]"):
    C.matryoshka_loss(C.clip_loss, XR, YR, dims=(8,), logit_scale=1.0)
  with pytest.raises(ValueError, match="one entry per dim"):
    C.matryoshka_loss(C.clip_loss, XR, YR, dims=(2, 4), weights=(1.0,),
                      logit_scale=1.0)


# --------------------------------------------------------------------------
# Gradients (float64), jit and vmap.
# --------------------------------------------------------------------------
GRAD_CASES = {
    "infonce": (lambda x, y: C.infonce_loss(x, y, logit_scale=3.0), 2),
    "clip": (lambda x, y, t: C.clip_loss(x, y, logit_scale=t), 3),
    "siglip": (lambda x, y, t, b: C.siglip_loss(x, y, logit_scale=t,
                                                logit_bias=b), 4),
    "mnrl": (lambda x, y, n: C.mnrl_loss(x, y, n, scale=5.0), 3),
    # Fresh copies: JAX caches the device copy of a NumPy constant, and one
    # made under enable_x64 would leak float64 into later float32 tests.
    "gist": (lambda x, y: C.gist_loss(x, y, GA_NEAR.copy(), GP.copy(),
                                      temperature=0.5), 2),
    "dcl": (lambda x, y: C.dcl_loss(x, y, logit_scale=2.0), 2),
    "dhel": (lambda x, y: C.dhel_loss(x, y, logit_scale=2.0), 2),
    "mv_infonce": (lambda v: C.mv_infonce_loss(v, logit_scale=2.0), 1),
    "mv_dhel": (lambda v: C.mv_dhel_loss(v, logit_scale=2.0), 1),
    "symile": (lambda x, y, z: C.symile_loss(x, y, z, logit_scale=2.0), 3),
    "symile_sampled": (lambda x, y, z: C.symile_sampled_loss(
        x, y, z, key=KEY, logit_scale=2.0), 3),
    "matryoshka": (lambda x, y: C.matryoshka_loss(
        C.clip_loss, x, y, dims=(2, 4), logit_scale=2.0), 2),
    "alignment": (lambda x, y: C.alignment(x, y, alpha=3.0), 2),
    "uniformity": (lambda x: C.uniformity(x, t=2.0), 1),
}


def grad_args(name, count):
  if name.startswith("mv_"):
    return (VIEWS,)
  if name == "mnrl":
    return (XR, YR, NEGS)
  scalars = {"siglip": (3.0, -1.0), "clip": (3.0,)}.get(name, ())
  arrays = (XR, YR, ZR)[:count - len(scalars)]
  return arrays + scalars


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradients_float64(name):
  fn, count = GRAD_CASES[name]
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(a, jnp.float64) for a in grad_args(name, count))
    out = jax.eval_shape(fn, *args)
    assert out.dtype == jnp.float64
    # Unequal weights so that a wrong per-example cotangent cannot cancel.
    weights = jnp.linspace(0.5, 1.5, B) if out.ndim else 1.0
    scalar = jax.jit(lambda *a: jnp.sum(fn(*a) * weights))
    check_grads(scalar, args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_vmap_matches_single_problems(name):
  fn, count = GRAD_CASES[name]
  args = tuple(jnp.asarray(a, jnp.float32) for a in grad_args(name, count))
  # Two independent problems stacked on a leading axis.
  second = tuple(a[::-1] if jnp.ndim(a) else a * 1.1 for a in args)
  stacked = tuple(jnp.stack([a, b]) for a, b in zip(args, second))
  batched = jax.jit(jax.vmap(fn))(*stacked)
  single = jax.jit(fn)
  close(batched[0], single(*args))
  close(batched[1], single(*second))


# --------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("call, pattern", [
    (lambda: C.clip_loss(XR[0], YR, logit_scale=1.0), r"\(4,\)"),
    (lambda: C.siglip_loss(XR, YR[:3], logit_scale=1.0, logit_bias=0.0),
     r"\(5, 4\) and \(3, 4\)"),
    (lambda: C.infonce_loss(XR[None], YR, logit_scale=1.0), r"\(1, 5, 4\)"),
    (lambda: C.mnrl_loss(XR, YR, NEGS[:, :, :2]), r"\(5, 2, 2\)"),
    (lambda: C.mnrl_loss(XR, YR, NEGS[0]), r"\(2, 4\)"),
    (lambda: C.gist_loss(XR, YR, GA[:3], GP[:3]), r"\(3, 3\)"),
    (lambda: C.gist_loss(XR, YR, GA, GP, NEGS), "guide_negatives"),
    (lambda: C.gist_loss(XR, YR, GA, GP, NEGS, GN[:, :1]), r"\(5, 1, 3\)"),
    (lambda: C.dhel_loss(XR[:1], YR[:1], logit_scale=1.0), r"\(1, 4\)"),
    (lambda: C.mv_dhel_loss(XR, logit_scale=1.0), r"\(5, 4\)"),
    (lambda: C.mv_infonce_loss(VIEWS[:1], logit_scale=1.0), r"\(1, 5, 4\)"),
    (lambda: C.symile_loss(XR, YR[:, :2], logit_scale=1.0), r"\(5, 2\)"),
    (lambda: C.symile_loss(XR, logit_scale=1.0), "at least 2"),
    (lambda: C.uniformity(XR[:1]), r"\(1, 4\)"),
])
def test_validation_names_the_bad_shape(call, pattern):
  with pytest.raises(ValueError, match=pattern):
    call()


def test_bfloat16_inputs_compute_in_float32():
  x, y = jnp.asarray(XR, jnp.bfloat16), jnp.asarray(YR, jnp.bfloat16)
  assert C.clip_loss(x, y, logit_scale=2.0).dtype == jnp.float32


def test_losses_compose_with_partial():
  loss_fn = functools.partial(C.siglip_loss, logit_scale=2.0, logit_bias=-1.0)
  close(J.matryoshka_loss(loss_fn, XR, YR, dims=(4,)),
        ref_siglip(XR, YR, 2.0, -1.0))
