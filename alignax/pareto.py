"""Pareto-front tools for multi-objective alignment.

Rewarded soups (Rame et al., 2023) fine-tune one policy per reward from a
shared initialisation and then interpolate their weights: every convex
combination ``sum_i w_i * theta_i`` is one policy, and sweeping the weights
traces an approximate Pareto front of the rewards without retraining. This
module holds the pieces of that recipe that need no model:

* :func:`soup`: the weighted sum of parameter pytrees (sharding-preserving);
* :func:`interpolation_weights`: the grid of weights to sweep;
* :func:`nondominated` and :func:`hypervolume`: the front of a set of reward
  vectors and the volume it dominates (every objective is maximized);
* :func:`write_front`, :func:`read_front` and :func:`plot_fronts`: JSONL
  records of evaluated points, one dict per policy, and their plot.

The ``pareto`` command (:func:`run`) builds up to three fronts on the
embedded multi-objective task (:class:`alignax.dpa.AttributeNames`), each
point a policy scored on held-out prompts by greedy decoding (the mean of
each objective's computed reward, or of an ArmoRM run's attribute heads
with ``pareto.reward_model``):

* ``soups``: :func:`soup` of the policies of ``pareto.soups`` (fine-tuned
  from one base, e.g. the single-objective variants of
  ``configs/multi_objective_demo.py``) at each of ``pareto.soup_steps``
  weights: no training;
* ``modpo``: one MODPO run per weight ``w`` of ``pareto.modpo_weights``
  (``preference.modpo_weights = (1 - w, w)``), trained by the command in
  ``workdir/modpo_w<w>`` (resumed when there);
* ``dpa``: the DPA policy of ``pareto.dpa`` prompted with each direction
  of ``dpa.eval_angles``: no training.

It writes ``front_<method>.jsonl``, ``fronts.png`` and ``pareto.json``
(each front's hypervolume against ``pareto.reference``)::

  python -m alignax.pareto --config=configs/multi_objective_demo.py:pareto \
      --workdir=/tmp/mo/pareto

References:
  Rame, Couairon, Shukor, Dancette, Gaya, Soulier & Cord, *Rewarded soups:
  towards Pareto-optimal alignment by interpolating weights fine-tuned on
  diverse rewards*, NeurIPS 2023.
  While, Hingston, Barone & Huband, *A faster algorithm for calculating
  hypervolume*, IEEE TEC 2006 (HSO, the slicing recursion).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alignax import cli
from alignax import dpa
from alignax import onpolicy
from alignax import train

_WEIGHT_TOL = 1e-6


# ----------------------------------------------------------------- fronts


def _as_points(points, name="points"):
  """``points`` as a finite float64 ``[N, M]`` array, else ValueError."""
  arr = np.asarray(points, dtype=np.float64)
  if arr.ndim != 2:
    raise ValueError(f"{name} must be 2-D [N, M], got shape {arr.shape}")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} must be finite, got NaN or inf")
  return arr


def _dominated(p):
  """Bool ``[N]``: row i is dominated by some row (maximization)."""
  out = np.zeros(len(p), bool)
  for start in range(0, len(p), 256):  # [chunk, N, M] keeps memory bounded
    q = p[start:start + 256, None, :]
    ge = np.all(p[None] >= q, axis=-1)
    gt = np.any(p[None] > q, axis=-1)
    out[start:start + 256] = np.any(ge & gt, axis=-1)
  return out


def nondominated(points) -> np.ndarray:
  """Mask of the Pareto-optimal points (every objective maximized).

  Point ``i`` is dominated when some point ``j`` is ``>=`` in every objective
  and ``>`` in at least one. Exact duplicates do not dominate each other, so
  every copy of an optimal point is kept.

  Args:
    points: array-like, shape ``[N, M]``, finite.

  Returns:
    bool array ``[N]``, True where no other point dominates.
  """
  return ~_dominated(_as_points(points))


def _hv2(p):
  """Area dominated by ``[N, 2]`` positive points above the origin."""
  order = np.lexsort((-p[:, 1], -p[:, 0]))  # x descending, then y descending
  x, y = p[order, 0], p[order, 1]
  ymax = np.maximum.accumulate(np.concatenate([[0.0], y[:-1]]))
  return float(np.sum(x * np.maximum(y - ymax, 0.0)))


def _hv(p):
  """Exact hypervolume of ``[N, M]`` positive points w.r.t. the origin."""
  if len(p) == 0:
    return 0.0
  m = p.shape[1]
  if m == 1:
    return float(p.max())
  if m == 2:
    return _hv2(p)
  p = p[~_dominated(p)]
  p = p[np.argsort(-p[:, -1], kind="stable")]  # slice along the last axis
  z = p[:, -1]
  total = 0.0
  for j in range(len(p)):
    below = z[j + 1] if j + 1 < len(p) else 0.0
    if z[j] > below:  # the slab (below, z[j]] holds the first j + 1 points
      total += (z[j] - below) * _hv(p[:j + 1, :-1])
  return total


def hypervolume(points, reference) -> float:
  """Exact hypervolume dominated by a point set (every objective maximized).

  The Lebesgue measure of the union of the boxes ``[reference, p]`` over the
  points ``p`` that exceed ``reference`` in every coordinate; the other points
  contribute nothing. ``M <= 2`` is a sort sweep, ``M >= 3`` the HSO slicing
  recursion (slabs along the last objective, each an ``M - 1`` problem):
  fine for a few hundred points and ``M <= 4``.

  Args:
    points: array-like, shape ``[N, M]`` (``N`` may be 0), finite.
    reference: array-like, shape ``[M]``, finite.

  Returns:
    the hypervolume, a float; 0.0 for an empty set.
  """
  p = _as_points(points)
  ref = np.asarray(reference, dtype=np.float64)
  if ref.shape != (p.shape[1],):
    raise ValueError(f"reference must have shape [M]=({p.shape[1]},) to match "
                     f"points {p.shape}, got {ref.shape}")
  if not np.all(np.isfinite(ref)):
    raise ValueError("reference must be finite, got NaN or inf")
  p = p[np.all(p > ref, axis=1)] - ref
  return _hv(p)


# ----------------------------------------------------------------- soups


def _check_weights(weights, n):
  w = np.asarray(weights, dtype=np.float64)
  if w.shape != (n,):
    raise ValueError(f"weights must have shape ({n},), one per tree, "
                     f"got {w.shape}")
  if not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueError(
        f"weights must be finite and non-negative, got {w.tolist()}")
  if abs(w.sum() - 1.0) > _WEIGHT_TOL:
    raise ValueError(f"weights must sum to 1 (within {_WEIGHT_TOL}), "
                     f"got sum {w.sum()!r}")
  return w


def _check_same_leaves(i, paths0, leaves0, paths, leaves):
  """ValueError naming the first leaf where tree ``i`` differs from tree 0."""
  for k in range(max(len(paths0), len(paths))):
    if k >= len(paths0) or k >= len(paths) or paths0[k] != paths[k]:
      where = jax.tree_util.keystr(paths[k] if k < len(paths) else paths0[k])
      raise ValueError(f"soup: trees[{i}] structure differs from trees[0] "
                       f"at leaf {where}")
    a, b = leaves0[k], leaves[k]
    if a.shape != b.shape or a.dtype != b.dtype:
      raise ValueError(
          f"soup: trees[{i}] leaf {jax.tree_util.keystr(paths[k])} is "
          f"{b.dtype}{list(b.shape)}, trees[0] has {a.dtype}{list(a.shape)}")


def _weighted_sum(weights, *leaf_lists):
  """``sum_i w_i * leaves_i`` leafwise, accumulated in >= float32."""
  out = []
  for leaves in zip(*leaf_lists):
    acc_dtype = jnp.promote_types(leaves[0].dtype, jnp.float32)
    w = weights.astype(acc_dtype)
    acc = sum(w[i] * x.astype(acc_dtype) for i, x in enumerate(leaves))
    out.append(acc.astype(leaves[0].dtype))
  return out


@jax.jit
def _all_equal(*leaf_lists):
  return [jnp.all(jnp.stack([jnp.all(x == leaves[0]) for x in leaves]))
          for leaves in zip(*leaf_lists)]


def soup(trees: Sequence[Any], weights: Sequence[float]) -> Any:
  r"""Rewarded soup: the weighted sum of parameter pytrees (Rame et al., 2023).

  .. math:: \theta = \sum_i w_i \theta_i, \quad w_i \ge 0, \ \sum_i w_i = 1

  Floating leaves are summed in float32 (float64 for float64 leaves) and cast
  back to their dtype, under ``jax.jit`` with the output sharded like
  ``trees[0]``'s leaves, so sharded parameters stay sharded and no full copy
  lands on one device. Integer, bool and PRNG-key leaves must be equal
  in every tree and are passed through from ``trees[0]``.

  Args:
    trees: parameter pytrees (nested dicts of arrays, ``nnx.State``, ...) with
      identical structure, leaf shapes and dtypes; at least one.
    weights: one non-negative weight per tree, summing to 1 (within 1e-6).

  Returns:
    a pytree of ``trees[0]``'s structure holding the interpolated parameters.
  """
  if len(trees) == 0:
    raise ValueError("trees must hold at least one pytree, got none")
  w = _check_weights(weights, len(trees))
  flat0, treedef = jax.tree_util.tree_flatten_with_path(trees[0])
  paths0 = [p for p, _ in flat0]
  as_array = lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x)
  columns = [[as_array(x) for _, x in flat0]]
  for i, tree in enumerate(trees[1:], 1):
    flat, treedef_i = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [as_array(x) for _, x in flat]
    _check_same_leaves(i, paths0, columns[0], [p for p, _ in flat], leaves)
    if treedef_i != treedef:
      raise ValueError(f"soup: trees[{i}] container types differ from "
                       f"trees[0]'s: {treedef_i} vs {treedef}")
    columns.append(leaves)
  exact = lambda x: jnp.issubdtype(x.dtype, jnp.inexact)
  floats = [k for k, x in enumerate(columns[0]) if exact(x)]
  ints = [k for k, x in enumerate(columns[0]) if not exact(x)]
  out = list(columns[0])
  if ints and len(trees) > 1:
    same = _all_equal(*[[c[k] for k in ints] for c in columns])
    for k, ok in zip(ints, same):
      if not bool(ok):
        where = jax.tree_util.keystr(paths0[k])
        raise ValueError(f"soup: non-float leaf {where} differs across trees;"
                         " only float leaves are mixed")
  if floats:
    shardings = [columns[0][k].sharding for k in floats]
    args = [[jax.device_put(c[k], s) if c[k].sharding != s else c[k]
             for k, s in zip(floats, shardings)] for c in columns]
    mixed = jax.jit(_weighted_sum, out_shardings=shardings)(
        jnp.asarray(w), *args)  # float64 weights where x64 is enabled
    for k, x in zip(floats, mixed):
      out[k] = x
  return jax.tree_util.tree_unflatten(treedef, out)


def interpolation_weights(num_policies: int,
                          steps: int) -> list[tuple[float, ...]]:
  """The weights a rewarded-soup sweep evaluates.

  For two policies, ``steps`` evenly spaced pairs ``(1 - l, l)`` with ``l``
  from 0 to 1 inclusive. For ``K > 2``, every ``K``-tuple on the simplex
  lattice ``{a / (steps - 1) : a_i >= 0 integers, sum a = steps - 1}``, from
  ``(1, 0, ..., 0)`` to ``(0, ..., 0, 1)``: ``C(steps + K - 2, K - 1)`` tuples.

  Args:
    num_policies: ``K >= 2``, the number of fine-tuned policies.
    steps: ``>= 2``, points per edge of the simplex (both ends included).

  Returns:
    a list of ``K``-tuples of floats, each non-negative and summing to 1.
  """
  for name, v in (("num_policies", num_policies), ("steps", steps)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 2:
      raise ValueError(f"{name} must be an integer >= 2, got {v!r}")
  n = int(steps) - 1

  def compositions(total, parts):
    if parts == 1:
      yield (total,)
      return
    for first in range(total, -1, -1):
      for rest in compositions(total - first, parts - 1):
        yield (first,) + rest

  return [tuple(a / n for a in c) for c in compositions(n, int(num_policies))]


# ----------------------------------------------------------------- records


def _jsonable(x):
  if isinstance(x, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"not JSON serializable: {type(x).__name__}")


def write_front(path, points: Sequence[dict]) -> str:
  """Writes evaluated points as JSONL, one dict per line, atomically.

  Args:
    path: the ``.jsonl`` file; its parent directories are created.
    points: dicts, e.g. ``{"weights": [...], "rewards": {name: value},
      "label": "l=0.5"}``; NumPy and JAX scalars become numbers.

  Returns:
    ``path``.
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for point in points:
      if not isinstance(point, Mapping):
        raise ValueError(f"points must be dicts, got {type(point).__name__}")
      f.write(json.dumps(dict(point), default=_jsonable) + "\n")
  os.replace(tmp, path)
  return path


def read_front(path) -> list[dict]:
  """The dicts :func:`write_front` wrote to ``path``, in order."""
  with open(os.fspath(path)) as f:
    return [json.loads(line) for line in f if line.strip()]


def _rewards_xy(name, points, objectives):
  """``[N, 2]`` rewards of the two objectives, else a ValueError."""
  rows = []
  for i, point in enumerate(points):
    rewards = point.get("rewards", {})
    missing = [o for o in objectives if o not in rewards]
    if missing:
      raise ValueError(f"fronts[{name!r}][{i}]['rewards'] lacks objective "
                       f"{missing[0]!r}")
    rows.append([float(rewards[o]) for o in objectives])
  return np.asarray(rows, np.float64).reshape(-1, 2)


def plot_fronts(path, fronts: Mapping[str, Sequence[dict]],
                objectives: tuple[str, str], *, reference=None,
                title: str = "") -> str:
  """Plots the fronts of several methods on two objectives, as a PNG.

  One marker-and-line series per method (points sorted by the x objective),
  each point's optional ``"label"`` written small beside it, and the method's
  hypervolume w.r.t. ``reference`` in the legend. Needs matplotlib (the
  ``notebooks`` extra); uses the Agg backend.

  Args:
    path: the PNG file; its parent directories are created.
    fronts: method name -> point dicts with ``"rewards": {objective: value}``.
    objectives: the (x, y) objective names.
    reference: the hypervolume reference point ``[2]``; None = ``(0, 0)``.
    title: the axes title.

  Returns:
    ``path``.
  """
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError("plot_fronts needs matplotlib: "
                      "pip install alignax[notebooks]") from None
  if (not isinstance(objectives, (tuple, list)) or len(objectives) != 2
      or not all(isinstance(o, str) for o in objectives)):
    raise ValueError(f"objectives must be two names (x, y), got {objectives!r}")
  ref = np.zeros(2) if reference is None else reference
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig, ax = plt.subplots(figsize=(6, 4.5))
  try:
    for name, points in fronts.items():
      xy = _rewards_xy(name, points, objectives)
      order = np.argsort(xy[:, 0], kind="stable")
      hv = hypervolume(xy, ref)
      ax.plot(xy[order, 0], xy[order, 1], marker="o", label=f"{name} "
              f"(HV={hv:.4g})")
      for k in order:
        if points[k].get("label") is not None:
          ax.annotate(str(points[k]["label"]), xy[k], fontsize=7,
                      xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(objectives[0])
    ax.set_ylabel(objectives[1])
    if title:
      ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)
  finally:
    plt.close(fig)
  return path


# --- the pareto command --------------------------------------------------------

FRONT_FILE = "front_{}.jsonl"
PLOT_FILE = "fronts.png"
SUMMARY_FILE = "pareto.json"


class _Evaluator:
  """Greedy held-out rewards of policies: each objective's mean over the
  held-out prompts, computed by the task or predicted by a multi-objective
  reward model (``pareto.reward_model``)."""

  def __init__(self, config, workdir):
    self.config = config
    p = config.pareto
    self.objectives = tuple(p.objectives)
    self.base = dpa.AttributeNames(self.objectives,
                                   config.data.heldout_fraction)
    self.sampler = onpolicy._Policy(config, workdir)  # pylint: disable=protected-access
    self.prompts = self.base.prompts("eval", config.onpolicy.eval_prompts,
                                     seed=0)
    self.scorer = (dpa.MultiRewardScorer(
        config, p.reward_model, self.sampler.tokenizer, self.objectives,
        mesh=self.sampler.mesh) if p.reward_model else None)

  def _kw(self):
    return dict(max_prompt_len=self.config.data.preference.max_prompt_len,
                max_new_tokens=self.config.onpolicy.max_new_tokens,
                mesh=self.sampler.mesh)

  def _rewards(self, prompts, records):
    if self.scorer is None:
      values = np.array([r["scores"][0] for r in records])
    else:
      values = self.scorer.attribute_rewards(
          [p.text for p in prompts], [r["responses"][0] for r in records])
    return dict(zip(self.objectives, values.mean(0).round(5).tolist()))

  def plain(self, params) -> dict:
    """Rewards of the plain (unconditioned) held-out prompts."""
    records = onpolicy.sample_records(
        self.sampler.graphdef, params, self.sampler.tokenizer, self.prompts,
        self.base, k=1, rng=jax.random.key(0), temperature=0.0, **self._kw())
    return {"rewards": self._rewards(self.prompts, records),
            "samples": [r["responses"][0] for r in records[:4]]}

  def directional(self, params, angles) -> list[dict]:
    """Rewards of the prompts conditioned on each DPA direction."""
    task = dpa.DirectionalTask(self.base)
    points = []
    for angle in angles:
      prompts = [task.prompt(p, dpa.direction(angle))
                 for p in self.prompts]
      records = onpolicy.sample_records(
          self.sampler.graphdef, params, self.sampler.tokenizer, prompts,
          self.base, k=1, rng=jax.random.key(0), temperature=0.0,
          **self._kw())
      points.append({"angle": float(angle),
                     "rewards": self._rewards(prompts, records),
                     "samples": [r["responses"][0] for r in records[:4]]})
    return points


def policy_dir(path: str) -> str:
  """A run directory, or the last round of an on-policy / DPA workdir."""
  rounds = [n for n in os.listdir(path) if n.startswith("round_")
            and n[len("round_"):].isdigit()] if os.path.isdir(path) else []
  if not rounds:
    return path
  return os.path.join(path, max(rounds, key=lambda n: int(n[6:])))


def soups_front(ev: _Evaluator, policies: Sequence[str], steps: int):
  """Rewarded soups: each interpolation of ``policies``' parameters (run
  directories or the last rounds of DPA / on-policy workdirs)."""
  trees = [ev.sampler.params(policy_dir(path)) for path in policies]
  points = []
  for weights in interpolation_weights(len(trees), steps):
    point = ev.plain(soup(trees, weights))
    points.append(dict(point, method="soups", weights=list(weights),
                       label=f"{weights[-1]:.2f}"))
  return points


def modpo_front(ev: _Evaluator, workdir: str, weights: Sequence[float]):
  """One MODPO run per weight ``w`` (``modpo_weights = (1 - w, w)``, trained
  here or resumed), each evaluated on the plain prompts."""
  points = []
  for w in weights:
    if not 0 < w < 1:
      raise ValueError(f"config.pareto.modpo_weights: {w} must lie in (0, 1) "
                       "(MODPO divides by the first weight, 1 - w)")
    c = copy.deepcopy(ev.config)
    c.objective = "modpo"
    c.preference.modpo_weights = (1.0 - w, w)
    trainer, _ = train.run(c, os.path.join(workdir, f"modpo_w{w:g}"))
    point = ev.plain(trainer.state.params)
    points.append(dict(point, method="modpo", weights=[1.0 - w, w],
                       label=f"{w:g}"))
  return points


def dpa_front(ev: _Evaluator, run_dir: str, angles: Sequence[float]):
  """The DPA policy of ``run_dir``, one point per direction."""
  points = ev.directional(ev.sampler.params(policy_dir(run_dir)), angles)
  return [dict(p, method="dpa", label=f"{p['angle']:g}") for p in points]


def run(config, workdir: str) -> dict[str, dict]:
  """Builds each configured front; writes them, the plot and a summary.

  ``pareto.soups`` (policy directories; empty = no soups front),
  ``pareto.modpo_weights`` (empty = no MODPO front) and ``pareto.dpa`` (a
  DPA run; empty = none). Returns ``{method: {"hypervolume", "points",
  "nondominated"}}``, also written to ``workdir/pareto.json``.
  """
  p = config.pareto
  if len(p.reference) != len(p.objectives):
    raise ValueError(f"config.pareto.reference={tuple(p.reference)} needs one "
                     f"value per objective {tuple(p.objectives)}")
  if not config.tokenizer.cache_dir:
    config.tokenizer.cache_dir = os.path.join(workdir, "tokenizer")
  ev = _Evaluator(config, workdir)
  fronts = {}
  if p.soups:
    fronts["soups"] = soups_front(ev, tuple(p.soups), int(p.soup_steps))
  if p.modpo_weights:
    fronts["modpo"] = modpo_front(ev, workdir, tuple(p.modpo_weights))
  if p.dpa:
    fronts["dpa"] = dpa_front(ev, p.dpa, tuple(config.dpa.eval_angles))
  if not fronts:
    raise ValueError("config.pareto: set soups, modpo_weights or dpa")
  summary = {}
  for method, points in fronts.items():
    xy = [[q["rewards"][o] for o in ev.objectives] for q in points]
    summary[method] = {
        "hypervolume": hypervolume(xy, tuple(p.reference)),
        "points": len(points),
        "nondominated": int(nondominated(xy).sum())}
    if jax.process_index() == 0:
      write_front(os.path.join(workdir, FRONT_FILE.format(method)), points)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
      json.dump(summary, f, indent=2)
    try:
      plot_fronts(os.path.join(workdir, PLOT_FILE), fronts, ev.objectives[:2],
                  reference=tuple(p.reference)[:2],
                  title="held-out greedy rewards")
    except ImportError as exc:  # matplotlib is the notebooks extra
      print(f"no plot: {exc}")
  return summary, fronts


def _print_fronts(config, workdir):
  summary, fronts = run(config, workdir)
  for method, points in fronts.items():
    for q in points:
      print(json.dumps({"method": method, "label": q["label"],
                        "rewards": q["rewards"], "samples": q["samples"]}))
  print(json.dumps(summary))


if __name__ == "__main__":
  cli.config_command(_print_fronts, "Root of the fronts (and the MODPO runs).")
