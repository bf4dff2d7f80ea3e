"""Online RL (alignax.rl, alignax.rollout): the rollout batch, the loop, resume."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from alignax import defaults
from alignax import losses
from alignax import onpolicy
from alignax import rl
from alignax import rollout
from alignax import state as state_lib
from alignax.models import lora
from alignax.rewards import combine


def test_token_batch_rows_masks_and_groups():
  prompts = [[1, 5, 6], [1, 7]]  # G = 2 completions each, prompt-major
  completions = [[10, 11, 2],  # stopped (2 = stop token)
                 [12, 13, 14, 15],  # never stopped: truncated
                 [16, 2, 99, 98],  # tokens after the stop are dropped
                 [2]]  # stops at once
  b = rollout.token_batch(prompts, completions, seq_len=8, stop_tokens=(2,))
  rows = np.array([[1, 5, 6, 10, 11, 2, 0, 0, 0],
                   [1, 5, 6, 12, 13, 14, 15, 0, 0],
                   [1, 7, 16, 2, 0, 0, 0, 0, 0],
                   [1, 7, 2, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b["inputs"], rows[:, :-1])
  np.testing.assert_array_equal(b["targets"], rows[:, 1:])
  np.testing.assert_array_equal(b["segment_ids"], (rows[:, :-1] > 0) * 1)
  np.testing.assert_array_equal(b["positions"][2], np.arange(8))
  # 1 exactly on the targets that are completion tokens (through the stop).
  want = np.zeros((4, 8), np.float32)
  want[0, 2:5] = want[1, 2:6] = want[2, 1:3] = want[3, 1:2] = 1
  np.testing.assert_array_equal(b["weights"], want)
  np.testing.assert_array_equal(b["truncated"], [False, True, False, False])
  np.testing.assert_array_equal(b["completion_lengths"], [3, 4, 2, 1])
  assert "prefix" not in b
  masked = rollout.token_batch(prompts, completions, seq_len=8,
                               stop_tokens=(2,), mask_truncated=True,
                               prefix=True)
  assert masked["weights"][1].sum() == 0
  np.testing.assert_array_equal(masked["weights"][[0, 2, 3]], want[[0, 2, 3]])
  np.testing.assert_array_equal(masked["prefix"][0], np.arange(8) < 3)
  np.testing.assert_array_equal(masked["prefix"][3], np.arange(8) < 2)
  with pytest.raises(ValueError, match="exceed seq_len"):
    rollout.token_batch(prompts, completions, seq_len=5)
  with pytest.raises(ValueError, match="whole groups"):
    rollout.token_batch(prompts, completions[:3], seq_len=8)


def test_advantages_are_group_advantages_of_the_combined_rewards():
  rng = np.random.default_rng(0)
  g = 4
  rewards = rng.random((12, 2))  # 3 prompts x G samples, K = 2 rewards
  rewards[:g, 0] = 0.5  # a constant group in the first reward
  weights = np.array([1.0, 0.5])
  scalar, gdpo = rollout.combined_rewards(rewards, weights, num_generations=g)
  np.testing.assert_allclose(scalar, rewards @ weights)
  assert gdpo is None
  adv = rollout.advantages("grpo", scalar, num_generations=g)
  grouped = scalar.reshape(-1, g)  # NumPy reference (TRL's formula)
  ref = (grouped - grouped.mean(1, keepdims=True)) / (
      grouped.std(1, ddof=1, keepdims=True) + 1e-4)
  np.testing.assert_allclose(adv, ref.reshape(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(adv, losses.group_advantages(
      scalar.astype(np.float32), num_generations=g), rtol=1e-6)
  # GDPO: its own advantages, per reward normalised first.
  _, gdpo = rollout.combined_rewards(rewards, weights, num_generations=g,
                                     combine_as="gdpo")
  np.testing.assert_allclose(
      rollout.advantages("grpo", scalar, num_generations=g, gdpo=gdpo),
      combine.gdpo_advantages(rewards.reshape(3, g, 2), weights).reshape(-1),
      rtol=1e-6)
  # RLOO: leave-one-out baselines of the KL-penalised rewards.
  kl = rng.random(12)
  adv = rollout.advantages("rloo", scalar, num_generations=g, kl_rows=kl,
                           beta=0.1)
  pen = (scalar - 0.1 * kl).reshape(-1, g)
  loo = pen - (pen.sum(1, keepdims=True) - pen) / (g - 1)
  np.testing.assert_allclose(adv, loo.reshape(-1), rtol=1e-5, atol=1e-6)


def test_prompt_order_is_a_function_of_the_step_and_covers_each_epoch():
  first = [i for r in range(3) for i in rollout.prompt_order(r, 2, 6, seed=3)]
  assert sorted(first) == list(range(6))  # one epoch = every prompt once
  assert rollout.prompt_order(4, 2, 6, seed=3) == rollout.prompt_order(
      4, 2, 6, seed=3)
  assert rollout.prompt_order(0, 6, 6, 3) != rollout.prompt_order(3, 6, 6, 3)


class LengthTask:
  """Prompts without files; reward = the completion's length, capped (no
  sandbox)."""

  stop_strings = ()

  def prompts(self, split, n, *, seed):
    texts = [f"# helper {i}\ndef f{i}(x):\n" for i in range(
        6 if split == "train" else 2)]
    order = np.random.default_rng(seed).permutation(len(texts))[:n]
    return [onpolicy.Prompt(texts[i]) for i in order]

  def clean(self, text):
    return text

  def rewards(self, prompts, completions):
    assert len(prompts) == len(completions)
    return [min(len(c), 12) / 12 for c in completions]


def _config(tok_dir, steps):
  """A tiny LoRA policy, G = 2 samples of 2 prompts, GRPO with a KL to the
  base (reference='base') and 2 optimizer steps per rollout (old log-probs
  kept)."""
  c = defaults.base_config()
  c.objective = "grpo"
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 d_ff=64, max_seq_len=64)
  c.tokenizer.update(vocab_size=512, num_sentinels=8, cache_dir=tok_dir)
  c.train.update(steps=steps, seq_len=32, log_every=2, eval_every=4,
                 progress_bar=False)
  c.optimizer.update(warmup_steps=0, schedule_steps=4, lr=1e-2)
  c.checkpoint.update(save_every=2, keep=2)
  c.mesh.update(fsdp=4, tensor=2)  # 4 rows over the batch ways
  c.lora.update(enabled=True, rank=4, alpha=8.0)
  c.reference = "base"
  c.grpo.update(num_generations=2, prompts_per_step=2, num_iterations=2,
                max_completion_length=6, beta=0.04, eval_prompts=2,
                task="docstring")
  return c


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_loop_trains_only_adapters_and_resumes_as_a_straight_run(tmp_path):
  tok, a, b = (str(tmp_path / d) for d in ("tok", "a", "b"))
  straight, last = rl.run(_config(tok, 4), a, LengthTask())
  assert last["step"] == 4 and last["train/nonfinite"] == 0
  for key in ("train/loss", "train/kl", "train/clip_ratio/region_mean",
              "rollout/reward", "rollout/reward/docstring_std",
              "rollout/tokens_per_s", "train/tokens_per_s", "time/train_s",
              "eval/reward", "eval/solved"):
    assert np.isfinite(last[key]), key
  assert 0 < last["rollout/completions/mean_length"] <= 6
  assert [m["step"] for m in _lines(a)] == [0, 2, 4]
  # The base stays the initialisation bit for bit; the adapters moved.
  start = jax.jit(lambda: state_lib.init_params(straight.model_cfg, 0))()
  final = traverse_util.flatten_dict(jax.device_get(straight.state.params))
  fresh = traverse_util.flatten_dict(jax.device_get(start))
  moved = [k for k in final if not np.array_equal(final[k], fresh[k])]
  assert moved and all(lora.is_adapter_path(k) for k in moved)
  assert straight.frozen is None  # the reference is the base, no copy

  # Resume from the straight run's checkpoint after its first rollout: the
  # same prompts, samples and steps follow.
  shutil.copytree(a, b)
  shutil.rmtree(os.path.join(b, "checkpoints", "4"))
  resumed, again = rl.run(_config(tok, 4), b, LengthTask())
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(straight.state.params),
               jax.device_get(resumed.state.params))
  for key in ("train/loss", "rollout/reward", "eval/reward"):
    assert again[key] == last[key], key
  # Step 4 is logged once, by the resumed run, as the straight run logged it.
  assert [m["step"] for m in _lines(b)] == [0, 2, 4]
  assert _lines(b)[-1]["train/loss"] == _lines(a)[-1]["train/loss"]


def test_train_prompts_limits_the_pool_to_a_seeded_prefix():
  c = defaults.base_config()
  every = rl.training_pool(LengthTask(), c)
  assert len(every) == 6
  c.grpo.train_prompts = 4
  some = rl.training_pool(LengthTask(), c)
  assert [p.text for p in some] == [p.text for p in every[:4]]
  c.grpo.train_prompts = -1
  with pytest.raises(ValueError, match="grpo.train_prompts"):
    defaults.check_values(c)


def test_user_errors_name_the_field(tmp_path):
  c = _config(str(tmp_path / "tok"), 3)
  with pytest.raises(ValueError, match="multiple of config.grpo.num_iter"):
    rl.prepare_config(c, "")
  c = _config(str(tmp_path / "tok"), 4)
  c.objective = "rloo"
  c.grpo.reward_combine = "gdpo"
  with pytest.raises(ValueError, match="gdpo"):
    rl.prepare_config(c, "")
  c.objective = "dpo"
  with pytest.raises(ValueError, match="alignax.rl trains"):
    rl.prepare_config(c, "")
