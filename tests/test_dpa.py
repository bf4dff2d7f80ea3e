"""Directional Preference Alignment and the pareto command, end to end."""

import importlib.util
import json
import os

import numpy as np
import pytest

from alignax import dpa
from alignax import onpolicy
from alignax import pareto

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(variant):
  spec = importlib.util.spec_from_file_location(
      "multi_objective_demo",
      os.path.join(ROOT, "configs", "multi_objective_demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _config(tok_dir, variant="dpa"):
  c = _demo(variant)
  c.checkpoint.update(init_from="", save_every=2, keep=2, async_save=False)
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 d_ff=64, max_seq_len=64)
  c.tokenizer.update(vocab_size=512, num_sentinels=8, cache_dir=tok_dir)
  c.train.update(steps=2, batch_size=8, seq_len=64, log_every=2, eval_every=0,
                 progress_bar=False)
  c.data.preference.update(max_prompt_len=32, groups_per_row=2)
  c.optimizer.update(warmup_steps=1, schedule_steps=2)
  c.onpolicy.update(rounds=1, prompts_per_round=6, eval_prompts=4,
                    max_new_tokens=4, sample_batch=32)
  c.dpa.eval_angles = (0.0, 90.0)
  c.dpa.normalize = False  # raw v . r: the samples' ranking is checkable
  return c


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_the_direction_template_round_trips():
  v = dpa.direction(30.0)
  np.testing.assert_allclose(v, [np.sqrt(3) / 2, 0.5])
  text = dpa.conditioned("# Return the tag.\ndef ", v, ("correctness",
                                                       "length"))
  assert text == ("# maximize 0.87 correctness + 0.50 length\n"
                  "# Return the tag.\ndef ")
  np.testing.assert_allclose(
      dpa.parse_direction(text, ("correctness", "length")), [0.87, 0.5])
  # The names are read by name, not by position.
  np.testing.assert_allclose(
      dpa.parse_direction(text, ("length", "correctness")), [0.5, 0.87])
  with pytest.raises(ValueError, match="2 entries for 3 objectives"):
    dpa.conditioned("x", v, ("a", "b", "c"))
  with pytest.raises(ValueError, match="no '# maximize' line"):
    dpa.parse_direction("# Return the tag.\ndef ", ("correctness", "length"))


def test_attribute_rewards_hand_computed():
  task = dpa.AttributeNames(("correctness", "length"))
  # get_tag_value_helper vs get_tag: 2 of 4 words match, precision 1/2,
  # recall 1, F1 = 2 * (1/2) / (3/2) = 2/3; 20 characters / 32 = 0.625.
  np.testing.assert_allclose(task.rewards("get_tag", "get_tag_value_helper("),
                             [2 / 3, 0.625])
  np.testing.assert_allclose(task.rewards("get_tag", "get_tag("), [1.0, 7 / 32])
  np.testing.assert_allclose(task.rewards("get_tag", "("), [0.0, 0.0])
  # camelCase splits into the same words.
  np.testing.assert_allclose(task.rewards("get_tag", "getTag("), [1.0, 6 / 32])
  # similarity: difflib's ratio 2 M / (|a| + |b|): 7 matching characters of
  # 7 + 20.
  sim = dpa.AttributeNames(("similarity", "length"))
  np.testing.assert_allclose(sim.rewards("get_tag", "get_tag_value_helper("),
                             [14 / 27, 0.625])
  np.testing.assert_allclose(sim.rewards("get_tag", "get_tag("), [1.0, 7 / 32])
  with pytest.raises(ValueError, match="each must be one of"):
    dpa.AttributeNames(("correctness", "helpfulness"))


def test_directional_prompts_carry_their_direction_and_reward_v_dot_r():
  base = dpa.AttributeNames(("correctness", "length"))
  task = dpa.DirectionalTask(base, (20.0, 70.0))
  prompts = task.prompts("train", 24, seed=3)
  plain = base.prompts("train", 24, seed=3)
  angles = []
  for p, q in zip(prompts, plain):
    name, v = p.target
    assert name == q.target and p.text.endswith(q.text)
    np.testing.assert_allclose(dpa.parse_direction(p.text, base.objectives),
                               v, atol=0.005)
    angles.append(np.degrees(np.arctan2(v[1], v[0])))
    r = base.rewards(name, name + "_value(")
    assert task.reward(p, name + "_value(") == pytest.approx(np.dot(v, r))
  assert 20 <= min(angles) and max(angles) <= 70 and np.ptp(angles) > 20
  # Another seed, other directions; condition=False keeps the plain prompt.
  assert [p.target[1] for p in task.prompts("train", 24, seed=4)] != [
      p.target[1] for p in prompts]
  fixed = dpa.DirectionalTask(base, (90.0, 90.0), condition=False)
  p = fixed.prompts("train", 24, seed=3)[0]
  assert p.text == plain[0].text
  assert fixed.reward(p, "abcd(") == pytest.approx(4 / 32)
  with pytest.raises(ValueError, match="exactly 2 objectives"):
    dpa.DirectionalTask(dpa.AttributeNames(("correctness",)))
  with pytest.raises(ValueError, match="0 <= low <= high <= 90"):
    dpa.DirectionalTask(base, (60.0, 30.0))


def test_a_grid_of_training_directions():
  base = dpa.AttributeNames(("similarity", "length"))
  task = dpa.DirectionalTask(base, grid=(0.0, 45.0, 90.0))
  vs = {p.target[1] for p in task.prompts("train", 60, seed=0)}
  assert vs == {tuple(dpa.direction(a)) for a in (0.0, 45.0, 90.0)}
  with pytest.raises(ValueError, match="must lie in dpa.angles"):
    dpa.DirectionalTask(base, (0.0, 45.0), grid=(0.0, 90.0))


def test_directional_scores_standardise_each_objective_over_the_round():
  rewards = [np.array([[0.2, 0.1], [0.3, 0.9]]), np.array([[0.25, 0.5]])]
  vs = [np.array([1.0, 0.0]), dpa.direction(45.0)]
  # Raw: v . r.
  raw = dpa.directional_scores(rewards, vs, normalize=False)
  np.testing.assert_allclose(raw[0], [0.2, 0.3])
  np.testing.assert_allclose(raw[1], [0.75 / np.sqrt(2)])
  # Standardised over the 3 responses: similarity mean 0.25, std
  # sqrt(1/600); length mean 0.5, std sqrt(0.32 / 3).
  s_sim, s_len = np.sqrt((0.05**2 * 2) / 3), np.sqrt((0.4**2 * 2) / 3)
  z = dpa.directional_scores(rewards, vs, normalize=True)
  np.testing.assert_allclose(z[0], [-0.05 / s_sim, 0.05 / s_sim])
  np.testing.assert_allclose(z[1], [0.0], atol=1e-12)
  z = dpa.directional_scores(rewards, [np.array([0.0, 1.0]), vs[1]], True)
  np.testing.assert_allclose(z[0], [-0.4 / s_len, 0.4 / s_len])
  # A NumPy reference on random rounds.
  rng = np.random.default_rng(0)
  rewards = [rng.normal(size=(4, 2)) * [0.1, 1.0] for _ in range(5)]
  vs = [dpa.direction(a) for a in rng.uniform(0, 90, 5)]
  flat = np.concatenate(rewards)
  want = [((r - flat.mean(0)) / flat.std(0)) @ v for r, v in zip(rewards, vs)]
  for got, w in zip(dpa.directional_scores(rewards, vs, True), want):
    np.testing.assert_allclose(got, w)
  # The computed scorer: the targets the prompts were drawn with.
  task = dpa.DirectionalTask(dpa.AttributeNames(("similarity", "length")))
  prompts = task.prompts("train", 3, seed=1)
  records = [{"prompt": p.text, "responses": [p.target[0] + "(", "x(",
                                               p.target[0] + "_data_value("]}
             for p in prompts]
  scored = dpa.ComputedScorer(task, normalize=True).rescore(records)
  rewards = [np.array([task.base.rewards(p.target[0], t)
                       for t in r["responses"]])
             for p, r in zip(prompts, records)]
  want = dpa.directional_scores(rewards, [p.target[1] for p in prompts], True)
  assert [r["scores"] for r in scored] == want
  assert all("scores" not in r for r in records)


def test_heldout_pairs_are_ranked_by_their_direction():
  base = dpa.AttributeNames(("correctness", "length"))
  task = dpa.DirectionalTask(base)
  pairs = task.heldout_records("pairs", 4)
  assert len(pairs) > 20
  names, seen = {}, {}
  for text, name, _ in base.candidates("eval"):
    names[text] = name
    seen[text] = seen.get(text, 0) + 1
  checked = 0
  for rec in pairs:
    v = dpa.parse_direction(rec["prompt"], base.objectives)
    plain = rec["prompt"].split("\n", 1)[1]
    if seen[plain] > 1:  # two functions with one docstring summary
      continue
    checked += 1
    chosen = np.dot(v, base.rewards(names[plain], rec["chosen"]))
    rejected = np.dot(v, base.rewards(names[plain], rec["rejected"]))
    assert chosen > rejected - 0.01  # v is printed to 2 decimals
  assert checked > 20


@pytest.fixture(scope="module")
def dpa_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("dpa")
  config = _config(str(root / "tok"))
  workdir = str(root / "dpa")
  points = dpa.run(config, workdir)
  return config, workdir, points


def test_a_dpa_round_fine_tunes_on_the_best_samples(dpa_run):
  config, workdir, points = dpa_run
  base = dpa.AttributeNames(tuple(config.dpa.objectives))
  assert base.objectives == ("similarity", "length")  # the demo's
  task = dpa.DirectionalTask(base, tuple(config.dpa.angles),
                             grid=tuple(config.dpa.train_angles))
  prompts = {p.text: p for p in task.prompts("train", 6, seed=config.seed)}
  records = _read_jsonl(os.path.join(workdir, "round_0", "samples.jsonl"))
  assert records and all(r["prompt"] in prompts for r in records)
  for rec in records:  # RSF's chosen is the best under v . r
    p = prompts[rec["prompt"]]
    assert task.reward(p, rec["chosen"]) > task.reward(p, rec["rejected"])
  with open(os.path.join(workdir, "round_0", "config.json")) as f:
    round_config = json.load(f)
  # The chosen NLL alone reads no reference model.
  assert round_config["reference"] == "none"
  assert round_config["preference"]["loss_type"] == "sft"
  assert [p["angle"] for p in points] == [0.0, 90.0]
  for p in points:
    assert 0 <= p["rewards"]["similarity"] <= 1
    assert 0 <= p["rewards"]["length"] <= 4 * 16 / 32  # 4 tokens
  assert _read_jsonl(os.path.join(workdir, dpa.DIRECTIONS_FILE)) == points
  # A finished run resumes without training or sampling again.
  samples = os.path.join(workdir, "round_0", "samples.jsonl")
  mtime = os.path.getmtime(samples)
  assert dpa.run(config, workdir) == points
  assert os.path.getmtime(samples) == mtime


def test_the_pareto_command_writes_fronts_plot_and_hypervolumes(dpa_run,
                                                                 tmp_path):
  config, dpa_dir, points = dpa_run
  c = _config(config.tokenizer.cache_dir, "pareto")
  c.pareto.update(soups=(dpa_dir, ""), soup_steps=3, modpo_weights=(0.5,),
                  dpa=dpa_dir)
  workdir = str(tmp_path / "pareto")
  summary, fronts = pareto.run(c, workdir)
  assert set(summary) == set(fronts) == {"soups", "modpo", "dpa"}
  # DPA's points are the DPA run's own evaluation (same prompts, angles).
  assert [p["rewards"] for p in fronts["dpa"]] == [p["rewards"]
                                                   for p in points]
  # Soups: weights (1, 0), (0.5, 0.5), (0, 1); the first is the DPA policy
  # on the plain prompts, the last a fresh initialisation.
  assert [p["weights"] for p in fronts["soups"]] == [[1, 0], [0.5, 0.5],
                                                     [0, 1]]
  ev = pareto._Evaluator(c, workdir)  # pylint: disable=protected-access
  first = ev.plain(ev.sampler.params(pareto.policy_dir(dpa_dir)))
  assert fronts["soups"][0]["rewards"] == first["rewards"]
  last = ev.plain(ev.sampler.params(None))
  assert fronts["soups"][-1]["rewards"] == last["rewards"]
  # MODPO: one run per weight, trained with (1 - w, w).
  with open(os.path.join(workdir, "modpo_w0.5", "config.json")) as f:
    assert json.load(f)["preference"]["modpo_weights"] == [0.5, 0.5]
  assert fronts["modpo"][0]["weights"] == [0.5, 0.5]
  with open(os.path.join(workdir, pareto.SUMMARY_FILE)) as f:
    assert json.load(f) == summary
  for method, front in fronts.items():
    assert pareto.read_front(os.path.join(
        workdir, pareto.FRONT_FILE.format(method))) == front
    xy = [[p["rewards"]["similarity"], p["rewards"]["length"]]
          for p in front]
    assert summary[method]["hypervolume"] == pytest.approx(
        pareto.hypervolume(xy, (0.0, 0.0)))
    assert summary[method]["points"] == len(front)
  pytest.importorskip("matplotlib")
  with open(os.path.join(workdir, pareto.PLOT_FILE), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_pareto_config_errors_are_one_line(tmp_path):
  c = _config(str(tmp_path / "tok"), "pareto")
  c.pareto.update(soups=(), modpo_weights=(), dpa="")
  with pytest.raises(ValueError, match="set soups, modpo_weights or dpa"):
    pareto.run(c, str(tmp_path / "p"))
  c.pareto.reference = (0.0,)
  with pytest.raises(ValueError, match="one value per objective"):
    pareto.run(c, str(tmp_path / "p"))


@pytest.mark.parametrize("variant", ["sft", "dpa", "similarity", "length",
                                     "modpo", "pareto"])
def test_demo_variants_pass_the_value_checks(variant):
  from alignax import defaults  # pylint: disable=g-import-not-at-top
  c = _demo(variant)
  defaults.validate(c, num_devices=8, batch_ways=8)
  assert onpolicy.needs_reference(c) == (c.objective == "modpo")
