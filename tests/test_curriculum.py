"""Curry-DPO (alignax.curriculum): ranked pairs, stages, reference moves."""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from alignax import checkpoint as ckpt_lib
from alignax import curriculum
from alignax import train

GRADED = {"prompt": "p", "responses": ["a", "b", "c", "d"],
          "scores": [2.0, 9.0, 5.0, 1.0]}


def test_best_vs_rest_pairs_easy_to_hard_as_the_paper():
  # Ranked: b (9) > c (5) > a (2) > d (1); the best against each other one,
  # largest gap first: (b, d) 8, (b, a) 7, (b, c) 4.
  pairs = curriculum.ranked_pairs(GRADED)
  assert [(p["chosen"], p["rejected"], p["gap"]) for p in pairs] == [
      ("b", "d", 8.0), ("b", "a", 7.0), ("b", "c", 4.0)]
  every = curriculum.ranked_pairs(GRADED, pairing="all")
  assert len(every) == 6 and [p["gap"] for p in every] == sorted(
      [8.0, 7.0, 4.0, 4.0, 3.0, 1.0], reverse=True)
  # Ties make no pair.
  assert curriculum.ranked_pairs({"prompt": "q", "responses": ["x", "y"],
                                  "scores": [1, 1]}) == []


def test_stages_take_each_prompts_pairs_by_gap_rank():
  other = {"prompt": "q", "responses": ["x", "y"], "scores": [0.0, 3.0]}
  stages = curriculum.stage_pairs([GRADED, other], stages=3)
  assert [[(p["prompt"], p["chosen"], p["rejected"]) for p in s]
          for s in stages] == [[("p", "b", "d"), ("q", "y", "x")],
                               [("p", "b", "a")], [("p", "b", "c")]]
  two = curriculum.stage_pairs([GRADED], stages=2)  # ranks >= 1 share the last
  assert [len(s) for s in two] == [1, 2]
  assert [p["chosen"] + p["rejected"] for p in curriculum.heldout_pairs(
      [GRADED, other])] == ["bd", "yx"]
  with pytest.raises(ValueError, match="pairing='best'"):
    curriculum.ranked_pairs(GRADED, pairing="best")


def _graded(path, n, seed):
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
  with open(path, "w") as f:
    for i in range(n):
      pick = lambda k: " ".join(rng.choice(words, k))
      f.write(json.dumps({"prompt": pick(1 + i % 3),
                          "responses": [pick(1 + j) for j in range(3)],
                          "scores": [float(s) for s in rng.permutation(3)]})
              + "\n")


def test_stages_train_in_turn_with_the_previous_stage_as_reference(tmp_path):
  from test_lora_train import lora_recipe  # the tiny dpo_demo config
  c = lora_recipe(str(tmp_path / "tok"), steps=1, eval_every=1)
  c.lora.enabled, c.reference = False, "none"
  c.optimizer.update(warmup_steps=0, schedule_steps=1)
  c.checkpoint.update(save_every=1, keep=1)
  c.data.source = "jsonl"
  _graded(tmp_path / "train.jsonl", 24, 0)
  _graded(tmp_path / "eval.jsonl", 8, 1)
  c.data.update(paths=(str(tmp_path / "train.jsonl"),),
                eval_paths=(str(tmp_path / "eval.jsonl"),))
  c.curriculum.stages = 2
  workdir = str(tmp_path / "curry")
  history = curriculum.run(c, workdir)
  assert [h["stage"] for h in history] == [0, 1]
  assert [h["pairs"] for h in history] == [24, 24]  # 3 responses: 2 pairs each
  assert history[0]["mean_gap"] > history[1]["mean_gap"]  # easy first
  # Stage 1 started from stage 0's end, its reference: at its step 0 the
  # policy is the reference, so the held-out DPO loss is log 2.
  with open(os.path.join(workdir, "stage_1", "metrics.jsonl")) as f:
    first = next(json.loads(l) for l in f if '"eval/loss"' in l)
  np.testing.assert_allclose(first["eval/loss"], np.log(2), rtol=1e-6)
  with open(os.path.join(workdir, "stage_1", "config.json")) as f:
    stage1 = json.load(f)
  assert stage1["checkpoint"]["init_from"] == os.path.join(workdir, "stage_0")
  assert stage1["reference"] == "frozen"
  # Finished stages are not trained again.
  again = curriculum.run(c, workdir)
  assert again == history


def test_malformed_lists_name_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(GRADED) + "\n" + json.dumps(
      {"prompt": "p", "responses": ["a"], "scores": ["x"]}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'scores'"):
    curriculum._read_lists([str(path)])  # pylint: disable=protected-access
