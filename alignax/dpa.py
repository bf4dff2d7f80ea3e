"""Directional Preference Alignment: one policy steered by a reward direction.

A user's preference is a unit vector :math:`v` in the space of M rewards
(``dpa.objectives``), written into the prompt by a template
(:func:`conditioned`)::

  # maximize 0.87 similarity + 0.50 length
  # Return the tag of the element.
  def

The policy is trained on :math:`v`-conditioned data by rejection-sampling
fine-tuning rounds (the paper's iterative RSF), on the on-policy machinery
of :mod:`alignax.onpolicy`. Round ``r``:

1. every training prompt gets a direction :math:`v = (\\cos\\theta,
   \\sin\\theta)` with :math:`\\theta` uniform in ``dpa.angles`` (degrees;
   M = 2) or drawn from the grid ``dpa.train_angles``, and the policy
   samples ``K = data.preference.list_size`` responses to the conditioned
   prompt;
2. each response gets its M rewards, either computed by the task
   (:class:`AttributeNames`: the embedded task's attributes) or predicted by
   a multi-objective reward model's attribute heads (``dpa.reward_model``:
   an ArmoRM stage-1 or stage-2 run, :class:`MultiRewardScorer`), and is
   ranked by :math:`v^\\top r` (``dpa.normalize``: each objective
   standardised over the round's samples first);
3. the policy is fine-tuned on the best response of each prompt
   (``preference.loss_type='sft'``: the chosen NLL, i.e. RSF), or with DPO on
   the best-vs-worst :math:`v`-ranked pairs (``loss_type='sigmoid'``).

After the rounds the final policy is evaluated on held-out prompts for each
direction of ``dpa.eval_angles`` by greedy decoding: the mean of each
objective's reward (:func:`evaluate_directions`), written to
``workdir/dpa_directions.jsonl``. As :math:`v` rotates from the first
objective to the second, the held-out rewards should move along it: that is
the paper's arithmetic control. ``alignax.pareto`` turns those points into a
front and its hypervolume::

  python launch/tpu_train.py --config=configs/ul2_demo.py --workdir=/tmp/alignax_demo
  python -m alignax.dpa --config=configs/multi_objective_demo.py:dpa \\
      --workdir=/tmp/alignax_dpa

``dpa.condition=False`` drops the template and ``dpa.angles=(a, a)`` fixes
the direction: that trains a single-objective policy (rewarded soups
interpolate two of those).

References:
  Wang, Lin, Xiong, Yang, Yang, Gao, Zhang, Zhang & Zhang, *Arithmetic
  Control of LLMs for Diverse User Preferences: Directional Preference
  Alignment with Multi-Objective Rewards*, ACL 2024 (arXiv 2402.18571).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from alignax import cli
from alignax import init_from
from alignax import onpolicy
from alignax import sharding as shd
from alignax import state as state_lib
from alignax.data import attribute_task
from alignax.data import preference_task
from alignax.objectives import multi_reward as mr_objective

DIRECTIONS_FILE = "dpa_directions.jsonl"
_TEMPLATE_RE = re.compile(r"# maximize (.*)\n")


def direction(angle_deg: float) -> np.ndarray:
  """The unit vector ``(cos, sin)`` of ``angle_deg`` degrees (M = 2)."""
  a = np.deg2rad(float(angle_deg))
  return np.array([np.cos(a), np.sin(a)])


def conditioned(text: str, v: Sequence[float],
                objectives: Sequence[str]) -> str:
  """``text`` behind the DPA line ``# maximize 0.87 correctness + ...``."""
  if len(v) != len(objectives):
    raise ValueError(f"direction {tuple(v)} has {len(v)} entries for "
                     f"{len(objectives)} objectives {tuple(objectives)}.")
  terms = " + ".join(f"{w:.2f} {name}" for w, name in zip(v, objectives))
  return f"# maximize {terms}\n{text}"


def parse_direction(text: str, objectives: Sequence[str]) -> np.ndarray:
  """The direction a :func:`conditioned` prompt carries."""
  match = _TEMPLATE_RE.match(text)
  if match is None:
    raise ValueError(f"prompt {text[:40]!r} has no '# maximize' line.")
  weights = {}
  for term in match.group(1).split(" + "):
    w, name = term.split(" ", 1)
    weights[name] = float(w)
  return np.array([weights[name] for name in objectives])


OBJECTIVES = attribute_task.ATTRIBUTES + ("similarity",)


class AttributeNames:
  """The embedded docstring -> name task with M computed rewards.

  Prompts and the held-out split are :class:`alignax.onpolicy.DocstringTask`'s;
  a response (``name(``) gets, against the true name, the attributes of
  :mod:`alignax.data.attribute_task` (``correctness``: word F1, ``brevity``,
  ``style``, ``length``: characters / 32) or ``similarity`` (the on-policy
  task's ``difflib`` ratio, a denser signal than word F1 for a small model)
  named by ``objectives``.
  """

  stop_strings = onpolicy.DocstringTask.stop_strings

  def __init__(self, objectives: Sequence[str] = ("similarity", "length"),
               heldout_fraction: float = 0.02):
    unknown = set(objectives) - set(OBJECTIVES)
    if unknown or not objectives:
      raise ValueError(f"dpa.objectives={tuple(objectives)}: each must be one "
                       f"of {OBJECTIVES}")
    self.objectives = tuple(objectives)
    self._names = onpolicy.DocstringTask(heldout_fraction)
    self._fraction = heldout_fraction

  def prompts(self, split: str, n: int, *, seed: int):
    return self._names.prompts(split, n, seed=seed)

  def clean(self, text: str) -> str:
    return self._names.clean(text)

  def rewards(self, target: str, response: str) -> np.ndarray:
    """``[M]`` rewards of ``response`` (``name(``) for the true ``target``."""
    name = response.removesuffix("(")
    attrs = attribute_task.attributes(target, name)
    attrs["similarity"] = preference_task.similarity(target, name)
    return np.array([attrs[a] for a in self.objectives])

  def reward(self, prompt, response: str) -> list[float]:
    """The M rewards as a list (records store them as ``scores``); the
    prompt's target is the true name, or ``(name, direction)``."""
    target = prompt.target
    target = target[0] if isinstance(target, tuple) else target
    return self.rewards(target, response).tolist()

  def candidates(self, split: str):
    """``(prompt, true name, [candidate name])`` of each of ``split``'s
    functions: the attribute task's five candidates."""
    source = attribute_task.AttributeNames(
        split, "pairs", repeats=1, heldout_fraction=self._fraction)
    for i in range(len(source)):
      prompt, name, scored = source.candidates(i)
      yield prompt, name, [c for c, _ in scored]


class DirectionalTask:
  """DPA's training task: each prompt carries a direction, reward = v.r.

  Args:
    base: the multi-reward task (:class:`AttributeNames`).
    angles: ``(low, high)`` degrees; directions are drawn uniformly between.
    condition: write the direction into the prompt (False: a single-
      objective policy trained on the fixed direction of ``angles``).
    grid: if given, directions are drawn uniformly from these angles
      (degrees, within ``angles``) instead: a few distinct directions that
      a small model learns to tell apart sooner.
  """

  def __init__(self, base: AttributeNames, angles: Sequence[float] = (0, 90),
               *, condition: bool = True, grid: Sequence[float] = ()):
    if len(base.objectives) != 2:
      raise ValueError(f"dpa.objectives={base.objectives}: directions are "
                       "angles in a plane, so DPA needs exactly 2 objectives.")
    low, high = (float(a) for a in angles)
    if not 0 <= low <= high <= 90:
      raise ValueError(f"dpa.angles={tuple(angles)}: need 0 <= low <= high "
                       "<= 90 degrees.")
    grid = tuple(float(a) for a in grid)
    if any(not low <= a <= high for a in grid):
      raise ValueError(f"dpa.train_angles={grid}: each must lie in "
                       f"dpa.angles=({low:g}, {high:g}).")
    self.base, self.angles, self.condition = base, (low, high), condition
    self.grid = grid
    self.stop_strings = base.stop_strings
    self.targets = {}  # prompt text -> (true name, direction), as drawn

  def _angles(self, n, seed):
    rng = np.random.default_rng([seed, 7])
    if self.grid:
      return np.asarray(self.grid)[rng.integers(len(self.grid), size=n)]
    low, high = self.angles
    return rng.uniform(low, high, n)

  def prompt(self, prompt, v):
    text = (conditioned(prompt.text, v, self.base.objectives)
            if self.condition else prompt.text)
    return onpolicy.Prompt(text, (prompt.target, tuple(float(x) for x in v)))

  def prompts(self, split: str, n: int, *, seed: int):
    plain = self.base.prompts(split, n, seed=seed)
    out = [self.prompt(p, direction(a))
           for p, a in zip(plain, self._angles(len(plain), seed))]
    self.targets.update((p.text, p.target) for p in out)
    return out

  def clean(self, text: str) -> str:
    return self.base.clean(text)

  def reward(self, prompt, response: str) -> float:
    target, v = prompt.target
    return float(np.dot(v, self.base.rewards(target, response)))

  def heldout_records(self, fmt: str, list_size: int) -> list[dict]:
    """Held-out records of the attribute task's candidates, ranked by v.r
    for a direction drawn per prompt (the train step's offline eval)."""
    records = []
    items = list(self.base.candidates("eval"))
    for (text, name, cands), a in zip(items,
                                      self._angles(len(items), seed=12345)):
      p = self.prompt(onpolicy.Prompt(text, name), direction(a))
      responses = [c + "(" for c in cands][:max(list_size, 2)]
      scores = [self.reward(p, r) for r in responses]
      records.append({"prompt": p.text, "responses": responses,
                      "scores": scores})
    if fmt == "lists":
      return records
    return onpolicy.to_pairs(records)


def directional_scores(rewards: Sequence[np.ndarray],
                       directions: Sequence[np.ndarray],
                       normalize: bool) -> list[list[float]]:
  """``v . r`` of each list's responses.

  Args:
    rewards: per list, ``[K, M]`` rewards of its responses.
    directions: per list, its ``[M]`` direction.
    normalize: standardise each objective over all the responses first
      (``(r - mean) / std``), so that an objective with a wider spread (a
      name's length against its similarity) does not decide the ranking
      for almost every direction.
  """
  rewards = [np.asarray(r, np.float64) for r in rewards]
  if normalize and rewards:
    flat = np.concatenate(rewards)
    mean, std = flat.mean(0), flat.std(0)
    std = np.where(std > 0, std, 1.0)
    rewards = [(r - mean) / std for r in rewards]
  return [(r @ np.asarray(v)).tolist() for r, v in zip(rewards, directions)]


class ComputedScorer:
  """Ranks a round's samples by ``v . r`` of the task's computed rewards,
  optionally standardised over the round (:func:`directional_scores`)."""

  def __init__(self, task: DirectionalTask, normalize: bool):
    self._task, self._normalize = task, normalize

  def rescore(self, records: Sequence[dict],
              batch_size: int = 64) -> list[dict]:
    del batch_size
    rewards, directions = [], []
    for r in records:
      name, v = self._task.targets[r["prompt"]]
      rewards.append(np.array([self._task.base.rewards(name, t)
                               for t in r["responses"]]))
      directions.append(np.asarray(v))
    scores = directional_scores(rewards, directions, self._normalize)
    return [dict(r, scores=s) for r, s in zip(records, scores)]


class MultiRewardScorer:
  """Scores responses with an ArmoRM run's attribute heads.

  The run (``objective='multi_reward'`` or ``'reward_gate'``) names its
  attributes in its recorded config (``data.preference.attributes``); the
  scorer reads the heads of ``objectives`` (after the run's verbosity
  decorrelation) and ranks each response by ``v.r`` with the direction
  written in its prompt. Rows are ``[BOS] + prompt + response``, as the
  reward model trained on them.
  """

  def __init__(self, config, path: str, tokenizer, objectives, *, mesh=None,
               normalize=False):
    recorded = _recorded_config(path)
    attributes = tuple(recorded["data"]["preference"]["attributes"])
    missing = [o for o in objectives if o not in attributes]
    if missing:
      raise ValueError(f"dpa.reward_model={path}: its attributes "
                       f"{attributes} lack {missing}")
    self._index = [attributes.index(o) for o in objectives]
    self._objectives, self._normalize = tuple(objectives), normalize
    rm_config = copy.deepcopy(config)
    rm_config.data.preference.attributes = attributes
    rm_config.reward.verbosity_attribute = recorded["reward"].get(
        "verbosity_attribute", "")
    rm_config.reward.gate_hidden = recorded["reward"].get(
        "gate_hidden", config.reward.gate_hidden)  # the gate's shape
    cfg = onpolicy.with_recorded_adapters(
        state_lib.build_model_config(config.model, tokenizer), path)
    self._mesh = mesh if mesh is not None else shd.make_mesh(config.mesh)
    self._graphdef, self._params = init_from.model_params(
        path, cfg, self._mesh, config.sharding_rules,
        build=mr_objective.model_builder(rm_config))
    self._tok, self._pref = tokenizer, config.data.preference
    self._rows = shd.global_batch_size(self._mesh)
    self._fixed = None

  def fix_direction(self, v):
    """Rank by ``v`` for prompts without the DPA line (``condition=False``)."""
    self._fixed = np.asarray(v, np.float64)

  def attribute_rewards(self, prompts: Sequence[str],
                        responses: Sequence[str],
                        batch_size: int = 64) -> np.ndarray:
    """``[N, M]`` predicted rewards of ``objectives``."""
    rows = [onpolicy.score_row(self._tok, self._pref, p, r)
            for p, r in zip(prompts, responses)]
    out = []
    for n, tokens, segments, prompt_mask in onpolicy.score_batches(
        rows, batch_size, self._rows):
      _, rewards, _ = _score(self._graphdef, self._params, tokens, segments,
                             prompt_mask)
      out.append(np.asarray(rewards)[:n][:, self._index])
    return np.concatenate(out, 0) if out else np.zeros(
        (0, len(self._index)))

  def rescore(self, records: Sequence[dict],
              batch_size: int = 64) -> list[dict]:
    """``records`` with ``scores`` = v.r of the predicted rewards."""
    prompts = [r["prompt"] for r in records for _ in r["responses"]]
    responses = [t for r in records for t in r["responses"]]
    rewards = self.attribute_rewards(prompts, responses, batch_size)
    per_list, directions, i = [], [], 0
    for r in records:
      directions.append(parse_direction(r["prompt"], self._objectives)
                        if self._fixed is None else self._fixed)
      per_list.append(rewards[i:i + len(r["responses"])])
      i += len(r["responses"])
    scores = directional_scores(per_list, directions, self._normalize)
    return [dict(r, scores=s) for r, s in zip(records, scores)]


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, params, tokens, segment_ids, prompt_mask):
  return nnx.merge(graphdef, params).score(tokens, segment_ids, prompt_mask)


def _recorded_config(path):
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


def evaluate_directions(graphdef, params, tokenizer, task: DirectionalTask,
                        prompts, angles: Sequence[float], *, max_prompt_len,
                        max_new_tokens, mesh=None) -> list[dict]:
  """Greedy held-out mean rewards per objective, one point per angle.

  Returns:
    ``[{"angle", "direction", "rewards": {objective: mean}, "samples"}]``
    (``samples``: the first few greedy responses of the direction).
  """
  points = []
  for angle in angles:
    v = direction(angle)
    conditioned_prompts = [task.prompt(p, v) for p in prompts]
    records = onpolicy.sample_records(
        graphdef, params, tokenizer, conditioned_prompts, task.base, k=1,
        rng=jax.random.key(0), max_prompt_len=max_prompt_len,
        max_new_tokens=max_new_tokens, temperature=0.0, mesh=mesh)
    rewards = np.array([r["scores"][0] for r in records])
    points.append({
        "angle": float(angle), "direction": v.round(4).tolist(),
        "rewards": dict(zip(task.base.objectives,
                            rewards.mean(0).round(5).tolist())),
        "samples": [r["responses"][0] for r in records[:4]]})
  return points


def run(config, workdir: str) -> list[dict]:
  """Trains (or resumes) the DPA rounds, then evaluates the directions.

  Returns:
    the points of :func:`evaluate_directions` for ``dpa.eval_angles``; they
    are also written to ``workdir/dpa_directions.jsonl``.
  """
  d = config.dpa
  base = AttributeNames(tuple(d.objectives), config.data.heldout_fraction)
  task = DirectionalTask(base, tuple(d.angles), condition=bool(d.condition),
                         grid=tuple(d.get("train_angles", ())))
  normalize = bool(d.get("normalize", False))
  if d.reward_model:
    sampler = onpolicy._Policy(config, workdir)  # pylint: disable=protected-access
    scorer = MultiRewardScorer(config, d.reward_model, sampler.tokenizer,
                               base.objectives, mesh=sampler.mesh,
                               normalize=normalize)
    if not task.condition:
      scorer.fix_direction(direction(task.angles[0]))
  else:
    scorer = ComputedScorer(task, normalize)
  onpolicy.run(config, workdir, task=task, scorer=scorer,
               evaluate_fn=functools.partial(_directional_eval, task=task,
                                          config=config))
  policy = onpolicy.policy_path(config, workdir)
  return evaluate_policy(config, workdir, policy, task)


def evaluate_policy(config, workdir, policy, task) -> list[dict]:
  """:func:`evaluate_directions` of ``policy`` (a run or HF directory),
  written to ``workdir/dpa_directions.jsonl``."""
  d, op, pref = config.dpa, config.onpolicy, config.data.preference
  sampler = onpolicy._Policy(config, workdir)  # pylint: disable=protected-access
  prompts = task.base.prompts("eval", op.eval_prompts, seed=0)
  points = evaluate_directions(
      sampler.graphdef, sampler.params(policy), sampler.tokenizer, task,
      prompts, tuple(d.eval_angles), max_prompt_len=pref.max_prompt_len,
      max_new_tokens=op.max_new_tokens, mesh=sampler.mesh)
  onpolicy.write_jsonl(os.path.join(workdir, DIRECTIONS_FILE), points)
  return points


def _directional_eval(graphdef, params, tokenizer, prompts, mesh, *, task,
                      config):
  """Per-round held-out metrics: each objective's greedy mean reward at the
  two ends of ``dpa.angles``."""
  del prompts
  op, pref = config.onpolicy, config.data.preference
  heldout = task.base.prompts("eval", op.eval_prompts, seed=0)
  metrics = {}
  for point in evaluate_directions(
      graphdef, params, tokenizer, task, heldout, sorted(set(task.angles)),
      max_prompt_len=pref.max_prompt_len, max_new_tokens=op.max_new_tokens,
      mesh=mesh):
    for name, value in point["rewards"].items():
      metrics[f"heldout/angle_{point['angle']:g}/{name}"] = value
  return metrics


def _print_directions(config, workdir):
  for point in run(config, workdir):
    print(json.dumps({k: point[k] for k in ("angle", "rewards", "samples")}))


if __name__ == "__main__":
  cli.config_command(_print_directions, "Root of the DPA rounds.")
