"""Pareto tools: fronts, exact hypervolume, rewarded soups, records, plots."""

import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alignax import pareto
from alignax.models import ModelConfig, Transformer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------ references


def hv_inclusion_exclusion(points, ref):
  """Union volume of the boxes [ref, p] by inclusion-exclusion (N <= ~10)."""
  p = np.asarray(points, np.float64)
  ref = np.asarray(ref, np.float64)
  total = 0.0
  for r in range(1, len(p) + 1):
    for subset in itertools.combinations(range(len(p)), r):
      side = np.maximum(p[list(subset)].min(axis=0) - ref, 0.0)
      total += (-1) ** (r + 1) * np.prod(side)
  return total


def nondominated_brute(points):
  p = np.asarray(points, np.float64)
  keep = np.ones(len(p), bool)
  for i in range(len(p)):
    for j in range(len(p)):
      if np.all(p[j] >= p[i]) and np.any(p[j] > p[i]):
        keep[i] = False
  return keep


# ------------------------------------------------------------ hypervolume


def test_hypervolume_hand_values_2d():
  # Staircase (1,3),(2,2),(3,1): 3*1 + 2*1 + 1*1 = 6.
  assert pareto.hypervolume([(1, 3), (2, 2), (3, 1)], (0, 0)) == 6.0
  assert pareto.hypervolume([(2, 3)], (0, 0)) == 6.0
  # (1, 1) is dominated by (2, 2): nothing added.
  assert pareto.hypervolume([(1, 3), (2, 2), (3, 1), (1, 1)], (0, 0)) == 6.0
  # Points not strictly beyond the reference in every coordinate add 0.
  assert pareto.hypervolume([(2, 3), (5, 0), (-1, 9), (0, 0)], (0, 0)) == 6.0
  # A shifted reference: boxes [(1,1),(2,3)] and [(1,1),(3,2)], overlap 1*1.
  assert pareto.hypervolume([(2, 3), (3, 2)], (1, 1)) == 2 + 2 - 1
  assert pareto.hypervolume(np.zeros((0, 2)), (0, 0)) == 0.0
  assert pareto.hypervolume([(3,), (5,), (-1,)], (1,)) == 4.0


def test_hypervolume_hand_values_3d():
  # Boxes of (2,1,1), (1,2,1), (1,1,2) have volume 2 each; every pairwise and
  # the triple intersection is the unit cube (componentwise min = (1,1,1)):
  # union = 3*2 - 3*1 + 1 = 4.
  pts = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]
  assert pareto.hypervolume(pts, (0, 0, 0)) == 4.0
  # Adding (1,1,1) (dominated) and a duplicate changes nothing; adding
  # (2,2,2) covers all: 8.
  assert pareto.hypervolume(pts + [(1, 1, 1), (2, 1, 1)], (0, 0, 0)) == 4.0
  assert pareto.hypervolume(pts + [(2, 2, 2)], (0, 0, 0)) == 8.0
  # 4-D: (2,1,1,1) and (1,1,1,3): 2 + 3 - 1 (the unit hypercube) = 4.
  assert pareto.hypervolume([(2, 1, 1, 1), (1, 1, 1, 3)], np.zeros(4)) == 4.0


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hypervolume_matches_inclusion_exclusion(m, seed):
  rng = np.random.default_rng(seed * 10 + m)
  n = int(rng.integers(1, 9))
  ref = rng.normal(size=m)
  pts = ref + rng.uniform(-0.3, 1.0, size=(n, m))  # some not beyond ref
  got = pareto.hypervolume(pts, ref)
  assert got == pytest.approx(hv_inclusion_exclusion(pts, ref), rel=1e-12,
                              abs=1e-12)
  # Ties and duplicates (integer grid) exercise equal slice heights.
  grid = rng.integers(0, 4, size=(8, m)).astype(float)
  assert pareto.hypervolume(grid, np.zeros(m)) == pytest.approx(
      hv_inclusion_exclusion(grid, np.zeros(m)), abs=1e-12)


def test_hypervolume_a_few_hundred_points_in_3d_and_4d():
  # Points on the positive unit sphere are mutually non-dominated (the hard
  # case for HSO); the volume is bounded by the unit box and grows with N.
  rng = np.random.default_rng(0)
  for m, n in ((3, 300), (4, 60)):
    pts = np.abs(rng.normal(size=(n, m)))
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    small = pareto.hypervolume(pts[:n // 2], np.zeros(m))
    big = pareto.hypervolume(pts, np.zeros(m))
    assert 0 < small < big < 1


def test_hypervolume_validation():
  with pytest.raises(ValueError, match="points must be 2-D"):
    pareto.hypervolume([1, 2], (0, 0))
  with pytest.raises(ValueError, match="reference must have shape"):
    pareto.hypervolume([(1, 2)], (0, 0, 0))
  with pytest.raises(ValueError, match="points must be finite"):
    pareto.hypervolume([(1, np.nan)], (0, 0))
  with pytest.raises(ValueError, match="reference must be finite"):
    pareto.hypervolume([(1, 2)], (0, np.inf))


# ------------------------------------------------------------ nondominated


def test_nondominated_hand_example():
  pts = [(1, 3), (2, 2), (3, 1), (1, 1), (2, 2), (0, 3), (3, 0), (0, 4)]
  # (1,1) < (2,2); (0,3) < (1,3); (3,0) < (3,1); the duplicate (2,2) stays.
  want = [True, True, True, False, True, False, False, True]
  np.testing.assert_array_equal(pareto.nondominated(pts), want)
  assert pareto.nondominated(np.zeros((0, 3))).shape == (0,)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_nondominated_matches_brute_force(m):
  rng = np.random.default_rng(m)
  for pts in (rng.normal(size=(60, m)), rng.integers(0, 3, size=(40, m))):
    got = pareto.nondominated(pts)
    np.testing.assert_array_equal(got, nondominated_brute(pts))
    assert got.dtype == bool and got.any()


def test_nondominated_validation():
  with pytest.raises(ValueError, match="points must be 2-D"):
    pareto.nondominated(np.zeros((2, 2, 2)))
  with pytest.raises(ValueError, match="points must be finite"):
    pareto.nondominated([(0, np.inf)])


# ------------------------------------------------------------ soup


def _pair(dtype):
  k = jax.random.split(jax.random.key(0), 4)
  a = {"enc": {"w": jax.random.normal(k[0], (4, 3), dtype)},
       "b": jax.random.normal(k[1], (3,), dtype), "step": jnp.array(7)}
  b = {"enc": {"w": jax.random.normal(k[2], (4, 3), dtype)},
       "b": jax.random.normal(k[3], (3,), dtype), "step": jnp.array(7)}
  return a, b


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_soup_is_the_interpolation(dtype):
  a, b = _pair(dtype)
  for lam in (0.0, 0.3, 1.0):
    out = pareto.soup([a, b], [1 - lam, lam])
    for key in (("enc", "w"), ("b",)):
      x, y, got = a, b, out
      for k in key:
        x, y, got = x[k], y[k], got[k]
      want = ((1 - lam) * x.astype(jnp.float32)
              + lam * y.astype(jnp.float32)).astype(dtype)
      assert got.dtype == dtype and got.shape == x.shape
      # One float32 rounding (FMA) apart at most, then the cast to ``dtype``.
      tol = 1e-6 if dtype == jnp.float32 else 2.0 ** -8
      np.testing.assert_allclose(np.asarray(got, np.float32),
                                 np.asarray(want, np.float32), rtol=tol,
                                 atol=tol)
    assert out["step"].dtype == a["step"].dtype and int(out["step"]) == 7
  np.testing.assert_array_equal(
      np.asarray(pareto.soup([a, b], [1.0, 0.0])["b"], np.float32),
      np.asarray(a["b"], np.float32))


def test_soup_three_trees_and_numpy_leaves():
  trees = [{"w": np.full((2,), v, np.float32)} for v in (1.0, 2.0, 4.0)]
  out = pareto.soup(trees, [0.5, 0.25, 0.25])
  np.testing.assert_allclose(np.asarray(out["w"]), [2.0, 2.0])


def test_soup_validation_names_the_leaf():
  a, b = _pair(jnp.float32)
  with pytest.raises(ValueError, match="must sum to 1"):
    pareto.soup([a, b], [0.5, 0.6])
  with pytest.raises(ValueError, match="non-negative"):
    pareto.soup([a, b], [1.5, -0.5])
  with pytest.raises(ValueError, match=r"shape \(2,\)"):
    pareto.soup([a, b], [1.0])
  with pytest.raises(ValueError, match="at least one"):
    pareto.soup([], [])
  bad = dict(b, enc={"w": jnp.zeros((4, 4))})
  with pytest.raises(ValueError, match=re.escape("['enc']['w']")):
    pareto.soup([a, bad], [0.5, 0.5])
  bad = dict(b, b=b["b"].astype(jnp.bfloat16))
  with pytest.raises(ValueError, match=re.escape("leaf ['b'] is bfloat16")):
    pareto.soup([a, bad], [0.5, 0.5])
  bad = {"b": b["b"], "enc": {"v": b["enc"]["w"]}, "step": b["step"]}
  with pytest.raises(ValueError,
                     match=re.escape("structure differs") + ".*" +
                     re.escape("['enc']['v']")):
    pareto.soup([a, bad], [0.5, 0.5])
  bad = dict(b, step=jnp.array(8))
  with pytest.raises(ValueError, match=re.escape("non-float leaf ['step']")):
    pareto.soup([a, bad], [0.5, 0.5])


def test_soup_keeps_the_sharding_of_8_device_leaves():
  assert len(jax.devices()) >= 8, "conftest forces 8 CPU devices"
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  specs = {"w": P("data", "model"), "v": P(None, "model"), "r": P()}
  shapes = {"w": (8, 4), "v": (3, 6), "r": (5,)}
  rng = np.random.default_rng(0)
  host = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
          for _ in range(2)]
  trees = [{k: jax.device_put(t[k], NamedSharding(mesh, specs[k])) for k in t}
           for t in host]
  out = pareto.soup(trees, [0.25, 0.75])
  for k in shapes:
    assert out[k].sharding == trees[0][k].sharding, k
    np.testing.assert_allclose(np.asarray(out[k]),
                               0.25 * host[0][k] + 0.75 * host[1][k],
                               rtol=1e-6, atol=1e-6)


def test_soup_of_transformer_params():
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                    n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=16)
  graphdef, p0 = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  _, p1 = nnx.split(Transformer(cfg, rngs=nnx.Rngs(1)))
  first = pareto.soup([p0, p1], (1.0, 0.0))
  mean = pareto.soup([p0, p1], (0.5, 0.5))
  assert isinstance(mean, nnx.State)
  leaves0, leaves1 = jax.tree.leaves(p0), jax.tree.leaves(p1)
  assert any(not np.array_equal(x, y) for x, y in zip(leaves0, leaves1))
  for x, y, f, m in zip(leaves0, leaves1, jax.tree.leaves(first),
                        jax.tree.leaves(mean)):
    assert f.dtype == x.dtype and m.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(f), np.asarray(x))
    np.testing.assert_allclose(np.asarray(m, np.float32),
                               (np.asarray(x, np.float32)
                                + np.asarray(y, np.float32)) / 2, rtol=1e-6,
                               atol=1e-7)
  assert isinstance(nnx.merge(graphdef, mean), Transformer)


# ------------------------------------------------------------ weights


def test_interpolation_weights():
  assert pareto.interpolation_weights(2, 5) == [
      (1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0)]
  assert pareto.interpolation_weights(2, 2) == [(1.0, 0.0), (0.0, 1.0)]
  assert pareto.interpolation_weights(3, 3) == [
      (1.0, 0.0, 0.0), (0.5, 0.5, 0.0), (0.5, 0.0, 0.5), (0.0, 1.0, 0.0),
      (0.0, 0.5, 0.5), (0.0, 0.0, 1.0)]
  w = pareto.interpolation_weights(3, 5)
  assert len(w) == math.comb(5 + 3 - 2, 3 - 1) == len(set(w))
  assert all(len(t) == 3 and min(t) >= 0 and abs(sum(t) - 1) < 1e-12
             for t in w)
  assert all(x * 4 == round(x * 4) for t in w for x in t)
  for bad in ((1, 3), (2, 1), (2.0, 3), (3, True)):
    with pytest.raises(ValueError, match="must be an integer >= 2"):
      pareto.interpolation_weights(*bad)


# ------------------------------------------------------------ records, plots


def _front(rewards, name):
  return [{"weights": [1 - l, l], "rewards": {"help": h, "harm": s},
           "label": f"{name} l={l:g}"}
          for l, (h, s) in zip(np.linspace(0, 1, len(rewards)), rewards)]


def test_write_read_round_trip(tmp_path):
  points = _front([(0.1, 0.9), (0.5, 0.6), (0.8, 0.2)], "rs")
  points[0]["rewards"]["help"] = np.float32(0.25)  # NumPy scalars serialize
  path = str(tmp_path / "nested" / "dir" / "front.jsonl")
  assert pareto.write_front(path, points) == path
  back = pareto.read_front(path)
  assert len(back) == 3 and back[1] == points[1]
  assert back[0]["rewards"]["help"] == 0.25
  assert open(path).read().count("\n") == 3
  assert not (tmp_path / "nested" / "dir" / "front.jsonl.tmp").exists()
  pareto.write_front(path, points[:1])  # overwrites atomically
  assert len(pareto.read_front(path)) == 1


def test_plot_fronts_writes_a_png(tmp_path):
  pytest.importorskip("matplotlib")
  fronts = {"soup": _front([(0.1, 0.9), (0.5, 0.6), (0.8, 0.2)], "rs"),
            "morlhf": _front([(0.7, 0.1), (0.2, 0.7)], "m")}
  path = str(tmp_path / "plots" / "front.png")
  got = pareto.plot_fronts(path, fronts, ("help", "harm"), title="t",
                           reference=(0.0, 0.0))
  assert got == path
  data = open(path, "rb").read()
  assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
  with pytest.raises(ValueError, match="lacks objective 'safety'"):
    pareto.plot_fronts(path, fronts, ("help", "safety"))


def test_plot_fronts_without_matplotlib(tmp_path, monkeypatch):
  monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
  with pytest.raises(ImportError, match=re.escape(
      "pip install alignax[notebooks]")):
    pareto.plot_fronts(str(tmp_path / "x.png"), {}, ("a", "b"))
