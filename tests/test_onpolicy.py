"""On-policy rounds: sample, score, train LiPO/DPO, resume."""

import importlib.util
import json
import os

import pytest

from alignax import onpolicy
from alignax.data import preference_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tok_dir, objective="lipo"):
  spec = importlib.util.spec_from_file_location(
      "onpolicy_demo", os.path.join(ROOT, "configs", "onpolicy_demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.objective = objective
  c.checkpoint.update(init_from="", save_every=2, keep=2)
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 d_ff=64, max_seq_len=64)
  c.tokenizer.update(vocab_size=512, num_sentinels=8, cache_dir=tok_dir)
  # No offline eval (train.py's own tests cover it): one compile less.
  c.train.update(steps=2, batch_size=8, seq_len=64, log_every=2, eval_every=0,
                 progress_bar=False)
  c.data.preference.update(max_prompt_len=32, groups_per_row=2)
  c.optimizer.update(warmup_steps=1, schedule_steps=2)
  c.onpolicy.update(rounds=2, prompts_per_round=6, eval_prompts=4,
                    max_new_tokens=4, sample_batch=32)
  return c


def test_task_cleaning_and_reward_hand_computed():
  task = onpolicy.DocstringTask()
  assert task.clean("get_tag(self):\n    return") == "get_tag("
  assert task.clean("first\nsecond(") == "first"
  assert task.clean("no_stop") == "no_stop"
  prompt = onpolicy.Prompt("# Return the tag.\ndef ", "get_tag")
  assert task.reward(prompt, "get_tag(") == 1.0
  # difflib: "get_tag" vs "get_tab" share "get_ta": 2 * 6 / (7 + 7).
  assert task.reward(prompt, "get_tab(") == pytest.approx(12 / 14)
  heldout = task.prompts("eval", 3, seed=0)
  assert len({p.text for p in heldout}) == 3
  assert all(p.text.endswith("\ndef ") for p in heldout)


def test_to_pairs_takes_best_and_worst_and_drops_ties():
  records = [{"prompt": "p", "responses": ["a", "b", "c"],
              "scores": [0.2, 0.9, 0.1]},
             {"prompt": "q", "responses": ["x", "y"], "scores": [0.5, 0.5]}]
  assert onpolicy.to_pairs(records) == [
      {"prompt": "p", "chosen": "b", "rejected": "c"}]


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_rounds_sample_score_train_and_resume(tmp_path):
  workdir = str(tmp_path / "run")
  config = _config(str(tmp_path / "tok"))
  history = onpolicy.run(config, workdir)
  assert [h["round"] for h in history] == [-1, 0, 1]
  for h in history:
    assert 0 <= h["heldout/mean_reward"] <= 1
    assert 0 <= h["heldout/exact_match"] <= h["heldout/mean_reward"] + 1e-9
  assert history[2]["step"] == 2 and history[2]["train/loss"] > 0
  task = onpolicy.DocstringTask()
  for r in range(2):
    records = _read_jsonl(os.path.join(workdir, f"round_{r}", "samples.jsonl"))
    prompts = task.prompts("train", 6, seed=config.seed + r)
    assert [rec["prompt"] for rec in records] == [p.text for p in prompts]
    for rec, prompt in zip(records, prompts):
      assert len(rec["responses"]) == 4 == len(rec["scores"])
      for text, score in zip(rec["responses"], rec["scores"]):
        assert score == preference_task.similarity(prompt.target,
                                                   text.removesuffix("("))
  # Round -1 (the starting policy) is on disk beside the rounds' metrics.
  initial = os.path.join(workdir, "initial_" + onpolicy.METRICS_FILE)
  with open(initial) as f:
    assert json.load(f) == history[0]
  # Resuming a finished run trains nothing and returns the same metrics
  # (round -1 read back, not decoded again).
  mtime = os.path.getmtime(os.path.join(workdir, "round_1", "samples.jsonl"))
  initial_mtime = os.path.getmtime(initial)
  again = onpolicy.run(config, workdir)
  assert again == history
  assert os.path.getmtime(initial) == initial_mtime
  assert os.path.getmtime(
      os.path.join(workdir, "round_1", "samples.jsonl")) == mtime


def test_a_dpo_round_trains_on_best_vs_worst_pairs(tmp_path):
  workdir = str(tmp_path / "dpo")
  config = _config(str(tmp_path / "tok"), objective="dpo")
  config.onpolicy.rounds = 1
  history = onpolicy.run(config, workdir)
  assert [h["round"] for h in history] == [-1, 0]
  assert history[1]["step"] == 2 and history[1]["train/loss"] > 0
  records = _read_jsonl(os.path.join(workdir, "round_0", "samples.jsonl"))
  task = onpolicy.DocstringTask()
  prompts = {p.text: p for p in task.prompts("train", 6, seed=config.seed)}
  assert records  # some prompts had distinct scores
  for rec in records:
    assert set(rec) == {"prompt", "chosen", "rejected"}
    target = prompts[rec["prompt"]]
    assert task.reward(target, rec["chosen"]) > task.reward(target,
                                                            rec["rejected"])
